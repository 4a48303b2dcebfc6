"""First versus later evaluation of one CLIP vision tower on a CLIP task pool (offline stand-ins).

The first evaluation decodes every test image (PNG), converts it to RGB, resizes and crops it with the base model's
processor and builds the zero-shot heads; later evaluations read uint8 pixels from the memory-mapped cache and the
heads from safetensors, so they are pure model compute. The stand-ins are a small random CLIP at 224x224 (so the
processor does the real resize work) and random images of realistic sizes under the real hub ids and the documented
$MERGEBENCH_CLIP_DATA_DIR override.

    python bench/clip_eval_cache.py --images 128 --tasks 8
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128, help="test images per task")
    parser.add_argument("--tasks", type=int, default=8, help="how many TA8 tasks to score")
    parser.add_argument("--later", type=int, default=2, help="later evaluations to time (the best is reported)")
    parser.add_argument("--workdir", help="keep the stand-ins here (default: a temporary folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    root = Path(args.workdir or tempfile.mkdtemp(prefix="mb-clip-bench-"))
    from mergebench_clip_tasks.testing import build_offline_world

    t = time.perf_counter()
    world = build_offline_world(root / "world", "b32", "TA8", n_images=args.images, image_sides=(240, 480),
                                image_size=224, patch_size=32, hidden=64)
    print(f"built stand-ins in {time.perf_counter() - t:.1f} s: {args.images} images per task, "
          f"sides 240-480 px, CLIP ViT (hidden 64, 2 layers, 224 px, patch 32)")
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(world.hub_cache),
                      MERGEBENCH_CLIP_DATA_DIR=str(world.data_dir))

    from mergebench_core import PRETRAINED
    from mergebench_core.data.evaluation import evaluate
    from mergebench_clip import CLIPVisionPool
    from mergebench_clip_tasks import CLIPZeroShotTaskPool

    tasks = world.tasks[: args.tasks]
    model = CLIPVisionPool("b32", "TA8").load_model(PRETRAINED)
    cache = root / "cache"

    def run() -> float:
        pool = CLIPZeroShotTaskPool("b32", "TA8", tasks=tasks, cache_root=cache)  # a fresh pool: nothing in memory
        t0 = time.perf_counter()
        evaluate(pool, model, tasks=tasks, batch_size=64)
        return time.perf_counter() - t0

    first = run()
    later = min(run() for _ in range(args.later))
    n = args.images * len(tasks)
    print(f"first evaluation (decode + preprocess + heads): {first:7.2f} s  ({n / first:7.1f} images/s)")
    print(f"later evaluation (memory-mapped pixels):        {later:7.2f} s  ({n / later:7.1f} images/s)")
    print(f"ratio first/later: {first / later:.1f}x  ({len(tasks)} tasks, {n} images, "
          f"{os.cpu_count()} CPU cores)")
    return 0 if first / later >= 5 else 1


if __name__ == "__main__":
    sys.exit(main())
