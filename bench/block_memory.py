"""Peak memory of `mergebench merge` bounded by the block size, on a 7B-shaped model.

What it measures: Llama checkpoints with a 7B model's widths (hidden 4096, MLP 11008, 32 heads, vocabulary 32,000)
but 2 layers instead of 32, so that a base and 8 experts fit this disk (9 × 1.3 GB, bf16; built by
`llama_checkpoints.py`). The largest tensors, the embedding and the output head, are a 7B model's own
(131 M entries each): stacked for 8 experts in float32 they would take 4.2 GB. Each row is a fresh
`mergebench merge` subprocess; its peak RSS comes from `os.wait4`. With `--block-mb B` an element-wise method holds
about B MiB per model per block, so its peak should follow B, not the largest tensor; the 30 missing layers add
tensors of the same sizes as the 2 present, so a full 7B model peaks at the same memory (and takes about
6.7 B / 0.67 B ≈ 10× the time).

    python bench/block_memory.py --workdir /tmp/mb-7b          # builds the checkpoints on first use (12 GB)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from llama_checkpoints import add_arguments
from merge_vs_mergekit import run_child


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, out=False)
    parser.set_defaults(hidden=4096, intermediate=11008, heads=32, layers=2)
    parser.add_argument("--workdir", default="/tmp/mb-7b")
    parser.add_argument("--blocks", default="4,16,64", help="--block-mb values to run, MiB per model")
    parser.add_argument("--methods", default="ties,ties_global,task_arithmetic")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints (12 GB) for another run")
    args = parser.parse_args()
    # built in a child process: a child forked from a parent that holds the models would count their pages in its
    # own peak RSS (os.wait4 reports the child's maximum, copy-on-write pages included)
    subprocess.run([sys.executable, str(HERE / "llama_checkpoints.py"), "--out", args.workdir,
                    *(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                      if k in ("hidden", "layers", "vocab", "intermediate", "heads", "experts", "tau_std", "seed",
                               "shard_mb"))], check=True)
    work = Path(args.workdir)
    base, experts = work / "base", [work / f"expert{i}" for i in range(args.experts)]
    out = Path(args.workdir) / "merged"
    log = Path(args.workdir) / "runs.log"
    cases = {"ties": ["-m", "ties", "ties.scope=tensor"], "ties_global": ["-m", "ties", "ties.scope=global"],
             "task_arithmetic": ["-m", "task_arithmetic"], "dare_ties": ["-m", "dare_ties"]}
    largest = 4 * args.vocab * args.hidden * len(experts) / 2**20
    print(f"\nlargest tensor: {args.vocab} x {args.hidden}; stacked for {len(experts)} experts in float32: "
          f"{largest:.0f} MiB\n")
    print("| method | --block-mb | peak RSS MiB | wall s | CPU s |")
    print("|---|---|---|---|---|")
    for method in args.methods.split(","):
        for block in args.blocks.split(","):
            cmd = [sys.executable, "-m", "mergebench_core.cli", "-q", "merge", "--base", str(base), "--models",
                   *map(str, experts), "--out", str(out), "--block-mb", block, *cases[method][:1],
                   *cases[method][1:]]
            r = run_child(cmd, log)
            print(f"| {method} | {block} | {r['rss']:.0f} | {r['wall']:.1f} | {r['cpu']:.1f} |", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
