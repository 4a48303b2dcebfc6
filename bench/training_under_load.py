"""Training steps on a loaded machine: OpenMP's spinning threads against the default wait policy of mergebench.

Each trial runs 200 Adam steps of the digits MLP's shape (64-128-128-10, batch 32) in a fresh process with two torch
threads, while `--burners` busy processes keep every core loaded, as other jobs (or other cells) do on a shared
machine. "before": torch imported on its own, with libgomp's default wait policy (threads that wait spin first).
"after": torch imported through mergebench_core, which sets OMP_WAIT_POLICY=PASSIVE unless the user chose one.
A third line, one torch thread, is the floor both should approach.

    python bench/training_under_load.py --burners 6 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

STEPS = """
import time, torch
from torch import nn
torch.set_num_threads({threads})
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
opt = torch.optim.Adam(model.parameters(), 1e-3)
x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
start = time.perf_counter()
for _ in range(200):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
print(time.perf_counter() - start)
"""

VARIANTS = {
    "before (torch alone, 2 threads)": ("", 2),
    "after (through mergebench_core, 2 threads)": ("import mergebench_core\n", 2),
    "floor (1 thread)": ("", 1),
}


def trial(prelude: str, threads: int) -> float:
    out = subprocess.run([sys.executable, "-c", prelude + STEPS.format(threads=threads)], check=True,
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    return float(out.stdout.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burners", type=int, default=6, help="busy processes that load the machine")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    burn = "import time\nt = time.time()\nwhile time.time() - t < 3600: pass\n"
    burners = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(args.burners)]
    try:
        time.sleep(1.0)
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.repeats):  # interleaved, so a change in load hits every variant alike
            for name, (prelude, threads) in VARIANTS.items():
                times[name].append(trial(prelude, threads))
    finally:
        for p in burners:
            p.kill()
    print(f"200 training steps with {args.burners} busy processes on the machine; seconds over {args.repeats} runs")
    for name, values in times.items():
        print(f"{name:45s} min {min(values):7.2f}  median {statistics.median(values):7.2f}  max {max(values):7.2f}")
    before = statistics.median(times["before (torch alone, 2 threads)"])
    after = statistics.median(times["after (through mergebench_core, 2 threads)"])
    print(f"median before/after: {before / after:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
