import json
import struct

import pytest
import torch

from mergebench_core.errors import CheckpointError
from mergebench_core.engine.merging import merge_sources
from mergebench_core.engine.tensors import (
    SafetensorsSource,
    StateDictSource,
    StreamingSafetensorsWriter,
    check_compatible,
    load_state_dict,
    save_state_dict,
)
from mergebench_task_arithmetic import TaskArithmetic


def test_roundtrip_keeps_values_dtypes_and_order(tmp_path):
    tensors = {"b": torch.arange(6, dtype=torch.float32).view(2, 3), "a": torch.tensor([1.5], dtype=torch.bfloat16),
               "ids": torch.arange(4), "flag": torch.tensor([True, False])}
    path = save_state_dict(tensors, tmp_path / "m.safetensors")
    src = SafetensorsSource(path)
    assert src.keys() == ["b", "a", "ids", "flag"]
    for k, v in tensors.items():
        assert src.dtype(k) == v.dtype and torch.equal(src.get(k), v)
    from safetensors.torch import load_file  # the reference reader agrees with our writer
    for k, v in load_file(str(path)).items():
        assert torch.equal(v, tensors[k])


def test_sharded_checkpoint_folder_is_one_source(tmp_path):
    save_state_dict({"x": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_state_dict({"y": torch.zeros(3)}, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}))
    src = SafetensorsSource(tmp_path)
    assert sorted(src.keys()) == ["x", "y"] and torch.equal(src.get("y"), torch.zeros(3))


def test_truncated_file_is_named(tmp_path):
    path = save_state_dict({"w": torch.ones(100)}, tmp_path / "m.safetensors")
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match=r"m\.safetensors is truncated: tensor 'w'"):
        SafetensorsSource(path)


def test_garbage_file_is_named(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 10) + b"not json!!")
    with pytest.raises(CheckpointError, match="bad.safetensors is not a valid safetensors file: its header is not valid"):
        SafetensorsSource(path)


def test_pickle_checkpoints_are_refused(tmp_path):
    torch.save({"w": torch.ones(1)}, tmp_path / "model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        SafetensorsSource(tmp_path / "model.bin")
    with pytest.raises(CheckpointError, match="never unpickles"):
        SafetensorsSource(tmp_path)


def test_writer_leaves_nothing_behind_on_error(tmp_path):
    out = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError):
        with StreamingSafetensorsWriter(out, [("a", (2,), torch.float32), ("b", (2,), torch.float32)]) as w:
            w.write("a", torch.ones(2))
            raise RuntimeError("merge failed half way")
    assert list(tmp_path.iterdir()) == []


def test_shape_mismatch_names_key_and_both_shapes():
    a = StateDictSource({"w": torch.zeros(2, 3), "v": torch.zeros(4, 5)}, "a")
    b = StateDictSource({"w": torch.zeros(2, 3), "v": torch.zeros(5, 4)}, "b")
    with pytest.raises(CheckpointError, match=r"tensor 'v' has shape \[4, 5\] in a but \[5, 4\] in b"):
        check_compatible([a, b])


def test_missing_key_is_named():
    a = StateDictSource({"w": torch.zeros(1), "v": torch.zeros(1)}, "a")
    b = StateDictSource({"w": torch.zeros(1)}, "b")
    with pytest.raises(CheckpointError, match="b has no tensor 'v'"):
        check_compatible([a, b])


def test_non_finite_input_is_named():
    base = StateDictSource({"w": torch.zeros(3)}, "base")
    bad = StateDictSource({"w": torch.tensor([0.0, float("nan"), 1.0])}, "expert-2")
    with pytest.raises(CheckpointError, match="tensor 'w' in expert-2 has 1 non-finite"):
        merge_sources(TaskArithmetic(), base, [bad], sink={})


def test_integer_buffers_are_copied_not_merged():
    base = StateDictSource({"ids": torch.arange(3), "w": torch.zeros(2)}, "base")
    e = StateDictSource({"ids": torch.arange(3), "w": torch.ones(2)}, "e")
    out = {}
    merge_sources(TaskArithmetic(), base, [e], sink=out)
    assert torch.equal(out["ids"], torch.arange(3)) and torch.allclose(out["w"], torch.full((2,), 0.3))


def test_merge_keeps_input_dtype():
    base = StateDictSource({"w": torch.zeros(4, dtype=torch.bfloat16)}, "base")
    e = StateDictSource({"w": torch.ones(4, dtype=torch.bfloat16)}, "e")
    out = {}
    merge_sources(TaskArithmetic(), base, [e], sink=out)
    assert out["w"].dtype == torch.bfloat16


def test_load_state_dict_reads_everything(tmp_path):
    path = save_state_dict({"a": torch.ones(2, 2)}, tmp_path / "x.safetensors")
    assert torch.equal(load_state_dict(path)["a"], torch.ones(2, 2))


def test_writer_patches_written_tensors_in_place(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.ones(4, dtype=torch.bfloat16),
               "c": torch.zeros(2)}
    path = tmp_path / "out.safetensors"
    with StreamingSafetensorsWriter(path, [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]) as w:
        w.write("a", tensors["a"])
        w.write("b", tensors["b"])
        w.patch("a", torch.tensor([1, 5]), torch.tensor([-1.0, -5.0]))
        w.patch("b", torch.tensor([2]), torch.tensor([3.5]))  # values are cast to the tensor's dtype
        with pytest.raises(ValueError, match="has not been written"):
            w.patch("c", None, torch.ones(2))
        w.write("c", tensors["c"])
        w.patch("c", None, torch.tensor([7.0, 8.0]))
        w.commit()
    out = load_state_dict(path)
    assert torch.equal(out["a"], torch.tensor([[0.0, -1.0, 2.0], [3.0, 4.0, -5.0]]))
    assert out["b"].dtype == torch.bfloat16 and out["b"].tolist() == [1.0, 1.0, 3.5, 1.0]
    assert out["c"].tolist() == [7.0, 8.0]


def test_sources_read_slices(tmp_path):
    t = torch.arange(20, dtype=torch.float32)
    save_state_dict({"t": t}, tmp_path / "m.safetensors")
    src = SafetensorsSource(tmp_path / "m.safetensors")
    out = torch.empty(5)
    src.read_into("t", out, start=12)
    assert out.tolist() == [12.0, 13.0, 14.0, 15.0, 16.0]
    with pytest.raises(ValueError, match="at most 3 entries"):
        src.read_into("t", out, start=17)
    many = torch.empty(3, 4)
    src.read_slices("t", [0, 9, 16], many)
    assert many.tolist() == [[0.0, 1.0, 2.0, 3.0], [9.0, 10.0, 11.0, 12.0], [16.0, 17.0, 18.0, 19.0]]
    with pytest.raises(ValueError, match="slices inside"):
        src.read_slices("t", [0, 17], torch.empty(2, 4))
