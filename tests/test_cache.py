"""The content-addressed cache (`mergebench_core.cache`) and its clients: keys stored and verified, a digest of the
data checked on every read, one lock per entry, atomic writes, refusal of non-finite values, write errors that name
the path."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import multiprocessing
import os
import struct
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from mergebench_core import cache as cache_module
from mergebench_core.cache import CacheWriteError, ContentCache, Entry, key_digest
from mergebench_core.data.statistics import StatsCache, StatsKey
from mergebench_core.training.methods import TrainedModelCache

KEY = {"what": "features", "pool": "digits", "n": 32}


def _entry(value: float = 1.0) -> Entry:
    return Entry({"w": torch.full((3, 4), value), "steps": torch.tensor([7], dtype=torch.int64)}, {"value": [value]})


def _flip_data_bytes(path: Path, at: int = 5) -> None:
    """Change one byte of tensor data, leaving the safetensors header (and so every header check) valid."""
    raw = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    raw[8 + header_len + at] ^= 0xFF
    path.write_bytes(bytes(raw))


def _set_metadata(path: Path, field: str, value: str) -> None:
    """Rewrite one metadata field by hand (the header is re-serialised, the data bytes are kept)."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    header["__metadata__"][field] = value
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + header_len:])


# -- keys -----------------------------------------------------------------------------------------------------------

def test_an_entry_round_trips_with_its_manifest(tmp_path):
    cache = ContentCache(tmp_path)
    path = cache.put(KEY, _entry(2.5))
    assert path == tmp_path / f"{key_digest(KEY)}.safetensors"
    got = cache.get(KEY)
    assert got is not None and got.manifest == {"value": [2.5]}
    assert torch.equal(got.tensors["w"], torch.full((3, 4), 2.5)) and got.tensors["steps"].tolist() == [7]
    assert cache.get({**KEY, "n": 33}) is None  # another key, another entry
    only_manifest = cache.put({"what": "gram"}, Entry(manifest={"gram": [[1.0, 0.5], [0.5, 1.0]]}))
    assert only_manifest.is_file() and cache.get({"what": "gram"}) == Entry({}, {"gram": [[1.0, 0.5], [0.5, 1.0]]})


def test_an_entry_under_another_key_is_a_miss(tmp_path, caplog):
    cache = ContentCache(tmp_path)
    other = {**KEY, "pool": "other"}
    cache.put(other, _entry(9.0))
    cache.entry_path(other).rename(cache.entry_path(KEY))  # a collision: another key's entry under KEY's name
    with caplog.at_level(logging.WARNING):
        assert cache.get(KEY, "the features") is None
    assert f"the features at {cache.entry_path(KEY)} is not used" in caplog.text and "another key" in caplog.text
    built = cache.get_or_build(KEY, lambda: _entry(1.0))
    assert torch.equal(built.tensors["w"], torch.ones(3, 4)) and (cache.hits, cache.misses) == (0, 1)
    assert cache.get(KEY).manifest == {"value": [1.0]}  # the wrong entry was replaced


def test_a_hand_edited_key_or_manifest_is_a_miss(tmp_path, caplog):
    cache = ContentCache(tmp_path)
    path = cache.put(KEY, _entry())
    _set_metadata(path, cache_module.MANIFEST_FIELD, json.dumps({"value": [100.0]}))
    with caplog.at_level(logging.WARNING):
        assert cache.get(KEY) is None
    assert "does not match its digest" in caplog.text
    cache.put(KEY, _entry())
    _set_metadata(path, cache_module.KEY_FIELD, json.dumps({**KEY, "n": 64}, sort_keys=True))
    assert cache.get(KEY) is None


def test_keys_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="cache key .* is not JSON"):
        ContentCache(tmp_path).get({"model": object()})


def test_entries_of_the_previous_format_are_rebuilt(tmp_path, caplog):
    from mergebench_core.engine.tensors import save_state_dict

    cache = ContentCache(tmp_path)
    save_state_dict({"w": torch.ones(2)}, cache.entry_path(KEY), metadata={"mergebench.recipe": json.dumps(KEY)})
    with caplog.at_level(logging.WARNING):
        assert cache.get(KEY) is None
    assert "cache format 1" in caplog.text
    assert cache.get_or_build(KEY, lambda: _entry(4.0)).manifest == {"value": [4.0]}
    assert cache.get(KEY) is not None


# -- the digest of the data -----------------------------------------------------------------------------------------

def test_flipped_data_bytes_behind_a_valid_header_are_never_used_but_rebuilt(tmp_path, caplog):
    cache = ContentCache(tmp_path)
    path = cache.put(KEY, _entry(1.0))
    _flip_data_bytes(path)
    from mergebench_core.engine.tensors import read_safetensors_header

    read_safetensors_header(path)  # the header is still valid: only the digest can tell
    builds = []
    with caplog.at_level(logging.WARNING):
        got = cache.get_or_build(KEY, lambda: builds.append(1) or _entry(1.0), "the features")
    assert builds == [1] and torch.equal(got.tensors["w"], torch.ones(3, 4))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # looked at twice (before and after the lock), reported once
    assert f"{path} is not used: its data does not match its digest" in warnings[0]
    assert torch.equal(cache.get(KEY).tensors["w"], torch.ones(3, 4))  # the damaged file was replaced


def test_a_damaged_trained_model_is_not_loaded(tmp_path, caplog):
    """The failure this digest exists for: a trained expert whose bytes changed on disk scored 16 % instead of 96 %
    with exit status 0. Now `load` refuses it (naming the file) and the training method retrains."""
    cache = TrainedModelCache(tmp_path)
    recipe = {"method": "finetune", "params": {"lr": 0.1}, "tasks": ["digits"], "seed": 0}
    state = {"0.weight": torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), "0.bias": torch.zeros(16)}
    path = cache.save(recipe, state)
    assert path == tmp_path / "finetune" / f"{cache.digest(recipe)}.safetensors" and cache.trainings == 1
    assert all(torch.equal(cache.load(recipe)[k], state[k]) for k in state)
    _flip_data_bytes(path, at=200)
    with caplog.at_level(logging.WARNING):
        assert cache.load(recipe) is None
    assert f"trained model of finetune (recipe {cache.digest(recipe)}) at {path} is not used" in caplog.text


def test_the_recipe_hash_and_statistic_file_names_are_those_of_the_previous_version(tmp_path):
    """A derived pool's expert identity is its recipe hash, and identities are in stored cell keys and statistics
    keys: the hash must stay what it was (sha256 of the recipe's sorted JSON, non-JSON values as str)."""
    recipe = {"method": "finetune", "params": {"lr": 1e-4, "betas": (0.9, 0.99)}, "pretrained": Path("/m"),
              "preference": None, "seed": 3}
    old = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:24]
    assert TrainedModelCache.digest(recipe) == old
    assert TrainedModelCache(tmp_path).path(recipe) == tmp_path / "finetune" / f"{old}.safetensors"
    key = StatsKey("pool/a", "tiny/a", "fisher_sampled", 20, 0)
    old_name = hashlib.sha256(json.dumps(asdict(key), sort_keys=True).encode()).hexdigest()[:24]
    assert StatsCache(tmp_path).path(key) == tmp_path / f"fisher_sampled-{old_name}.safetensors"
    assert key.filename() == StatsCache(tmp_path).path(key).name


# -- writing --------------------------------------------------------------------------------------------------------

def test_non_finite_values_are_refused_naming_the_entry(tmp_path):
    cache = ContentCache(tmp_path)
    bad = Entry({"g": torch.tensor([1.0, float("nan"), float("inf")])})
    with pytest.raises(CacheWriteError, match=r"the gram of pool/m came out with 2 non-finite values \(2 in tensor "
                                              r"'g'\); not cached"):
        cache.get_or_build(KEY, lambda: bad, "the gram of pool/m")
    assert not cache.entry_path(KEY).exists() and not list(tmp_path.glob("*.safetensors"))
    stats = StatsCache(tmp_path / "stats")
    with pytest.raises(CacheWriteError, match=str(stats.path(StatsKey("p/m", "t/a", "fisher", 4, 0)))):
        stats.save(StatsKey("p/m", "t/a", "fisher", 4, 0), {"f": torch.tensor([float("inf")])})


def test_the_file_is_synced_under_a_temporary_name_in_its_folder_then_renamed(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(cache_module.os, "fsync", lambda fd: (events.append(("fsync", Path(os.readlink(
        f"/proc/self/fd/{fd}")))), real_fsync(fd)))
    monkeypatch.setattr(cache_module.os, "replace", lambda a, b: (events.append(("rename", Path(a), Path(b))),
                                                                  real_replace(a, b)))
    cache = ContentCache(tmp_path)
    path = cache.put(KEY, _entry())
    (_, tmp), rename, folder = events[-3:]
    assert tmp.parent == path.parent and tmp.name.startswith(f".{path.name}.") and tmp.name.endswith(".partial")
    assert rename == ("rename", tmp, path)  # synced under its temporary name first, then renamed onto the entry
    assert folder == ("fsync", path.parent)  # and the folder, so that the rename itself survives a crash
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left


def test_a_full_disk_names_the_path_and_leaves_nothing(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache_module.os, "fsync", full)
    cache = ContentCache(tmp_path)
    with pytest.raises(CacheWriteError) as info:
        cache.get_or_build(KEY, _entry, "the features of digits")
    message = str(info.value)
    assert f"cannot write the features of digits to {cache.entry_path(KEY)}: No space left on device" in message
    assert "MERGEBENCH_CACHE" in message
    assert [p.name for p in tmp_path.iterdir()] == ["locks"]  # the entry's lock, in its own folder; no entry


def test_a_cache_folder_that_cannot_be_written_names_the_path(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder should be")
    cache = ContentCache(blocked / "cache")
    with pytest.raises(CacheWriteError, match=f"cannot write the features to {cache.entry_path(KEY)}"):
        cache.put(KEY, _entry(), "the features")
    with pytest.raises(CacheWriteError, match=f"cannot write the lock of the features to .*{blocked}/cache"):
        cache.get_or_build(KEY, _entry, "the features")


def test_a_read_only_cache_is_read_without_a_lock(tmp_path, monkeypatch):
    cache = ContentCache(tmp_path)
    cache.put(KEY, _entry(3.0))

    def no_lock(*args, **kwargs):
        raise AssertionError("a cache hit must take no lock")

    monkeypatch.setattr(cache_module, "build_lock", no_lock)
    assert cache.get_or_build(KEY, _entry).manifest == {"value": [3.0]} and cache.hits == 1


def _build_in_a_process(start, root: Path, counter: Path, answer: Path) -> None:
    torch.set_num_threads(1)  # OpenMP's pool does not survive fork
    cache = ContentCache(root)

    def build() -> Entry:
        with open(counter, "a") as fh:  # every build, in any process, leaves a line
            fh.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # hold the lock while the other process arrives
        return Entry({"w": torch.full((4,), float(os.getpid()))})

    start.wait()
    answer.write_text(json.dumps(cache.get_or_build(KEY, build, "the contested entry").tensors["w"].tolist()))


def test_two_processes_building_one_entry_build_it_once(tmp_path):
    ctx = multiprocessing.get_context("fork")  # the barrier is inherited, not pickled
    start, counter = ctx.Barrier(2), tmp_path / "builds.txt"
    answers = [tmp_path / f"answer{i}.json" for i in range(2)]
    procs = [ctx.Process(target=_build_in_a_process, args=(start, tmp_path / "cache", counter, a)) for a in answers]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert len(counter.read_text().splitlines()) == 1  # the second process waited, looked again, and read it
    assert json.loads(answers[0].read_text()) == json.loads(answers[1].read_text())
