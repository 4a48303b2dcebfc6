"""`mergebench merge --device cuda` against `--device cpu` on Llama-shaped checkpoints: for a machine with a GPU.

What it measures: the same merges on both devices, each a fresh subprocess (wall time, CPU time, host peak RSS from
`os.wait4`), then how many output entries differ between the two (the code path is the same; a GPU may fuse
θ_0 + λ·merged into one rounding, which can move an entry by one float32 ulp before the bf16 rounding). On the GPU
the engine reads each block into pinned host memory, copies it to the device and merges it there while a reader
thread reads the next block (`--prefetch`, on by default with a GPU); the `--block-mb` rows show how block size
trades host memory for transfer overlap.

    python bench/llama_checkpoints.py --out /tmp/mb-llama
    python bench/gpu_merge.py --workdir /tmp/mb-llama                # about 10 minutes on one GPU machine
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from merge_vs_mergekit import run_child


def differing(a: Path, b: Path) -> tuple[int, int]:
    from mergebench_core.engine.tensors import SafetensorsSource

    x, y = SafetensorsSource(a), SafetensorsSource(b)
    total = differ = 0
    for key in x.keys():
        u, v = x.get(key), y.get(key)
        total += u.numel()
        differ += int((u != v).sum())
    return differ, total


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/mb-llama")
    parser.add_argument("--methods", default="ties_tensor,ties_global,task_arithmetic,dare_ties")
    parser.add_argument("--blocks", default="16,64")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for a GPU machine (the CPU path is the test suite's)")
    work = Path(args.workdir)
    base, experts = work / "base", sorted(work.glob("expert*"), key=lambda p: int(p.name[6:]))
    if not base.is_dir() or not experts:
        raise SystemExit(f"no checkpoints under {work}: run bench/llama_checkpoints.py --out {work} first")
    cases = {"ties_tensor": ["-m", "ties", "ties.scope=tensor"], "ties_global": ["-m", "ties", "ties.scope=global"],
             "task_arithmetic": ["-m", "task_arithmetic"], "dare_ties": ["-m", "dare_ties"]}
    out = work / "gpu-bench"
    out.mkdir(exist_ok=True)
    log = out / "runs.log"
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}\n")
    print("| method | device | --block-mb | wall s | CPU s | host peak RSS MiB | entries differing from CPU |")
    print("|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        cmd = [sys.executable, "-m", "mergebench_core.cli", "-q", "merge", "--base", str(base), "--models",
               *map(str, experts), *cases[method]]
        cpu_out = out / f"{method}-cpu.safetensors"
        r = run_child(cmd + ["--out", str(cpu_out), "--device", "cpu"], log)
        print(f"| {method} | cpu | 16 | {r['wall']:.1f} | {r['cpu']:.1f} | {r['rss']:.0f} | |", flush=True)
        for block in args.blocks.split(","):
            gpu_out = out / f"{method}-cuda-{block}.safetensors"
            r = run_child(cmd + ["--out", str(gpu_out), "--device", "cuda", "--block-mb", block], log)
            d, n = differing(cpu_out, gpu_out)
            print(f"| {method} | cuda | {block} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['rss']:.0f} | "
                  f"{d} of {n} ({100 * d / n:.4f}%) |", flush=True)
    shutil.rmtree(out)


if __name__ == "__main__":
    main()
