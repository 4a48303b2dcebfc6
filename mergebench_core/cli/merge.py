"""`mergebench merge`: checkpoint files in, one merged safetensors file (or one per task) out, streamed tensor by
tensor so that memory stays bounded whatever the models' size."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import mergebench_core.contract.registry as registry_module
from mergebench_core.cli.arguments import seed_value, split_names
from mergebench_core.cli.merge_config import cmd_merge_config
from mergebench_core.cli.merge_output import StagedOutput
from mergebench_core.cli.progress import progress_bar
from mergebench_core.contract.config import build_params, check_overrides_used, parse_overrides
from mergebench_core.errors import MergebenchError


def cmd_merge(args: argparse.Namespace) -> int:
    from mergebench_core.engine.checkpoint_files import copy_side_files
    from mergebench_core.engine.data_free import merge_sources
    from mergebench_core.engine.file_merges import CheckpointFiles, FiniteOnlySink, checkpoint_task_names
    from mergebench_core.engine.safetensors_reader import SafetensorsSource
    from mergebench_core.engine.safetensors_writer import StreamingSafetensorsWriter
    from mergebench_core.engine.sharded_writer import DEFAULT_SHARD_SIZE, ShardedSafetensorsWriter, parse_shard_size

    block_entries = block_entries_of(args.block_mb)
    if args.config:
        return cmd_merge_config(args, block_entries, _merge_device(args.device))
    if not args.method or not args.models:
        raise MergebenchError("give --method and --models (and --base for task-vector methods), or --config with "
                              "a MergeKit config")
    if args.models_dir:
        raise MergebenchError("--models-dir says where a --config may name models; without --config, the models "
                              "are the paths given to --base and --models")
    shard_bytes = parse_shard_size(args.out_shard_size or DEFAULT_SHARD_SIZE)
    seed = seed_value(str(args.seed).strip())
    registry = registry_module.get_registry()
    method_cls = registry.method(args.method)
    overrides = parse_overrides(args.overrides)
    check_overrides_used(overrides, {method_cls.name: method_cls.Params})
    configs = build_params(method_cls.name, method_cls.Params, None, overrides)
    if len(configs) != 1:
        raise MergebenchError("`mergebench merge` takes one value per parameter; sweeps belong to `mergebench run`")
    names = checkpoint_task_names(args.models, split_names(args.task_names))
    refusal = method_cls.refusal(CheckpointFiles(names, has_base=args.base is not None), configs[0])
    if refusal:
        raise MergebenchError(f"{method_cls.name} cannot merge these files: {refusal}")
    method = method_cls(configs[0])
    chosen = method.select_experts(names)  # e.g. slerp.models=[a,b] picks two of the files by name
    per_task = method_cls.info.task_specific
    out = Path(args.out)
    if per_task and out.suffix == ".safetensors":
        raise MergebenchError(f"{method_cls.name} builds one model per task: give --out a folder, which will hold "
                              f"{', '.join(f'{n}.safetensors' for n in chosen)}")
    folder = out.suffix != ".safetensors"
    if args.out_shard_size is not None and (per_task or not folder):
        raise MergebenchError(f"--out-shard-size shards the model.safetensors of a folder --out; {out} is "
                              f"{'a folder of one file per task' if per_task else 'one file'}, which is not sharded")
    for given in ([args.base] if args.base else []) + list(args.models):
        if folder and Path(given).resolve() == out.resolve():
            raise MergebenchError(f"--out {out} is the input {given}; writing there would replace its weights: "
                                  f"choose another folder")
    output = StagedOutput(out, folder=folder, parents=args.parents)  # refuses a bad --out before any work
    base = SafetensorsSource(args.base) if args.base else None
    experts = [SafetensorsSource(args.models[names.index(n)]) for n in chosen]
    out_files = [out / f"{n}.safetensors" for n in chosen] if per_task else \
        [out / "model.safetensors" if folder else out]
    ref = base or experts[0]
    layout = [(k, ref.shape(k), ref.dtype(k)) for k in ref.keys()]
    metadata = {"format": "pt", "mergebench_method": method_cls.name,
                "mergebench_params": json.dumps(configs[0].__dict__, default=str)}
    with output:
        writers: list[StreamingSafetensorsWriter | ShardedSafetensorsWriter] = \
            [ShardedSafetensorsWriter(output.path(out), layout, shard_bytes, metadata)] if folder and not per_task \
            else [StreamingSafetensorsWriter(output.path(f), layout,
                                             dict(metadata, **({"mergebench_task": n} if per_task else {})))
                  for f, n in zip(out_files, chosen)]
        sinks = [FiniteOnlySink(w, method_cls.name, f) for w, f in zip(writers, out_files)]
        try:
            merge_sources(method, base, experts, sink=sinks if per_task else sinks[0], seed=seed,
                          progress=progress_bar, device=_merge_device(args.device), prefetch=args.prefetch,
                          block_entries=block_entries, bn_stats=args.bn_stats)
            written = [w.commit() for w in writers]
        except BaseException:
            for w in writers:
                w.abort()
            raise
        finally:
            for src in ([base] if base is not None else []) + experts:
                src.close()
        if folder and base is not None and base.path.is_dir():
            for line in copy_side_files(base.path, output.path(out)):  # configs and tokenizers travel along
                print(f"not copied: {line}", file=sys.stderr)
    if folder and not per_task and isinstance(written[0], list) and len(written[0]) > 1:
        out_files = [out / f.name for f in written[0]]  # shards and their index
    what = ", ".join(str(f) for f in out_files) if per_task or len(out_files) > 1 else str(out_files[0])
    print(f"wrote {what} ({method_cls.name}, {len(experts)} models)")
    return 0


MIN_BLOCK_MB, MAX_BLOCK_MB = 1.0, float(1 << 20)
"""`--block-mb` bounds: below 1 MiB per model the per-block overhead dominates (0.001 ran 30x slower), and 1 TiB
is already more than any single tensor; outside them the value is a typo, not a tuning choice."""


def block_entries_of(block_mb: float) -> int:
    """float32 entries per model in one block for `--block-mb`, refusing values outside a sane range."""
    if not (math.isfinite(block_mb) and MIN_BLOCK_MB <= block_mb <= MAX_BLOCK_MB):
        raise MergebenchError(f"--block-mb {block_mb:g}: the block size must be a number of MiB from "
                              f"{MIN_BLOCK_MB:.0f} to {MAX_BLOCK_MB:.0f} (1 TiB); the default 16 suits a CPU, "
                              f"64 to 256 a GPU")
    return int(block_mb * (1 << 20)) // 4


def _merge_device(name: str) -> str:
    """`merge --device`: cpu, cuda, cuda:N; a GPU that is not there is a clear error, not a traceback."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MergebenchError(f"--device {name}: no CUDA device is available (torch {torch.__version__})")
    return name


def add_parser(sub: Any) -> None:
    """The `merge` command and its options."""
    merge = sub.add_parser("merge", help="merge checkpoint files with a data-free method")
    merge.add_argument("--method", "-m", help="the method (required unless --config gives it)")
    merge.add_argument("--base", help="the pretrained checkpoint (.safetensors file, index or model folder)")
    merge.add_argument("--models", nargs="+", help="the expert checkpoints (required unless --config names them)")
    merge.add_argument("--config", metavar="MERGE.YML",
                       help="a MergeKit merge config (merge_method, base_model, models or slices, parameters, "
                            "dtype, ...): run as MergeKit would, or refused naming the key mergebench cannot "
                            "honour; --out is then a model folder")
    merge.add_argument("--models-dir", action="append", metavar="DIR",
                       help="a folder a --config may name models in, besides the config's folder, the working "
                            "directory and the Hugging Face cache (repeatable)")
    merge.add_argument("--out-shard-size", metavar="SIZE",
                       help="bytes per shard of a folder --out, in MergeKit's syntax (5B, the default: 5e9 bytes; "
                            "500M; 0: one file); several shards come with model.safetensors.index.json")
    merge.add_argument("--out", required=True, help="output .safetensors file, or a folder (methods with one model "
                       "per task, emr and tall_masks, write <task>.safetensors into it)")
    merge.add_argument("--parents", action="store_true",
                       help="create --out's missing parent folders (only once the merge has succeeded)")
    merge.add_argument("--task-names", action="append", metavar="A,B,...",
                       help="a name per model, in order (default: each model's file or folder name); they name "
                            "per-task outputs and are what slerp.models=[a,b] refers to")
    merge.add_argument("--seed", default="0", help="the seed of stochastic methods: an integer >= 0 (default 0)")
    merge.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, or auto: where blocks are "
                       "merged; the inputs are read on the host either way")
    merge.add_argument("--block-mb", type=float, default=16.0, metavar="MIB",
                       help="MiB of float32 per model in one block (default 16): element-wise methods stream tensors "
                            "larger than this in blocks, so peak memory is about this times the number of models")
    merge.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=None,
                       help="read the next block while this one is merged (default: on with a GPU, off on a CPU)")
    merge.add_argument("--bn-stats", choices=["base", "mean"], default="mean",
                       help="batch-norm running statistics (found by name): the base's, or the experts' mean "
                            "(default)")
    merge.add_argument("overrides", nargs="*", help="parameter overrides: method.x=1")
    merge.set_defaults(func=cmd_merge)
