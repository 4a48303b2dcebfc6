"""Cells that cannot hurt each other: faulty methods fail their own cell, and the others' numbers are unchanged."""

import ctypes
import io
import json
import os
import signal
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mergebench_core import Method, MethodInfo, hookimpl
from mergebench_core import registry as registry_module
from mergebench_core.cli import main
from mergebench_core.results.store import CellResult, ResultStore
from mergebench_core.running import worker_setup
from mergebench_core.running.executors import ForkExecutor, Job, can_fork

pytestmark = pytest.mark.skipif(not can_fork(), reason="worker processes need fork")
POOL = "digits-mlp_TA8"
TWO = ["--tasks", "digits,rot90"]


@dataclass
class NoParams:
    pass


def faulty(name, action):
    """A method that does `action(pool, ctx)` and then returns the pretrained model."""

    class Faulty(Method):
        Params = NoParams
        info = MethodInfo()

        def run(self, pool, ctx):
            model = action(pool, ctx)
            from mergebench_core import MergeOutput
            return MergeOutput(model if model is not None else pool.load_model("_pretrained_"))

    Faulty.name = name
    Faulty.__doc__ = f"Fails on purpose: {name}."
    return Faulty


def _nan(pool, ctx, value=float("nan")):
    model = pool.load_model("_pretrained_")
    with torch.no_grad():
        model.fc2.weight[0, :3] = value
    return model


def _mutate_heads(pool, ctx):
    for head in ctx.taskpool.heads.values():
        with torch.no_grad():
            head.weight.mul_(-1.0)  # every later evaluation through these heads would be wrong


FAULTS = {
    "hangs": lambda pool, ctx: time.sleep(3600),
    "exits_hard": lambda pool, ctx: os._exit(1),
    "segfaults": lambda pool, ctx: ctypes.string_at(0),
    "exits_cleanly": lambda pool, ctx: sys.exit(0),
    "returns_nan": _nan,
    "returns_inf": lambda pool, ctx: _nan(pool, ctx, float("inf")),
    "mutates_heads": _mutate_heads,
    "sets_dtype": lambda pool, ctx: torch.set_default_dtype(torch.float64),
}
REASONS = {
    "hangs": "timeout: the cell ran past --cell-timeout",
    "exits_hard": "the worker exited with code 1",
    "segfaults": "killed by SIGSEGV",
    "exits_cleanly": "the cell called sys.exit(0)",
    "returns_nan": "fc2.weight has 3 NaN or infinite entries",
    "returns_inf": "fc2.weight has 3 NaN or infinite entries",
}


@pytest.fixture()
def faulty_plugins(monkeypatch):
    plugin = types.ModuleType("faulty_plugins")

    @hookimpl
    def register_methods(register):
        for name, action in FAULTS.items():
            register(faulty(name, action))

    plugin.register_methods = register_methods
    registry = registry_module.build_registry(extra_modules=[plugin])
    monkeypatch.setattr(registry_module, "_REGISTRY", registry)


def test_a_grid_of_faulty_methods_fails_only_their_cells(cli_env, capsys, faulty_plugins):
    assert main(["run", "-m", "task_arithmetic,ties", "-p", POOL, *TWO, "--store", "clean.sqlite"]) == 0
    clean = {r.method: r.metrics for r in ResultStore(cli_env / "clean.sqlite").all()}
    capsys.readouterr()

    # the faulty ones first, so that anything they leak would reach the good cells
    methods = ",".join([*FAULTS, "task_arithmetic", "ties"])
    assert main(["run", "-m", methods, "-p", POOL, *TWO, "--cell-timeout", "20"]) == 1
    out, err = capsys.readouterr()
    rows = {r.method: r for r in ResultStore(cli_env / "results.sqlite").all()}
    for name, reason in REASONS.items():
        assert rows[name].status == "failed" and reason in rows[name].error, (name, rows[name].error)
    assert "Fatal Python error: Segmentation fault" in rows["segfaults"].traceback  # its stack, kept with its row
    assert rows["mutates_heads"].status == "ok"  # it hurt only itself: negated heads, its own (bad) score
    assert rows["mutates_heads"].mean < rows["task_arithmetic"].mean
    assert "sets_dtype" in rows  # float64 weights meet float32 heads: ok or failed, but only its own cell
    for name in ("task_arithmetic", "ties"):  # after all of that, exactly a clean run's numbers
        assert rows[name].status == "ok" and rows[name].metrics == clean[name]
    assert "| task_arithmetic" in out and "| ties" in out  # the table is printed
    assert f"{sum(r.status != 'ok' for r in rows.values())} cell(s) failed" in err
    assert torch.get_default_dtype() == torch.float32  # nor did anything leak into this process


# -- a worker's death, and its driver's ---------------------------------------------------------------------------

def _blank(label):
    return lambda: CellResult("method", label, {}, "pool", "tasks")


def test_a_worker_killed_holding_the_progress_bar_lock_does_not_block_the_next_cell():
    from tqdm.auto import tqdm

    tqdm.get_lock()  # the driver's lock exists before the fork, as after the reference rows' progress bars

    def dies_holding_the_lock():
        tqdm.get_lock().acquire()
        os.kill(os.getpid(), signal.SIGKILL)

    def draws_bars():  # a cell's progress bars, as `ctx.track` draws them (off without a terminal, locked anyway)
        total = sum(tqdm(range(5), desc="after", leave=False, disable=None, file=io.StringIO()))
        with tqdm(total=3, disable=False, file=io.StringIO()) as bar:
            bar.update(3)
        return CellResult("method", "bars", {}, "pool", "tasks", mean=float(total))

    jobs = [Job("dies", dies_holding_the_lock, _blank("dies")), Job("bars", draws_bars, _blank("bars"))]
    rows = {job.label: row for job, row in ForkExecutor(jobs=1, timeout=20).run(jobs)}
    assert "killed by SIGKILL" in rows["dies"].error
    assert rows["bars"].status == "ok" and rows["bars"].mean == 10.0, rows["bars"].error  # not a timeout
    with tqdm(total=1, disable=False, file=io.StringIO()) as bar:  # nor is the driver's own lock held
        bar.update(1)


SEGFAULT = """
import ctypes, faulthandler, json
from mergebench_core.results.store import CellResult
from mergebench_core.running.executors import ForkExecutor, Job

faulthandler.enable()  # as pytest and `python -X faulthandler` do: every forked worker inherits it

def crashing_method():
    ctypes.string_at(0)

blank = lambda: CellResult("method", "crash", {}, "pool", "tasks")
[(job, row)] = ForkExecutor().run([Job("crash", crashing_method, blank)])
print(json.dumps({"error": row.error, "traceback": row.traceback}))
"""


def test_a_segfaulting_worker_prints_no_dump_and_its_row_keeps_the_stack(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", SEGFAULT], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Fatal Python error" not in done.stderr  # the terminal gets the one-line failure, not a page of dump
    row = json.loads(done.stdout.splitlines()[-1])
    assert "killed by SIGSEGV" in row["error"]
    assert "Fatal Python error: Segmentation fault" in row["traceback"]
    assert "in crashing_method" in row["traceback"]  # where it crashed


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting for a parent that will never reap it has ended)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("how", ["kernel", "watcher"])
def test_a_worker_dies_with_its_driver(how, monkeypatch):
    if how == "kernel" and not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    if how == "watcher":  # the portable fallback, as on macOS
        monkeypatch.setattr(worker_setup, "_ask_kernel", lambda parent: False)
    to_test, from_driver = os.pipe()
    driver = os.fork()
    if driver == 0:  # the driver: forks a worker, waits until it is set up, tells the test its pid, is killed
        try:
            ready_read, ready_write = os.pipe()
            parent = os.getpid()
            worker = os.fork()
            if worker == 0:
                try:
                    worker_setup.die_with_parent(parent)
                    os.write(ready_write, b"ready")
                    time.sleep(30)
                finally:
                    os._exit(0)
            os.read(ready_read, 5)
            os.write(from_driver, f"{worker}\n".encode())
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    os.close(from_driver)
    worker = int(os.read(to_test, 64).decode())
    os.close(to_test)
    os.waitpid(driver, 0)
    assert _gone_within(worker, 2.0), f"worker {worker} outlived its driver"


SLEEPY_GRID = """
import os, sys, time, types
from dataclasses import dataclass
import torch
from torch import nn
from mergebench_core import Method, MergeOutput, MethodInfo, ModelPool, TaskPool, hookimpl
from mergebench_core.contract import registry
from mergebench_core.cli import main

FOLDER = sys.argv[1]

@dataclass
class Params:
    n: int = 0

class Sleepy(Method):
    \"\"\"Says it started, then trains (sleeps) far longer than the test waits.\"\"\"
    name = "sleepy"
    Params = Params
    info = MethodInfo()

    def run(self, pool, ctx):
        with open(os.path.join(FOLDER, f"worker-{self.params.n}.pid"), "w") as fh:
            fh.write(str(os.getpid()))
        time.sleep(60)
        open(os.path.join(FOLDER, f"worker-{self.params.n}.done"), "w").close()
        return MergeOutput(pool.load_model("_pretrained_"))

class Pool(ModelPool):
    default_taskpool = "tasks"
    expert_names = ["t0", "t1"]
    def load_model(self, name):
        torch.manual_seed({"_pretrained_": 0, "t0": 1, "t1": 2}[name])
        return nn.Linear(2, 2)

class Tasks(TaskPool):
    tasks = ["t0", "t1"]
    def batches(self, task, split="test", *, batch_size=256, limit=None):
        yield torch.eye(2), torch.tensor([0, 1])
    def logits(self, model, task, inputs):
        return model(inputs)

plugin = types.ModuleType("sleepy_plugin")
plugin.register_methods = hookimpl(lambda register: register(Sleepy))
plugin.register_modelpools = hookimpl(lambda register: register("pool", Pool))
plugin.register_taskpools = hookimpl(lambda register: register("tasks", Tasks))
registry._REGISTRY = registry.build_registry(entry_points=[], extra_modules=[plugin])
sys.exit(main(["run", "-m", "sleepy", "-p", "pool", "sleepy.n=1,2", "--jobs", "2"]))
"""


def test_killing_the_driver_of_a_grid_ends_its_workers(tmp_path):
    script = tmp_path / "grid.py"
    script.write_text(SLEEPY_GRID)
    env = dict(os.environ, OMP_NUM_THREADS="1", MERGEBENCH_CACHE=str(tmp_path / "cache"),
               MERGEBENCH_STORE=str(tmp_path / "results.sqlite"), PYTHONPATH=os.pathsep.join(sys.path))
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env, cwd=tmp_path, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        pids = []
        while len(pids) < 2:  # both cells running at once (--jobs 2)
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the cells never started"
            time.sleep(0.1)
            pids = [int(text) for text in (p.read_text() for p in tmp_path.glob("worker-*.pid")) if text]
    finally:
        driver.kill()
        driver.wait()
        log.close()
    for pid in pids:
        assert _gone_within(pid, 2.0), f"worker {pid} outlived its killed driver"
    assert not list(tmp_path.glob("worker-*.done"))
