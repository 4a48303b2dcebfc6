"""Hostile and malformed checkpoint files: each is refused by `mergebench merge` with exit status 2 and a message
that names the file and the problem, before any output exists."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from mergebench_core.cli import main
from mergebench_core.errors import CheckpointError
from mergebench_core.engine.tensors import SafetensorsSource, load_state_dict, save_state_dict

MODEL = {"w": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.ones(3)}


def raw_file(path, header, data=b"", pad=True):
    """A safetensors file written by hand, with whatever header the test wants."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def good_header():
    return {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "b": {"dtype": "F32", "shape": [3], "data_offsets": [24, 36]}}


def merge_against(tmp_path, capsys, expert, method="task_arithmetic"):
    """`mergebench merge` of a good base with `expert`: (exit status, stderr, whether any output was left)."""
    base = save_state_dict(MODEL, tmp_path / "base.safetensors")
    out = tmp_path / "out"
    rc = main(["merge", "-m", method, "--base", str(base), "--models", str(expert), "--out", str(out)])
    err = capsys.readouterr().err
    return rc, err, out.exists() and any(out.iterdir())


HOSTILE_HEADERS = {
    # name: (header, the words the error must contain)
    "negative offset": (dict(good_header(), b={"dtype": "F32", "shape": [3], "data_offsets": [-8, 4]}),
                        "data_offsets [-8, 4]"),
    "offsets reversed": (dict(good_header(), b={"dtype": "F32", "shape": [0], "data_offsets": [24, 12]}),
                         "0 <= start <= end"),
    "overlapping tensors": (dict(good_header(), b={"dtype": "F32", "shape": [3], "data_offsets": [12, 24]}),
                            "overlap"),
    "offsets past the data": (dict(good_header(), b={"dtype": "F32", "shape": [3], "data_offsets": [36, 48]}),
                              "is truncated"),
    "size not dtype x shape": (dict(good_header(), b={"dtype": "F32", "shape": [2], "data_offsets": [24, 36]}),
                               "has 12 bytes for shape [2] of F32"),
    "float offsets": (dict(good_header(), b={"dtype": "F32", "shape": [3], "data_offsets": [24.0, 36.0]}),
                      "data_offsets"),
    "negative dimension": (dict(good_header(), b={"dtype": "F32", "shape": [-3], "data_offsets": [24, 36]}),
                           "shape [-3]"),
    "float dimension": (dict(good_header(), b={"dtype": "F32", "shape": [3.0], "data_offsets": [24, 36]}),
                        "shape [3.0]"),
    "boolean dimension": (dict(good_header(), b={"dtype": "F32", "shape": [True], "data_offsets": [24, 28]}),
                          "shape [True]"),
    "header is a list": ([1, 2, 3], "a JSON list, not an object"),
    "entry is a string": (dict(good_header(), b="oops"), "not an object with dtype, shape and data_offsets"),
    "missing field": (dict(good_header(), b={"dtype": "F32", "shape": [3]}), "not an object with dtype"),
    "unknown dtype": (dict(good_header(), b={"dtype": "Q7", "shape": [3], "data_offsets": [24, 36]}),
                      "unsupported dtype 'Q7'"),
    "metadata not strings": (dict(good_header(), __metadata__={"a": 1}), "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_malformed_headers_exit_2_naming_file_and_problem(tmp_path, capsys, case):
    header, words = HOSTILE_HEADERS[case]
    expert = raw_file(tmp_path / "hostile.safetensors", header, bytes(36))
    rc, err, wrote = merge_against(tmp_path, capsys, expert)
    assert rc == 2, err
    assert "hostile.safetensors" in err and words in err, err
    assert "Traceback" not in err and not wrote


def test_duplicate_keys_and_bad_json_and_utf16_are_refused(tmp_path, capsys):
    dup = b'{"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, ' \
          b'"w": {"dtype": "F32", "shape": [3], "data_offsets": [24, 36]}}'
    for name, blob, words in [("dup", dup, "appears twice"), ("junk", b"{not json", "not valid JSON"),
                              ("utf16", json.dumps(good_header()).encode("utf-16"), "not valid JSON")]:
        expert = raw_file(tmp_path / f"{name}.safetensors", blob, bytes(36))
        rc, err, _ = merge_against(tmp_path, capsys, expert)
        assert rc == 2 and f"{name}.safetensors" in err and words in err, err


def test_header_length_beyond_the_file_or_the_cap(tmp_path, capsys, monkeypatch):
    short = tmp_path / "short.safetensors"
    short.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    rc, err, _ = merge_against(tmp_path, capsys, short)
    assert rc == 2 and "short.safetensors" in err and "header length 10000 exceeds the file size" in err

    monkeypatch.setenv("MERGEBENCH_MAX_HEADER_BYTES", "4096")
    big = raw_file(tmp_path / "big.safetensors", dict(good_header(), __metadata__={"pad": "x" * 5000}), bytes(36))
    rc, err, _ = merge_against(tmp_path, capsys, big)
    assert rc == 2 and "big.safetensors" in err and "more than the 4096" in err and "MERGEBENCH_MAX_HEADER_BYTES" in err


def test_too_many_entries_are_refused_cheaply(tmp_path, capsys, monkeypatch):
    import resource
    import time

    monkeypatch.setenv("MERGEBENCH_MAX_TENSORS", "1000")
    many = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(5000)}
    expert = raw_file(tmp_path / "many.safetensors", many)
    rc, err, _ = merge_against(tmp_path, capsys, expert)
    assert rc == 2 and "many.safetensors" in err and "declares 5000 tensors, more than 1000" in err, err
    # far more entries than allowed are refused from a count of ':' before the JSON is parsed
    many = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(30_000)}
    expert = raw_file(tmp_path / "more.safetensors", many)
    rc, err, _ = merge_against(tmp_path, capsys, expert)
    assert rc == 2 and "more.safetensors" in err and "declares more than 1000 tensors" in err, err

    # at the default caps, a header of 1.5 M entries (the 89 MB) is refused from its length alone
    monkeypatch.delenv("MERGEBENCH_MAX_TENSORS")
    huge = tmp_path / "huge.safetensors"
    with open(huge, "wb") as fh:
        fh.write(struct.pack("<Q", 89_000_000))
        fh.truncate(8 + 89_000_000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="huge.safetensors.*header is 89000000 bytes, more than"):
        SafetensorsSource(huge)
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB: nothing was parsed


def test_index_shards_outside_the_folder_are_refused(tmp_path, capsys):
    secret = save_state_dict(MODEL, tmp_path / "secret.safetensors")
    for i, name in enumerate([str(secret), "../secret.safetensors", "sub/../../secret.safetensors"]):
        folder = tmp_path / f"ckpt{i}"
        folder.mkdir()
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": name, "b": name}}))
        rc, err, wrote = merge_against(tmp_path, capsys, folder)
        assert rc == 2 and "model.safetensors.index.json names shard" in err and "outside the checkpoint folder" \
            in err, err
        assert not wrote

    # a shard that is a symlink out of the folder is refused too
    folder = tmp_path / "linked"
    folder.mkdir()
    os.symlink(secret, folder / "model-00001-of-00001.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors", "b": "model-00001-of-00001.safetensors"}}))
    rc, err, _ = merge_against(tmp_path, capsys, folder)
    assert rc == 2 and "outside the checkpoint folder" in err
    # and so is a folder of *.safetensors whose file links out
    (folder / "model.safetensors.index.json").unlink()
    rc, err, _ = merge_against(tmp_path, capsys, folder)
    assert rc == 2 and "outside the checkpoint folder" in err

    bad_map = tmp_path / "badmap"
    bad_map.mkdir()
    (bad_map / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["w"]}))
    rc, err, _ = merge_against(tmp_path, capsys, bad_map)
    assert rc == 2 and "not a valid safetensors index" in err


def test_hugging_face_cache_snapshots_still_read_and_copy(tmp_path, capsys):
    """The cache's snapshot files are symlinks into ../../blobs: inside the repository folder, so allowed."""
    folders = []
    for i in range(2):
        repo = tmp_path / f"models--org--m{i}"
        (repo / "blobs").mkdir(parents=True)
        snap = repo / "snapshots" / "abc123"
        snap.mkdir(parents=True)
        save_state_dict({k: v + i for k, v in MODEL.items()}, repo / "blobs" / "w1")
        (repo / "blobs" / "c1").write_text(json.dumps({"model_type": "toy", "i": i}))
        os.symlink("../../blobs/w1", snap / "model.safetensors")
        os.symlink("../../blobs/c1", snap / "config.json")
        folders.append(snap)
    out = tmp_path / "merged"
    assert main(["merge", "-m", "task_arithmetic", "--base", str(folders[0]), "--models", str(folders[1]),
                 "--out", str(out)]) == 0, capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["i"] == 0
    assert torch.allclose(load_state_dict(out / "model.safetensors")["w"], MODEL["w"] + 0.3)


def test_side_files_never_follow_symlinks_out_of_the_base_folder(tmp_path, capsys):
    private = tmp_path / "private.txt"
    private.write_text("secret key")
    base, expert = tmp_path / "base", tmp_path / "expert"
    for folder, shift in ((base, 0), (expert, 1)):
        folder.mkdir()
        save_state_dict({k: v + shift for k, v in MODEL.items()}, folder / "model.safetensors")
    os.symlink(private, base / "config.json")
    (base / "tokenizer.json").write_text("{}")
    os.symlink(base / "tokenizer.json", base / "alias.json")  # a link inside the folder is fine
    (base / "nested").mkdir()
    out = tmp_path / "merged"
    assert main(["merge", "-m", "task_arithmetic", "--base", str(base), "--models", str(expert),
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert not (out / "config.json").exists() and "config.json" in err and "outside" in err
    assert (out / "tokenizer.json").read_text() == "{}" and (out / "alias.json").read_text() == "{}"
    assert not (out / "alias.json").is_symlink() and not (out / "nested").exists()
