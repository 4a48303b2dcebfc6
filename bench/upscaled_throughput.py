"""Evaluation throughput of upscaled models against the merged static model they start from.

For a pool (default the embedded `digits-mlp_TA8`), builds task arithmetic (the static model: one set of weights)
and each upscaled method (`smile`, `wemoe`, `sparse_wemoe`, `rankone_moe`, `pwe_moe` at the uniform preference), then
times the scoring forward pass — the task pool's logits on the tasks' test batches, in inference mode, routing per sample as the harness scores them —
and prints examples per second, the slowdown against the static model, and each model's `params ×`. Routers that
train at test time are timed untrained (`steps=0`): their values do not change the cost of a forward pass. Not part
of the test suite.

    python bench/upscaled_throughput.py
    python bench/upscaled_throughput.py --pool clip-vit-b32_TA8 --device cuda --batch-size 64 --limit 512

Last printed (2026-12-05, 1 CPU thread, digits-mlp_TA8, batch 256, every test example of the 8 tasks): see the README
section "Upscaled models".
"""

from __future__ import annotations

import argparse
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", default="digits-mlp_TA8")
    parser.add_argument("--methods", default="smile,wemoe,sparse_wemoe,rankone_moe,pwe_moe")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--limit", type=int, default=None, help="test examples per task (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (ignored on cuda)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many passes")
    args = parser.parse_args()

    import torch
    from tabulate import tabulate

    from mergebench_core import RunContext
    from mergebench_core.contract.registry import get_registry
    from mergebench_core.pools.params import make_pool
    from mergebench_core.pools.views import PoolName
    from mergebench_core.upscaling import count_parameters

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    registry = get_registry()
    pool = make_pool(registry.modelpool(args.pool), PoolName.parse(args.pool))
    if pool.default_taskpool is None:
        raise SystemExit(f"pool {args.pool!r} names no task pool to score it")
    taskpool = make_pool(registry.taskpool(pool.default_taskpool), PoolName.parse(pool.default_taskpool))
    ctx = RunContext(taskpool=taskpool, device=device, tasks=tuple(taskpool.tasks))
    batches = {t: [x for x, _ in taskpool.batches(t, "test", batch_size=args.batch_size, limit=args.limit)]
               for t in taskpool.tasks}
    examples = sum(len(x) for xs in batches.values() for x in xs)
    base_size = count_parameters(pool.load_model("_pretrained_"))

    def timed(model: torch.nn.Module) -> float:
        model = model.to(device).eval()
        best = float("inf")
        with torch.inference_mode():
            taskpool.logits(model, taskpool.tasks[0], batches[taskpool.tasks[0]][0].to(device))  # warm up
            for _ in range(args.repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                for task, xs in batches.items():
                    for x in xs:
                        taskpool.logits(model, task, x.to(device, non_blocking=True))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                best = min(best, time.perf_counter() - start)
        return examples / best

    def build(name: str, **overrides: object) -> torch.nn.Module:
        cls = registry.method(name)
        params = cls.Params(**{k: v for k, v in overrides.items() if k in cls.Params.__dataclass_fields__})
        return cls(params).run(pool, ctx).model

    static = timed(build("task_arithmetic"))
    rows = [["task_arithmetic (static)", f"{static:,.0f}", "1.00", "1.00"]]
    for name in args.methods.split(","):
        model = build(name, steps=0)
        speed = timed(model)
        rows.append([name, f"{speed:,.0f}", f"{static / speed:.2f}", f"{count_parameters(model) / base_size:.2f}"])
        print(f"{name}: {speed:,.0f} examples/s", file=sys.stderr, flush=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"{args.pool}, {examples} test examples, batch {args.batch_size}, {where}, torch {torch.__version__}\n")
    print(tabulate(rows, headers=["model", "examples/s", "slowdown", "params ×"], tablefmt="github"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
