"""Processes sharing a cache: forced races on the same cache entry build it once and never show a torn file; torn or
non-finite cache entries are rebuilt instead of failing until deleted by hand."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergebench_core.errors import MergebenchError
from mergebench_core.locks import build_lock, read_json, write_text_atomic
from mergebench_core.data.statistics import StatsCache, StatsKey
from mergebench_core.engine.tensors import load_state_dict, save_state_dict

TINY = {"hidden": 16, "features": 8, "pretrain_steps": 20, "finetune_steps": 5, "tasks": ["digits", "rot90"]}
"""A digits pool recipe that builds in about a second (its own cache folder: nothing shared with other tests)."""


def _race(target, *args, n: int = 2, timeout: float = 300) -> list:
    """Run `target(start, *args)` in `n` forked processes and return what each returned. Every process waits at
    `start` (a barrier) before the contested work, so they collide; a process that raises fails the test."""
    ctx = multiprocessing.get_context("fork")  # workers inherit the imported modules: no start-up cost
    start, results = ctx.Barrier(n), ctx.Queue()

    def run(i: int) -> None:
        torch.set_num_threads(1)  # OpenMP's pool does not survive fork: a child that used it would wait forever
        try:
            results.put((i, "ok", target(start, *args)))
        except BaseException as exc:  # reported to the test, which fails with it
            results.put((i, "error", f"{type(exc).__name__}: {exc}"))

    procs = [ctx.Process(target=run, args=(i,)) for i in range(n)]
    for p in procs:
        p.start()
    answers = {}
    deadline = time.monotonic() + timeout
    while len(answers) < n:
        i, status, value = results.get(timeout=max(1.0, deadline - time.monotonic()))
        assert status == "ok", f"process {i}: {value}"
        answers[i] = value
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return [answers[i] for i in range(n)]


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].numpy().tobytes())
    return h.hexdigest()


def _no_partials(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if p.name.endswith(".partial")]


def _build_digits(start, root: Path) -> dict:
    import mergebench_digits as md

    builds = []
    original = md.build

    def counted(recipe, folder):  # hold the build open, so the other process surely arrives while it runs
        builds.append(1)
        time.sleep(1.0)
        original(recipe, folder)

    md.build = counted
    recipe = md.Recipe(**{**TINY, "tasks": tuple(TINY["tasks"])})
    start.wait()
    folder = md.ensure_built(recipe, root)
    pool = md.DigitsModelPool(recipe, root)
    state = {f"{name}/{k}": v for name in [md.PRETRAINED, *recipe.tasks] for k, v in pool.state_dict(name).items()}
    return {"builds": len(builds), "digest": _digest(state), "folder": str(folder)}


def test_two_processes_building_the_same_digits_pool_build_it_once(tmp_path):
    import sklearn.datasets  # noqa: F401  (imported once here, not in each forked process: seconds under load)

    root = tmp_path / "cache"
    answers = _race(_build_digits, root)
    assert sum(a["builds"] for a in answers) == 1  # the second process waited for the first one's build
    assert answers[0]["digest"] == answers[1]["digest"]  # and read the very same tensors
    folder = Path(answers[0]["folder"])
    assert read_json(folder / "recipe.json")["hidden"] == 16
    _no_partials(root)


def _compute_statistic(start, cache: Path) -> dict:
    computed = []

    def compute():  # different numbers in each process: identical answers prove one computation, shared
        computed.append(1)
        time.sleep(1.0)
        g = torch.Generator().manual_seed(os.getpid())
        return {"layer.weight": torch.rand(64, 64, generator=g), "layer.bias": torch.rand(64, generator=g)}

    start.wait()
    got = StatsCache(cache).get_or_compute(StatsKey("pool/model", "tasks/digits", "fisher", 32, 0), compute)
    return {"computed": len(computed), "digest": _digest(got)}


def test_two_processes_computing_the_same_statistic_compute_it_once(tmp_path):
    cache = tmp_path / "stats"
    answers = _race(_compute_statistic, cache)
    assert sum(a["computed"] for a in answers) == 1
    assert answers[0]["digest"] == answers[1]["digest"]
    stored = StatsCache(cache).load(StatsKey("pool/model", "tasks/digits", "fisher", 32, 0))
    assert stored is not None and _digest(stored) == answers[0]["digest"]
    _no_partials(cache)


def _rewrite(start, target: Path, rounds: int) -> dict:
    value = float(os.getpid())
    tensors = {f"t{i}": torch.full((256, 256), value) for i in range(8)}
    start.wait()
    for _ in range(rounds):
        save_state_dict(tensors, target)
    return {"value": value}


def test_writers_racing_on_one_file_never_show_a_torn_file(tmp_path):
    """The atomic-write helper under a forced race: two processes rewrite the same safetensors file as fast as they
    can while this one reads it; every read is one writer's whole file (with one shared temporary name, a writer
    truncated the other's bytes, renamed a half-written file into place, or failed with FileNotFoundError)."""
    target = tmp_path / "shared.safetensors"
    seen: set[float] = set()
    reads = []

    def read_while_writing() -> None:
        while not stop.is_set():
            if not target.exists():
                continue
            tensors = load_file(str(target))  # one open of one file; raises on a torn file
            assert sorted(tensors) == [f"t{i}" for i in range(8)]
            values = {float(t.flatten()[0]) for t in tensors.values()}
            assert len(values) == 1 and all(bool((t == t.flatten()[0]).all()) for t in tensors.values())
            seen.update(values)
            reads.append(1)

    stop = threading.Event()
    failures = []
    reader = threading.Thread(target=lambda: _capture(read_while_writing, failures))
    reader.start()
    try:
        answers = _race(_rewrite, target, 40)
    finally:
        stop.set()
        reader.join()
    assert not failures, failures[0]
    assert reads and seen <= {a["value"] for a in answers}
    _no_partials(tmp_path)


def _capture(fn, failures: list) -> None:
    try:
        fn()
    except BaseException as exc:
        failures.append(f"{type(exc).__name__}: {exc}")


# -- torn and damaged cache entries are rebuilt -------------------------------------------------------------------

@pytest.fixture()
def tiny_digits(tmp_path, monkeypatch):
    """A tiny digits pool built in a temporary cache root, and a list that counts builds from now on."""
    import mergebench_digits as md

    recipe = md.Recipe(**{**TINY, "tasks": tuple(TINY["tasks"])})
    root = tmp_path / "digits"
    folder = md.ensure_built(recipe, root)
    builds: list[Path] = []
    original = md.build

    def counted(r, f):
        builds.append(f)
        original(r, f)

    monkeypatch.setattr(md, "build", counted)
    return md, recipe, root, folder, builds


def test_a_torn_recipe_json_is_rebuilt_not_a_permanent_failure(tiny_digits):
    md, recipe, root, folder, builds = tiny_digits
    before = load_state_dict(folder / "digits.safetensors")
    (folder / "recipe.json").write_text('{"seed": 0, "n_tr')  # torn mid-write (an old build killed, a full disk)
    assert md.ensure_built(recipe, root) == folder
    assert len(builds) == 1
    assert read_json(folder / "recipe.json") == json.loads(json.dumps(dataclasses.asdict(recipe)))
    pool = md.DigitsModelPool(recipe, root)
    after = pool.state_dict("digits")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the same deterministic build
    md.ensure_built(recipe, root)
    assert len(builds) == 1  # and then it is simply used


def test_a_truncated_checkpoint_in_a_built_pool_is_rebuilt(tiny_digits):
    md, recipe, root, folder, builds = tiny_digits
    path = folder / "rot90.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    md.ensure_built(recipe, root)
    assert len(builds) == 1
    assert set(load_state_dict(path)) == set(load_state_dict(folder / "digits.safetensors"))


def test_the_seeds_pool_rebuilds_a_torn_recipe_json(tmp_path, monkeypatch):
    import mergebench_digits_seeds as seeds

    recipe = seeds.SeedsRecipe(steps=3)
    root = tmp_path / "seeds"
    folder = seeds.ensure_built(recipe, root)
    builds = []
    original = seeds.build
    monkeypatch.setattr(seeds, "build", lambda r, f: (builds.append(f), original(r, f)))
    (folder / "recipe.json").write_text("{")
    assert seeds.ensure_built(recipe, root) == folder and len(builds) == 1
    seeds.ensure_built(recipe, root)
    assert len(builds) == 1


def test_a_non_finite_statistic_is_refused_on_read_and_recomputed(tmp_path, caplog):
    cache = StatsCache(tmp_path)
    key = StatsKey("pool/model", "tasks/digits", "fisher", 32, 0)
    poisoned = {"w": torch.ones(4, 4), "b": torch.tensor([1.0, float("nan"), float("inf"), 2.0])}
    save_state_dict(poisoned, cache.path(key), metadata=key.metadata())
    assert cache.load(key) is None
    assert f"{cache.path(key)} is not used" in caplog.text  # a hand-written file has no digest: never trusted
    calls = []
    good = {"w": torch.ones(4, 4), "b": torch.zeros(4)}
    got = cache.get_or_compute(key, lambda: calls.append(1) or good)
    assert calls == [1] and torch.equal(got["b"], good["b"])
    assert torch.equal(cache.load(key)["b"], good["b"])  # the file itself was replaced


def test_a_statistic_that_comes_out_non_finite_is_an_error_and_not_cached(tmp_path):
    cache = StatsCache(tmp_path)
    key = StatsKey("pool/model", "tasks/digits", "grams", 32, 0)
    with pytest.raises(MergebenchError, match="grams of pool/model on tasks/digits came out with 1 non-finite"):
        cache.get_or_compute(key, lambda: {"g": torch.tensor([1.0, float("nan")])})
    assert not cache.path(key).exists()


def test_write_text_atomic_and_read_json(tmp_path):
    path = tmp_path / "sub" / "f.json"
    write_text_atomic(path, json.dumps({"a": 1}))
    assert read_json(path) == {"a": 1}
    path.write_text("{")
    assert read_json(path) is None
    assert read_json(tmp_path / "missing.json") is None
    _no_partials(tmp_path)
    with build_lock(path, "x"):  # a lock beside the file, released after the block
        pass
    with build_lock(path, "x"):
        pass
