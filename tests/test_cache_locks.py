"""Where the content cache keeps its locks, who takes them, and what counts as a cached entry: the lock files stay in
one `locks/` folder (the entries' folders hold entries only), activations are saved under their entries' locks, and
a trained model counts as cached only when the cache would use it."""

from __future__ import annotations

import multiprocessing
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from mergebench_core.cache import ContentCache, Entry
from mergebench_core.contract.api import TaskPool
from mergebench_core.data.statistics import StatsCache, StatsKey
from mergebench_core.fusion.alignment import collect_activations
from mergebench_core.training.methods import TrainedModelCache

KEY = {"what": "features", "pool": "digits", "n": 32}
RECIPE = {"method": "finetune", "tasks": ["digits"], "seed": 0}


def _flip_data_byte(path: Path) -> None:
    """Change one byte of tensor data behind a valid safetensors header."""
    raw = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    raw[8 + header_len + 3] ^= 0xFF
    path.write_bytes(bytes(raw))


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# -- lock files -----------------------------------------------------------------------------------------------------

def test_lock_files_live_under_locks_and_the_entries_folders_hold_entries_only(tmp_path):
    cache = ContentCache(tmp_path)
    path = cache.entry_path(KEY)
    cache.get_or_build(KEY, lambda: Entry({"w": torch.ones(2)}))
    assert _files(tmp_path) == sorted([f"locks/{path.name}.lock", path.name])

    trained = TrainedModelCache(tmp_path / "trained")
    model = trained.path(RECIPE)
    trained.get_or_build(trained.recipe_key(RECIPE), lambda: Entry({"w": torch.ones(2)}))
    assert _files(tmp_path / "trained" / "finetune") == [model.name]  # no `.NAME.lock` beside the model
    assert trained.lock_file(model) == tmp_path / "trained" / "locks" / "finetune" / f"{model.name}.lock"
    assert trained.lock_file(model).is_file()


def _hold_lock(cache_root: Path, held, release) -> None:
    cache = ContentCache(cache_root)
    with cache.lock(cache.entry_path(KEY), "the contested entry"):
        held.set()
        release.wait(10)


def test_the_lock_in_locks_is_the_one_every_process_takes(tmp_path):
    """While another process holds an entry's lock, building that entry waits for it (so the lock that moved to
    `locks/` is still one lock per entry, shared by processes)."""
    ctx = multiprocessing.get_context("fork")
    held, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(tmp_path, held, release))
    proc.start()
    try:
        assert held.wait(10)
        cache = ContentCache(tmp_path)
        timer = ctx.Process(target=lambda: (time.sleep(0.5), release.set()))
        timer.start()
        start = time.monotonic()
        cache.get_or_build(KEY, lambda: Entry({"w": torch.ones(2)}))
        assert time.monotonic() - start >= 0.4
        timer.join(10)
    finally:
        release.set()
        proc.join(10)


# -- activations are saved under their entries' locks ---------------------------------------------------------------

class Doubler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(2, 2)
        with torch.no_grad():
            self.proj.weight.copy_(2 * torch.eye(2))
            self.proj.bias.zero_()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.proj(x)


class OneTask(TaskPool):
    name = "one-task"

    @property
    def tasks(self) -> list[str]:
        return ["a"]

    def batches(self, task: str, split: str = "test", *, batch_size: int = 256,
                limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x = torch.arange(8, dtype=torch.float32).view(4, 2)[:limit]
        yield x, torch.zeros(len(x), dtype=torch.long)

    def logits(self, model: nn.Module, task: str, inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs)


ACT_KEY = StatsKey("pool/m", "one-task/a", "activations-train-proj", 4, 0)
BUILT_ELSEWHERE = torch.full((4, 2), 7.0)


def _build_activations_elsewhere(root: Path, held) -> None:
    cache = StatsCache(root)
    with cache.lock(cache.path(ACT_KEY), "activations"):
        held.set()
        time.sleep(1.0)  # the other process arrives, misses, and must wait here
        cache.save(ACT_KEY, {"activations": BUILT_ELSEWHERE})


def test_activations_another_process_is_building_are_waited_for_and_read(tmp_path):
    ctx = multiprocessing.get_context("fork")
    held = ctx.Event()
    proc = ctx.Process(target=_build_activations_elsewhere, args=(tmp_path, held))
    proc.start()
    try:
        assert held.wait(10)
        model, cache = Doubler(), StatsCache(tmp_path)
        acts = collect_activations(model, OneTask(), ["a"], ["proj"], n_examples=4, cache=cache,
                                   model_identity="pool/m")
    finally:
        proc.join(10)
    assert model.calls == 0 and torch.equal(acts["proj"], BUILT_ELSEWHERE)
    assert (cache.hits, cache.misses) == (1, 0)
    # with nobody building, a miss runs the model once and stores its activations: 2·x
    other = collect_activations(model, OneTask(), ["a"], ["proj"], n_examples=3, cache=cache, model_identity="pool/m")
    assert model.calls == 1 and torch.equal(other["proj"], 2 * torch.arange(6.0).view(3, 2))
    assert (cache.hits, cache.misses) == (1, 1)


# -- is a trained model cached? -------------------------------------------------------------------------------------

def test_a_damaged_or_old_trained_model_does_not_count_as_cached(tmp_path, caplog):
    cache = TrainedModelCache(tmp_path)
    assert not cache.holds(RECIPE)
    path = cache.save(RECIPE, {"w": torch.arange(6.0)})
    assert cache.holds(RECIPE)
    _flip_data_byte(path)
    fresh = TrainedModelCache(tmp_path)
    assert path.is_file() and not fresh.holds(RECIPE)
    assert "does not match its digest" in caplog.text
    # a file of the format before digests, under the right name, is not a model of this recipe either
    from safetensors.torch import save_file

    save_file({"w": torch.arange(6.0)}, str(path), metadata={"mergebench.method": "finetune"})
    assert not TrainedModelCache(tmp_path).holds(RECIPE)
    cache.save(RECIPE, {"w": torch.arange(6.0)})
    assert TrainedModelCache(tmp_path).holds(RECIPE)


def test_eval_only_refuses_a_damaged_trained_model_before_running_anything(cli_env, session_cache, monkeypatch,
                                                                             capsys):
    """`--eval-only` checks every model it needs before any cell runs: a damaged file is reported there as not
    trained (and is neither used nor retrained), exactly like a missing one."""
    from mergebench_core.cli import main
    from mergebench_core.results.store import ResultStore

    cache = cli_env / "cache"
    (cache / "pools").mkdir(parents=True)
    (cache / "pools" / "digits").symlink_to(session_cache / "pools" / "digits")
    monkeypatch.setenv("MERGEBENCH_CACHE", str(cache))
    argv = ["run", "-m", "linear_scalarization", "-p", "digits-mlp_TA8", "--tasks", "digits",
            "linear_scalarization.steps=5"]
    assert main(argv) == 0
    [model] = (cache / "trained" / "linear_scalarization").glob("*.safetensors")
    rows = len(ResultStore(cli_env / "results.sqlite").all())
    _flip_data_byte(model)
    damaged = model.read_bytes()
    capsys.readouterr()

    assert main([*argv, "--rerun", "--eval-only"]) == 2
    err = capsys.readouterr().err
    assert "never trained" in err and "linear_scalarization on digits-mlp_TA8[digits]" in err
    assert model.read_bytes() == damaged and len(ResultStore(cli_env / "results.sqlite").all()) == rows
