"""Where a streaming merge's time goes, stage by stage, against the read floor (one pass over the input bytes).

For each method, four kinds of fresh child process run on the same checkpoints, each after the same imports and
the same glibc settings as `mergebench merge`, with the page cache warmed by reading every input file first; each
child times only its work (wall and CPU time, of it system time and minor page faults, not the interpreter and torch
starting) and the parent takes peak RSS from `os.wait4`:

  floor     a plain read of every input tensor (base and experts) through `SafetensorsSource.read_into`, the reader
            the engine uses, into one reused buffer;
  transfer  the engine's read path (`MergeStream.task_vector_blocks` with reused buffers, in the engine's blocks):
            the reads, the NaN/inf check, the conversion to float32 on `--device` (on cuda: pinned host buffers,
            the copy, a synchronize per tensor) and the subtraction of the base;
  kernel    the real `merge_sources` with the method, into a sink that discards (a synchronize on cuda per block);
  merge     the whole `mergebench merge` (`cli.main`), writing the output safetensors file.

Each run is a round of all four (for every method; the order alternates between rounds so drift in the machine's
load falls on both sides) and the table gives per-stage medians over rounds, each stage's time beyond the one before
it, and the median over rounds of each stage / the floor measured in the same round. The floor and the transfer are
the same for every method (all of them are read in the engine's blocks), so they run once per round. CPU time is the
steadier measure on a machine shared with other jobs.

    python bench/merge_stages.py            # small Llama-shaped set: each merge takes seconds on a CPU core
    python bench/merge_stages.py --rounds 5 --methods ties_tensor,task_arithmetic
    python bench/llama_checkpoints.py --out /tmp/mb-llama               # the full set: 9 x 333 MB
    python bench/merge_stages.py --workdir /tmp/mb-llama --device cuda  # on a GPU machine

A method is a preset name below or any registered method name, with optional `name.param=value` overrides after a
colon: `della:della.density=0.3`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
STAGES = ("floor", "transfer", "kernel", "merge")
PRESETS: dict[str, tuple[str, list[str]]] = {
    "ties_tensor": ("ties", ["ties.scope=tensor"]),
    "ties_global": ("ties", ["ties.scope=global"]),
    "task_arithmetic": ("task_arithmetic", []),
    "dare_ties": ("dare_ties", ["dare_ties.k=1.0"]),
    "della": ("della", []),
}
"""The methods of the MergeKit comparison (`merge_vs_mergekit.py`), with the same parameters."""
SMALL = ["--hidden", "512", "--layers", "4", "--vocab", "8000", "--intermediate", "1376", "--heads", "8"]
"""The default set: 21 M parameters (42 MB a checkpoint in bf16), a base and 8 experts."""


def method_spec(text: str) -> tuple[str, str, list[str]]:
    """(label, registered method, overrides) of a `--methods` entry: a preset, a method name, or either followed by
    `:` and comma-separated overrides (which replace a preset's)."""
    label, _, extra = text.partition(":")
    label = label.strip()
    if not label:
        raise ValueError(f"empty method in {text!r}")
    method, overrides = PRESETS.get(label, (label, []))
    if extra.strip():
        overrides = [o.strip() for o in extra.split(",") if o.strip()]
        label = f"{label}:{','.join(overrides)}"
    return label, method, overrides


SHARED = ("floor", "transfer")
"""Stages that do not depend on the method (every method here reads in the engine's blocks): run once a round."""


def round_order(labels: Sequence[str], round_index: int) -> list[tuple[str, str]]:
    """(stage, method label) runs of one round: the shared stages, then every method's; reversed on odd rounds."""
    runs = [(stage, "") for stage in SHARED] + [(stage, label) for label in labels for stage in STAGES
                                                  if stage not in SHARED]
    return runs if round_index % 2 == 0 else runs[::-1]


def summarise(rounds: list[dict[tuple[str, str], dict[str, float]]], label: str) -> dict[str, Any]:
    """Per-stage medians of one method over rounds, each stage's increment over the stage before it, and the median
    of each stage's ratio to the floor of its own round (pairs measured close together)."""
    stages: dict[str, dict[str, float]] = {}
    for stage in STAGES:
        key = (stage, "" if stage in SHARED else label)
        runs = [r[key] for r in rounds if key in r]
        if not runs:
            continue
        stages[stage] = {
            "seconds": statistics.median(x["seconds"] for x in runs),
            "cpu": statistics.median(x["cpu"] for x in runs),
            "sys": statistics.median(x.get("sys", 0.0) for x in runs),
            "faults": statistics.median(x.get("faults", 0) for x in runs),
            "cpu_ratio": statistics.median(x["cpu"] / r[("floor", "")]["cpu"] for x, r in
                                           ((r[key], r) for r in rounds if key in r and ("floor", "") in r)),
            "rss": statistics.median(x["rss"] for x in runs),
            "ratio": statistics.median(x["seconds"] / r[("floor", "")]["seconds"] for x, r in
                                       ((r[key], r) for r in rounds if key in r and ("floor", "") in r)),
        }
    previous = 0.0
    for stage in STAGES:
        if stage in stages:
            stages[stage]["increment"] = stages[stage]["seconds"] - previous
            previous = stages[stage]["seconds"]
    return stages


def paired(rounds: list[dict[tuple[str, str], dict[str, float]]],
           baseline: list[dict[tuple[str, str], dict[str, float]]], label: str) -> dict[str, tuple[float, float]]:
    """Per stage of `label`: the medians over rounds of this code's wall and CPU time over the baseline's, each
    ratio taken within one round (the two runs were made one after the other)."""
    out = {}
    for stage in STAGES:
        key = (stage, "" if stage in SHARED else label)
        pairs = [(r[key], b[key]) for r, b in zip(rounds, baseline) if key in r and key in b]
        if pairs:
            out[stage] = (statistics.median(x["seconds"] / y["seconds"] for x, y in pairs),
                          statistics.median(x["cpu"] / y["cpu"] for x, y in pairs))
    return out


def format_table(summaries: dict[str, dict[str, Any]]) -> str:
    lines = ["| method | stage | wall s (median) | + over previous stage | wall / floor (paired median) | CPU s | "
             "CPU / floor | of it system s | page faults | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, stages in summaries.items():
        for stage, s in stages.items():
            lines.append(f"| {label} | {stage} | {s['seconds']:.3f} | {s['increment']:+.3f} | {s['ratio']:.2f}x | "
                         f"{s['cpu']:.2f} | {s['cpu_ratio']:.2f}x | {s['sys']:.2f} | {s['faults']:.0f} | "
                         f"{s['rss']:.0f} |")
    return "\n".join(lines)


# -- the child: one stage, timed from inside -------------------------------------------------------------------


def _sources(work: Path) -> tuple[Any, list[Any]]:
    from mergebench_core.engine.safetensors_reader import SafetensorsSource

    experts = sorted(work.glob("expert*"), key=lambda p: int(p.name[6:]))
    return SafetensorsSource(work / "base"), [SafetensorsSource(e) for e in experts]


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _floor(work: Path) -> None:
    import torch

    base, experts = _sources(work)
    sources = [base, *experts]
    nbytes = max(torch.Size(src.shape(k)).numel() * src.dtype(k).itemsize for src in sources for k in src.keys())
    buf = torch.empty(nbytes, dtype=torch.uint8)
    for key in base.keys():
        for src in sources:
            n = torch.Size(src.shape(key)).numel()
            src.read_into(key, buf[:n * src.dtype(key).itemsize].view(src.dtype(key)))


def _transfer(work: Path, device: Any, block_entries: int) -> None:
    from mergebench_core.engine.stream import MergeStream
    from mergebench_core.engine.tensor_math import is_mergeable

    base, experts = _sources(work)
    keys = [k for k in base.keys() if is_mergeable(base.dtype(k))]
    stream = MergeStream(keys, base, experts, device=device, block_entries=block_entries)
    try:
        for key in keys:
            for _ in stream.task_vector_blocks(key, reuse=True):
                pass
            _sync(device)
    finally:
        stream.close()


class DiscardSink:
    """Takes merged tensors and drops them (synchronizing on a GPU, so the kernel's time lands in its stage)."""

    def __init__(self, device: Any):
        self.device = device

    def write(self, key: str, tensor: Any) -> None:
        _sync(self.device)

    def write_block(self, key: str, start: int, values: Any) -> None:
        _sync(self.device)

    def patch(self, key: str, index: Any, values: Any) -> None:
        _sync(self.device)


def _method(name: str, overrides: list[str]) -> Any:
    import mergebench_core.contract.registry as registry_module
    from mergebench_core.contract.config import build_params, parse_overrides

    cls = registry_module.get_registry().method(name)
    return cls(build_params(cls.name, cls.Params, None, parse_overrides(overrides))[0])


def _kernel(work: Path, device: Any, block_entries: int, name: str, overrides: list[str]) -> None:
    from mergebench_core.engine.data_free import merge_sources

    base, experts = _sources(work)
    merge_sources(_method(name, overrides), base, experts, sink=DiscardSink(device), device=device,
                  block_entries=block_entries)


def _merge(work: Path, device: Any, block_mb: float, name: str, overrides: list[str]) -> None:
    from mergebench_core.cli.main import main as cli_main

    experts = sorted(work.glob("expert*"), key=lambda p: int(p.name[6:]))
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        argv = ["-q", "merge", "--base", str(work / "base"), "--models", *map(str, experts), "-m", name,
                *overrides, "--out", str(Path(tmp) / "merged.safetensors"), "--device", str(device),
                "--block-mb", str(block_mb)]
        if cli_main(argv) != 0:
            raise SystemExit(f"mergebench merge failed: {argv}")


def child(args: argparse.Namespace) -> None:
    import torch

    from mergebench_core.cli.main import _keep_freed_memory
    from mergebench_core.cli.merge import block_entries_of
    import mergebench_core.engine.data_free  # noqa: F401  (imports outside the timed part, for every stage)

    _keep_freed_memory()
    work, device = Path(args.workdir), torch.device(args.device)
    torch.empty(1, device=device)  # a CUDA context is set up outside the timed part
    _, name, overrides = method_spec(args.method) if args.method else ("", "", [])
    if name:
        _method(name, overrides)  # loads the plugins outside the timed part
    start, cpu, usage = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
    if args.child == "floor":
        _floor(work)
    elif args.child == "transfer":
        _transfer(work, device, block_entries_of(args.block_mb))
    elif args.child == "kernel":
        _kernel(work, device, block_entries_of(args.block_mb), name, overrides)
    else:
        _merge(work, device, args.block_mb, name, overrides)
    _sync(device)
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu,
                      "sys": after.ru_stime - usage.ru_stime, "faults": after.ru_minflt - usage.ru_minflt}))


# -- the parent ------------------------------------------------------------------------------------------------


def warm(work: Path) -> int:
    """Reads every input file once so that every child starts from the same (warm) page cache; returns bytes."""
    total = 0
    for f in sorted(work.glob("*/*.safetensors")):
        if f.parent.name == "base" or f.parent.name.startswith("expert"):
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    total += len(chunk)
    return total


def run_stage(stage: str, label: str, args: argparse.Namespace, code: str | None = None) -> dict[str, float]:
    """One child; `code` is a checkout whose `mergebench_core` it imports instead of the installed one."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", stage, "--workdir", args.workdir,
           "--device", args.device, "--block-mb", str(args.block_mb)] + (["--method", label] if label else [])
    env = dict(os.environ)
    if code:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(code).resolve())] + ([env["PYTHONPATH"]] if
                                                                           env.get("PYTHONPATH") else []))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    if proc.returncode != 0:
        raise SystemExit(f"stage {stage} {label} failed (exit {proc.returncode}):\n{err[-3000:]}")
    timed = json.loads(out.strip().splitlines()[-1])
    return {"seconds": timed["seconds"], "cpu": timed["cpu"], "sys": timed.get("sys", 0.0),
            "faults": timed.get("faults", 0), "rss": usage.ru_maxrss / 1024}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/mb-llama-small",
                        help="checkpoints from llama_checkpoints.py; built there with the small recipe when absent")
    parser.add_argument("--methods", default="ties_tensor,dare_ties,task_arithmetic",
                        help="comma-separated; separate overrides with ';' between methods when they hold commas")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--block-mb", type=float, default=16.0, help="as `mergebench merge --block-mb`")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", metavar="CHECKOUT",
                        help="another checkout of the repository (git worktree): every run is paired with the same "
                             "run on its mergebench_core, in alternating order, and the ratios are printed")
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    work = Path(args.workdir)
    if not (work / "base").is_dir():
        sys.path.insert(0, str(HERE))
        import llama_checkpoints

        build_parser = argparse.ArgumentParser()
        llama_checkpoints.add_arguments(build_parser)
        llama_checkpoints.build(build_parser.parse_args(["--out", str(work), *SMALL]))
    sep = ";" if ";" in args.methods else ","
    labels = [method_spec(m)[0] for m in args.methods.split(sep) if m.strip()]
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"{os.cpu_count()} CPU cores"
    print(f"{work}: {warm(work) / 1e6:.0f} MB of inputs; {device_name}, torch {torch.__version__}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    rounds: list[dict[tuple[str, str], dict[str, float]]] = []
    baseline: list[dict[tuple[str, str], dict[str, float]]] = []
    for r in range(args.rounds):
        results: dict[tuple[str, str], dict[str, float]] = {}
        base_results: dict[tuple[str, str], dict[str, float]] = {}
        for i, (stage, label) in enumerate(round_order(labels, r)):
            variants = [(results, None)] + ([(base_results, args.baseline)] if args.baseline else [])
            for into, code in variants if (i + r) % 2 == 0 else variants[::-1]:
                warm(work)
                into[(stage, label)] = run_stage(stage, label, args, code)
        rounds.append(results)
        baseline.append(base_results)
        print(f"round {r + 1}: " + ", ".join(f"{s}{'/' + m if m else ''} {v['seconds']:.2f} s"
                                             for (s, m), v in results.items()), flush=True)
    print(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print(format_table({label: summarise(rounds, label) for label in labels}))
    if args.baseline:
        print(f"\nbaseline {args.baseline}:\n")
        print(format_table({label: summarise(baseline, label) for label in labels}))
        print("\n| method | stage | wall this / baseline (paired median) | CPU this / baseline |\n|---|---|---|---|")
        for label in labels:
            for stage, (wall, cpu) in paired(rounds, baseline, label).items():
                print(f"| {label} | {stage} | {wall:.2f}x | {cpu:.2f}x |")


if __name__ == "__main__":
    main()
