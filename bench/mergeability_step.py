"""Benchmark: the cost of one training step with the mergeability regularisers against plain fine-tuning.

Each recipe of the `mergeability` training method trains an expert from the pretrained model for a few steps through
the core's loop, and the table gives the best of 3 runs in milliseconds per step and the ratio to the plain step
(no regulariser): R2 (one extra pass over the parameters), R3 (double backward: the task gradient with
`create_graph=True`, then the backward of loss + λ₃‖∇L‖²), R3 computed every 4 steps (`grad_magnitude_every=4`),
and R2+R3. Two models: the embedded pool's MLP encoder (115k parameters, batch 64), and with `--vit` a small random
CLIP vision transformer (a stand-in for CLIP's, which is where R3's cost matters: attention's backward is itself
differentiated; hidden 128, 4 layers, 64 px images in 16 px patches, batch 32) scored through a fixed random head.

Run: `python bench/mergeability_step.py` (options: `--steps`, `--repeats`, `--vit`, `--device cuda`).
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import ClassVar

import torch
from mergebench_mergeability import Mergeability, Params
from torch import nn

from mergebench_core import PRETRAINED
from mergebench_core.training.loop import TrainConfig, train

RECIPES = {
    "plain": {},
    "R2": {"enable_moderate_update": True},
    "R3": {"enable_grad_magnitude": True},
    "R3 every 4": {"enable_grad_magnitude": True, "grad_magnitude_every": 4},
    "R2+R3": {"enable_moderate_update": True, "enable_grad_magnitude": True},
}


class RandomImages:
    """A task pool stand-in for the ViT: random images and labels, logits from a fixed random head on the pooled
    output (the loop only needs `tasks`, `batches` and `logits`)."""

    name = "random-images"
    tasks: ClassVar[list[str]] = ["t"]

    def __init__(self, hidden: int, image: int, n: int = 512, classes: int = 10):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, image, image, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.head = torch.randn(classes, hidden, generator=g) / hidden ** 0.5

    def batches(self, task, split="test", *, batch_size=256, limit=None):
        for i in range(0, len(self.y), batch_size):
            yield self.x[i:i + batch_size], self.y[i:i + batch_size]

    def logits(self, model, task, inputs):
        return model(pixel_values=inputs).pooler_output @ self.head.to(inputs.device).T


def time_recipes(make_model, taskpool, task: str, config: TrainConfig, steps: int, repeats: int,
                 device: torch.device) -> dict[str, float]:
    out = {}
    for label, switches in RECIPES.items():
        method = Mergeability(Params(steps=steps, batch_size=config.batch_size, **switches))
        best = float("inf")
        for repeat in range(repeats):
            model = make_model()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            train(model, taskpool, [task], method.loss, method.train_config(), seed=repeat, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, (time.perf_counter() - start) / steps)
        out[label] = best
    return out


def print_table(title: str, times: dict[str, float]) -> None:
    print(title)
    print(f"  {'recipe':<12} {'ms/step':>9} {'x plain':>8}")
    for label, t in times.items():
        print(f"  {label:<12} {1000 * t:>9.2f} {t / times['plain']:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps per run (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per recipe; the best is reported (default 3)")
    parser.add_argument("--vit", action="store_true", help="also a small random CLIP vision transformer")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    device = torch.device(args.device)
    print(f"best of {args.repeats} runs of {args.steps} steps, {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    from mergebench_digits import DigitsModelPool, DigitsTaskPool

    pool, taskpool = DigitsModelPool(), DigitsTaskPool()
    _ = pool.folder  # build (or find) the pool before any timing
    n = sum(p.numel() for p in pool.load_model(PRETRAINED).parameters())
    times = time_recipes(lambda: pool.load_model(PRETRAINED), taskpool, "digits", TrainConfig(batch_size=64),
                         args.steps, args.repeats, device)
    print_table(f"digits-mlp_TA8 encoder ({n:,} parameters), batch 64:", times)

    if args.vit:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        config = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                  num_attention_heads=4, image_size=64, patch_size=16)

        def vit() -> nn.Module:
            torch.manual_seed(0)
            return CLIPVisionModel(config)

        n = sum(p.numel() for p in vit().parameters())
        times = time_recipes(vit, RandomImages(128, 64), "t", TrainConfig(batch_size=32), args.steps,
                             args.repeats, device)
        print_table(f"random CLIP vision transformer ({n:,} parameters, 4 layers, 64 px / 16 px patches), "
                    f"batch 32:", times)


if __name__ == "__main__":
    main()
