"""Streaming-merge benchmark: `mergebench merge` on eight CLIP-ViT-B/32-sized vision towers, against a read floor.

What it does
  1. Writes a base and N expert checkpoints (default 8) with the exact tensor names and shapes of Hugging Face's
     `CLIPVisionModel` for openai/clip-vit-base-patch32 (87,456,000 float32 parameters, ~350 MB each), each saved
     as a two-shard safetensors checkpoint with an index, into a temporary folder (~3.1 GB; removed at the end
     unless --keep). Weights are random: the base ~ N(0, 0.02²), each expert = base + N(0, 0.001²).
  2. Measures a floor in a fresh process: read every input tensor once with `SafetensorsSource` and sum it.
  3. Runs `mergebench merge` as a subprocess for each method (ties with its default global exact top-k,
     task_arithmetic, and dare_ta when a plugin provides it) and measures wall time and peak RSS of each child
     (os.wait4's rusage, so each number belongs to exactly one process).
  4. Prints a table: seconds, peak RSS, and both as ratios to the floor.

Run it (not part of the test suite):
    /work/venv/bin/python bench/merge_streaming.py            # 8 experts, temp dir under $TMPDIR
    /work/venv/bin/python bench/merge_streaming.py --repeat 2 --keep --workdir /tmp/mb-bench
    /work/venv/bin/python bench/merge_streaming.py --methods ties --check-exact   # + sampled == exact fallback
Targets: TIES on 8 models within 3x the floor's wall time, and peak RSS under 2 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

HIDDEN, MLP, LAYERS, PATCH, POSITIONS = 768, 3072, 12, 32, (224 // 32) ** 2 + 1
EXPECTED_PARAMS = 87_456_000


def clip_vit_b32_vision_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of transformers' CLIPVisionModel state dict for openai/clip-vit-base-patch32.

    Written out by hand (no transformers needed). The non-persistent `position_ids` buffer is not part of the
    state dict and is left out.
    """
    p = "vision_model."
    table: list[tuple[str, tuple[int, ...]]] = [
        (p + "embeddings.class_embedding", (HIDDEN,)),
        (p + "embeddings.patch_embedding.weight", (HIDDEN, 3, PATCH, PATCH)),
        (p + "embeddings.position_embedding.weight", (POSITIONS, HIDDEN)),
        (p + "pre_layrnorm.weight", (HIDDEN,)),  # sic: the Hugging Face name has this typo
        (p + "pre_layrnorm.bias", (HIDDEN,)),
    ]
    for i in range(LAYERS):
        q = f"{p}encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            table += [(f"{q}self_attn.{proj}.weight", (HIDDEN, HIDDEN)), (f"{q}self_attn.{proj}.bias", (HIDDEN,))]
        table += [
            (q + "layer_norm1.weight", (HIDDEN,)), (q + "layer_norm1.bias", (HIDDEN,)),
            (q + "mlp.fc1.weight", (MLP, HIDDEN)), (q + "mlp.fc1.bias", (MLP,)),
            (q + "mlp.fc2.weight", (HIDDEN, MLP)), (q + "mlp.fc2.bias", (HIDDEN,)),
            (q + "layer_norm2.weight", (HIDDEN,)), (q + "layer_norm2.bias", (HIDDEN,)),
        ]
    table += [(p + "post_layernorm.weight", (HIDDEN,)), (p + "post_layernorm.bias", (HIDDEN,))]
    return table


def write_checkpoint(folder: Path, seed: int, base_seed: int | None, shards: int = 2) -> None:
    """A sharded safetensors checkpoint (model-0000i-of-0000n.safetensors + index) of random weights."""
    import torch
    from safetensors.torch import save_file

    table = clip_vit_b32_vision_shapes()
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = -(-len(table) // shards)
    weight_map: dict[str, str] = {}
    total = 0
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for key, shape in table[s * per_shard:(s + 1) * per_shard]:
            # the base depends on (base seed, key) only, so every expert shares it without holding it in memory
            g = torch.Generator().manual_seed(_seed(base_seed if base_seed is not None else seed, key))
            t = torch.randn(shape, generator=g) * 0.02
            if base_seed is not None:
                ge = torch.Generator().manual_seed(_seed(seed, key))
                t += torch.randn(shape, generator=ge) * 0.001
            tensors[key] = t
            weight_map[key] = name
            total += t.numel()
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total * 4},
                                                                      "weight_map": weight_map}))


def read_floor(paths: list[str]) -> None:
    """The floor: read every tensor of every input once (as the engine does) and reduce it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mergebench_core.engine.tensors import SafetensorsSource

    total = 0.0
    for path in paths:
        src = SafetensorsSource(path)
        for key in src.keys():
            total += float(src.get(key).sum())
    print(f"floor checksum {total:.6g}")


def check_exact(base: Path, experts: list[Path]) -> int:
    """TIES's sampled-bracket global top-k against its exact fallback (forced by a useless bracket), bit for bit."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch
    from mergebench_ties import Ties

    import mergebench_core.engine.threshold_search as threshold_search
    from mergebench_core.engine.merging import merge_sources
    from mergebench_core.engine.tensors import SafetensorsSource

    def run() -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        merge_sources(Ties(), SafetensorsSource(base), [SafetensorsSource(e) for e in experts], sink=out)
        return out

    sampled = run()
    bracket, uniform = threshold_search._bracket, threshold_search._bracket_uniform
    # a bracket that always misses: the radix-select fallback runs
    threshold_search._bracket = lambda *a, **k: (0.0, 0.0)
    threshold_search._bracket_uniform = lambda sample, counts, z: (torch.zeros(len(counts)), torch.zeros(len(counts)))
    try:
        exact = run()
    finally:
        threshold_search._bracket, threshold_search._bracket_uniform = bracket, uniform
    differing = [k for k in sampled if not torch.equal(sampled[k], exact[k])]
    print(f"ties sampled bracket vs exact fallback: {len(sampled) - len(differing)} of {len(sampled)} tensors "
          f"identical" + (f"; differing: {', '.join(differing[:5])}" if differing else ""))
    return 1 if differing else 0


def measure(cmd: list[str]) -> tuple[float, float, int, float]:
    """(wall seconds, peak RSS in MiB, exit code, CPU seconds) of one child process.

    CPU seconds (user + system) are reported beside wall time because they are far less sensitive to other jobs
    competing for the cores than wall time is.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        print(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}", file=sys.stderr)
    return wall, usage.ru_maxrss / 1024, proc.returncode, usage.ru_utime + usage.ru_stime  # maxrss: KiB


def installed_methods() -> set[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mergebench_core.contract.registry import get_registry

    return set(get_registry().methods)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None, help="where checkpoints go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints (reused by a later run)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per row; the fastest is reported")
    parser.add_argument("--methods", default="ties,task_arithmetic,dare_ta")
    parser.add_argument("--check-exact", action="store_true",
                        help="also check, in-process, that TIES's sampled-bracket output equals its exact fallback's")
    parser.add_argument("--floor-child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_child:
        read_floor(args.floor_child)
        return 0

    n_params = sum(_numel(s) for _, s in clip_vit_b32_vision_shapes())
    assert n_params == EXPECTED_PARAMS, n_params
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mergebench-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base"
    experts = [work / f"expert{i}" for i in range(args.experts)]
    out = work / "merged.safetensors"
    try:
        t0 = time.perf_counter()
        for i, folder in enumerate([base] + experts):
            if not (folder / "model.safetensors.index.json").is_file():
                write_checkpoint(folder, seed=i, base_seed=None if folder == base else 0)
        size = sum(f.stat().st_size for d in [base] + experts for f in d.iterdir())
        print(f"inputs: 1 base + {args.experts} experts, {n_params:,} params each, {size / 1e9:.2f} GB "
              f"in {work} (prepared in {time.perf_counter() - t0:.0f} s)")

        available = installed_methods()
        cli = [str(Path(sys.executable).with_name("mergebench"))]
        inputs = [str(base)] + [str(e) for e in experts]
        rows: list[tuple[str, list[str] | None, str]] = [
            ("floor (read + sum)", [sys.executable, __file__, "--floor-child", *inputs], "")]
        for method in args.methods.split(","):
            if method not in available:
                rows.append((method, None, "not installed, skipped"))
                continue
            cmd = cli + ["merge", "--method", method, "--base", str(base), "--models",
                         *map(str, experts), "--out", str(out)]
            rows.append((method, cmd, "defaults"))

        results = []
        for name, cmd, note in rows:
            if cmd is None:
                results.append((name, None, None, None, note))
                continue
            runs = [measure(cmd) for _ in range(args.repeat)]
            bad = [r for r in runs if r[2] != 0]
            if bad:
                results.append((name, None, None, None, f"failed (exit {bad[0][2]})"))
                continue
            results.append((name, min(r[0] for r in runs), max(r[1] for r in runs), min(r[3] for r in runs), note))
            out.unlink(missing_ok=True)

        from tabulate import tabulate

        floor_s, floor_mb, floor_cpu = results[0][1], results[0][2], results[0][3]
        table = []
        for name, secs, mib, cpu, note in results:
            if secs is None:
                table.append([name, "", "", "", "", "", "", note])
                continue
            table.append([name, f"{secs:.1f}", f"{cpu:.1f}", f"{mib:,.0f}", f"{secs / floor_s:.2f}x",
                          f"{cpu / floor_cpu:.2f}x", f"{mib / floor_mb:.2f}x", note])
        load = os.getloadavg()[0]
        print(f"\n{os.cpu_count()} CPU cores, load average {load:.1f} at the end; best of {args.repeat} run(s) per row\n")
        print(tabulate(table, headers=["run", "wall s", "CPU s", "peak RSS MiB", "wall / floor", "CPU / floor",
                                       "RSS / floor", "note"], tablefmt="github"))
        return check_exact(base, experts) if args.check_exact else 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _seed(seed: int, key: str) -> int:
    """A stable per-(seed, tensor) seed; Python's str hash is salted per process."""
    return seed * 1_000_003 + zlib.crc32(key.encode())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    sys.exit(main())
