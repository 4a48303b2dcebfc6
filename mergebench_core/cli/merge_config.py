"""`mergebench merge --config merge.yml --out DIR`: a MergeKit config, run unchanged or refused by key."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mergebench_core.cli.arguments import seed_value
from mergebench_core.cli.merge_output import StagedOutput
from mergebench_core.cli.progress import progress_bar
from mergebench_core.errors import MergebenchError

CLASHING = {"method": "--method", "models": "--models", "base": "--base", "task_names": "--task-names",
            "overrides": "parameter overrides"}
"""Options that a config replaces: given with --config they would be silently overridden, so they are refused."""


def cmd_merge_config(args: argparse.Namespace, block_entries: int, device: str) -> int:
    from mergebench_core.engine.sharded_writer import DEFAULT_SHARD_SIZE, parse_shard_size
    from mergebench_core.mergekit.config import load_config
    from mergebench_core.mergekit.run import run_config

    given = [flag for attr, flag in CLASHING.items() if getattr(args, attr, None)]
    if given:
        raise MergebenchError(f"--config names the method, the models and their parameters; drop "
                              f"{', '.join(given)} (edit the config instead)")
    shard_bytes = parse_shard_size(args.out_shard_size or DEFAULT_SHARD_SIZE)
    seed = seed_value(str(args.seed).strip())
    config = load_config(args.config)
    out = Path(args.out)
    if out.suffix == ".safetensors":
        raise MergebenchError(f"--out {out}: a MergeKit config writes a model folder (shards, config, tokenizer, "
                              f"README.md); name a folder")
    output = StagedOutput(out, folder=True, parents=args.parents)
    with output:
        result = run_config(config, args.config, output.path(out), title=out.name, models_dirs=args.models_dir or (),
                            shard_bytes=shard_bytes, seed=seed, device=device, block_entries=block_entries,
                            prefetch=args.prefetch, progress=progress_bar)
    for line in result.skipped:
        print(f"not copied: {line}", file=sys.stderr)
    print(f"wrote {out} ({config.merge_method} as {', '.join(sorted(result.methods))}: {result.tensors} tensors, "
          f"{result.layers} layers, {len(result.files)} file(s))")
    return 0
