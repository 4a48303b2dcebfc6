"""`mergebench merge` against MergeKit on the same Llama-shaped bf16 checkpoints, in one run.

What it measures: for each method, a fresh subprocess per run of `mergebench merge` and of MergeKit's
`mergekit-yaml` on the same inputs (a base and N experts built by `llama_checkpoints.py` with transformers'
`LlamaConfig`): wall time, CPU time (user + system) and peak RSS, from `os.wait4` of each child. Where both tools
compute the same thing (TIES per tensor with MergeKit's `normalize: false`, task arithmetic), the two outputs are
compared entry by entry: the fraction of bf16 entries that differ, split into those at a column where some task's
|τ| equals that tensor's trim threshold (the top-k tie-break differs: ours keeps the earlier entry, MergeKit's
argsort any) and the rest, with the largest difference of each. DARE-TIES is timed only (random masks from
different generators; MergeKit's `dare_ties` also skips the magnitude trim and rescales by the L1 norm, so it is
compared with ours at k = 1.0 for time only). TSV-M has no MergeKit counterpart and is timed alone.
Both tools get the same thread settings (this process's environment) and compute in float32
(MergeKit `dtype: float32`, `out_dtype: bfloat16`).

    python bench/llama_checkpoints.py --out /tmp/mb-llama
    python bench/merge_vs_mergekit.py --workdir /tmp/mb-llama --mergekit /tmp/mkvenv/bin/mergekit-yaml --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def run_child(cmd: list[str], log: Path) -> dict:
    """Run `cmd`, return wall s, cpu s and peak RSS MiB of the child (os.wait4)."""
    start = time.perf_counter()
    with open(log, "ab") as fh:
        fh.write(("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n").encode())
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[0]} failed (exit {os.waitstatus_to_exitcode(status)}); see {log}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss / 1024}


def mergekit_config(method: str, base: Path, experts: list[Path], out: Path) -> Path:
    params = {"ties": {"weight": 1.0, "density": 0.2}, "task_arithmetic": {"weight": 1.0},
              "dare_ties": {"weight": 1.0, "density": 0.5}}[method]
    shared = {"ties": {"normalize": False, "lambda": 0.3}, "task_arithmetic": {"normalize": False, "lambda": 0.3},
              "dare_ties": {"normalize": False, "lambda": 0.5}}[method]
    config = {"merge_method": method, "base_model": str(base),
              "models": [{"model": str(e), "parameters": params} for e in experts],
              "parameters": shared, "dtype": "float32", "out_dtype": "bfloat16"}
    path = out.with_suffix(".yml")
    path.write_text(json.dumps(config, indent=1))  # YAML is a superset of JSON
    return path


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    from mergebench_core.engine.tensors import load_state_dict

    return load_state_dict(folder)


def compare(ours: Path, theirs: Path, base: Path, experts: list[Path], k: float | None) -> dict:
    """Entries that differ between two merged checkpoints, split by whether a top-k tie explains them."""
    from mergebench_core.engine.sparsify import keep_count
    from mergebench_core.engine.tensors import SafetensorsSource

    a, b = SafetensorsSource(ours), SafetensorsSource(theirs)
    src_base, src_experts = SafetensorsSource(base), [SafetensorsSource(e) for e in experts]
    total = differ = at_ties = 0
    worst_tie = worst_other = 0.0
    for key in a.keys():
        x, y = a.get(key), b.get(key).to(a.dtype(key))
        if not x.is_floating_point():
            continue
        diff = x.float() != y.float()
        total += x.numel()
        n_diff = int(diff.sum())
        if n_diff == 0:
            continue
        differ += n_diff
        gap = (x.float() - y.float()).abs()
        tie = torch.zeros(x.numel(), dtype=torch.bool)
        if k is not None:
            b0 = src_base.get(key).float().reshape(-1)
            count = keep_count(k, x.numel())
            for e in src_experts:
                mag = (e.get(key).float().reshape(-1) - b0).abs()
                if 0 < count < mag.numel():
                    threshold = torch.topk(mag, count, sorted=False).values.min()
                    tie |= mag == threshold
        tie = tie.view(x.shape)
        at_ties += int((diff & tie).sum())
        if bool((diff & tie).any()):
            worst_tie = max(worst_tie, float(gap[diff & tie].max()))
        if bool((diff & ~tie).any()):
            worst_other = max(worst_other, float(gap[diff & ~tie].max()))
    return {"total": total, "differ": differ, "at_ties": at_ties, "worst_tie": worst_tie, "worst_other": worst_other}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/mb-llama", help="checkpoints from llama_checkpoints.py")
    parser.add_argument("--mergekit", default=shutil.which("mergekit-yaml"), help="the mergekit-yaml executable")
    parser.add_argument("--repeat", type=int, default=1, help="runs per row (best wall time is reported)")
    parser.add_argument("--methods", default="ties_tensor,ties_global,task_arithmetic,dare_ties,tsv_m")
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the merged outputs")
    args = parser.parse_args()
    work = Path(args.workdir)
    base = work / "base"
    experts = sorted(work.glob("expert*"), key=lambda p: int(p.name[6:]))
    if not base.is_dir() or not experts:
        raise SystemExit(f"no checkpoints under {work}: run bench/llama_checkpoints.py --out {work} first")
    outs = work / "outputs"
    outs.mkdir(exist_ok=True)
    log = outs / "runs.log"
    mergebench = [sys.executable, "-m", "mergebench_core.cli", "-q", "merge", "--base", str(base), "--models",
                  *map(str, experts)]
    ours = {
        "ties_tensor": ["-m", "ties", "ties.scope=tensor"],
        "ties_global": ["-m", "ties", "ties.scope=global"],
        "task_arithmetic": ["-m", "task_arithmetic"],
        "dare_ties": ["-m", "dare_ties", "dare_ties.k=1.0"],
        "tsv_m": ["-m", "tsv_m"],
    }
    theirs = {"ties_tensor": "ties", "task_arithmetic": "task_arithmetic", "dare_ties": "dare_ties"}
    rows = []
    for name in args.methods.split(","):
        out = outs / f"mergebench-{name}"
        best = min((run_child(mergebench + ours[name] + ["--out", str(out)], log) for _ in range(args.repeat)),
                   key=lambda r: r["wall"])
        rows.append({"method": name, "tool": "mergebench", **best, "out": out})
        print(f"mergebench {name}: {best['wall']:.1f} s, {best['rss']:.0f} MiB", flush=True)
        if name in theirs and not args.skip_mergekit and args.mergekit:
            mk_out = outs / f"mergekit-{name}"
            config = mergekit_config(theirs[name], base, experts, mk_out)
            cmd = [args.mergekit, str(config), str(mk_out), "--no-copy-tokenizer", "--allow-crimes"]
            best = min((run_child(cmd, log) for _ in range(args.repeat)), key=lambda r: r["wall"])
            rows.append({"method": name, "tool": "mergekit 0.1.5", **best, "out": mk_out})
            print(f"mergekit {name}: {best['wall']:.1f} s, {best['rss']:.0f} MiB", flush=True)
    by = {(r["method"], r["tool"]): r for r in rows}
    print("\n| method | tool | wall s | CPU s | peak RSS MiB | vs MergeKit (time, RSS) | entries that differ |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mk = by.get((r["method"], "mergekit 0.1.5"))
        ratio, differ = "", ""
        if r["tool"] == "mergebench" and mk is not None:
            ratio = f"{mk['wall'] / r['wall']:.1f}x faster, {r['rss'] / mk['rss']:.2f}x RSS"
            if r["method"] in ("ties_tensor", "task_arithmetic"):
                c = compare(r["out"], mk["out"], base, experts, 0.2 if r["method"] == "ties_tensor" else None)
                differ = (f"{100 * c['differ'] / c['total']:.3f}% ({100 * c['at_ties'] / c['total']:.3f}% at "
                          f"top-k ties, max gap {c['worst_tie']:.2g}; "
                          f"{100 * (c['differ'] - c['at_ties']) / c['total']:.4f}% elsewhere, max gap "
                          f"{c['worst_other']:.2g})")
        print(f"| {r['method']} | {r['tool']} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['rss']:.0f} | {ratio} | "
              f"{differ} |")
    if not args.keep:
        shutil.rmtree(outs)


if __name__ == "__main__":
    main()
