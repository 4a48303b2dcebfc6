"""The one hub module (`mergebench_core.pools.hub`) every hub pool family uses: offline checks, the cache layout,
local dataset copies per family, and no hub library imported by the core."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mergebench_core import MergebenchError
from mergebench_core.pools import hub


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in (*hub.OFFLINE_ENV, "MERGEBENCH_CLIP_DATA_DIR", "MERGEBENCH_TEXT_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    return tmp_path / "hub"


def snapshot(cache: Path, repo: str, commit: str, files: dict[str, str], *, kind: str = "model",
             ref: bool = True) -> Path:
    folder = cache / f"{kind}s--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, text in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_text(text)
    if ref:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(commit)
    return snap


def test_offline_is_an_environment_variable_or_an_unreachable_hub(cache, monkeypatch):
    assert not hub.offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")
    assert hub.offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    assert hub.offline()


def test_require_online_names_every_missing_item_only_when_offline(cache, monkeypatch):
    hub.require_online(["model a/b"])  # online: fetching may go ahead
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.require_online([])  # nothing missing: nothing to refuse
    with pytest.raises(MergebenchError, match=r"cannot fetch 2 item\(s\)(.|\n)*- model a/b\n  - dataset c/d \[test\]"
                                              r"(.|\n)*point MERGEBENCH_TEXT_DATA_DIR at `save_to_disk` copies"):
        hub.require_online(["model a/b", "dataset c/d [test]"], local_env="MERGEBENCH_TEXT_DATA_DIR")
    with pytest.raises(MergebenchError) as refused:
        hub.require_online(["model a/b"])
    assert "save_to_disk" not in str(refused.value)  # a model pool has no local dataset copies to point at


def test_snapshots_follow_the_ref_else_the_newest(cache):
    snap = snapshot(cache, "org/model", "abc123", {"config.json": "{}", "model.safetensors": ""})
    assert hub.cached_snapshot("org/model") == snap and hub.model_revision("org/model") == "abc123"
    assert hub.model_snapshot("org/model") == snap and hub.model_location("org/model") == str(snap)
    older = snapshot(cache, "org/data", "old", {}, kind="dataset", ref=False)
    newer = snapshot(cache, "org/data", "new", {}, kind="dataset", ref=False)
    os.utime(older, (1, 1))
    assert hub.cached_snapshot("org/data", "dataset") == newer
    assert hub.model_revision("missing/model") == "unresolved" and hub.cached_snapshot("missing/model") is None


def test_a_model_needs_its_config_and_weights_and_an_adapter_its_own(cache, monkeypatch):
    snapshot(cache, "org/card-only", "c1", {"README.md": "LABEL_0: negative"})
    assert hub.model_snapshot("org/card-only") is None and hub.model_card("org/card-only") == "LABEL_0: negative"
    adapter = snapshot(cache, "org/lora", "l1", {"adapter_config.json": "{}", "adapter_model.safetensors": ""})
    assert hub.model_snapshot("org/lora") is None and hub.model_snapshot("org/lora", adapter=True) == adapter
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MergebenchError, match="model org/card-only is not in the Hugging Face cache"):
        hub.model_location("org/card-only")
    assert hub.model_location("org/lora", adapter=True) == str(adapter)


def test_each_family_sees_only_its_own_local_dataset_copies(cache, tmp_path, monkeypatch):
    split = tmp_path / "clip-data" / "ylecun" / "mnist" / "test"
    split.mkdir(parents=True)
    (split / "state.json").write_text(json.dumps({"_fingerprint": "f00d"}))
    monkeypatch.setenv("MERGEBENCH_CLIP_DATA_DIR", str(tmp_path / "clip-data"))
    clip, text = "MERGEBENCH_CLIP_DATA_DIR", "MERGEBENCH_TEXT_DATA_DIR"
    assert hub.local_dataset_dir("ylecun/mnist", None, "test", local_env=clip) == split
    assert hub.dataset_available("ylecun/mnist", None, "test", local_env=clip)
    assert hub.dataset_revision("ylecun/mnist", None, "test", local_env=clip) == "local-f00d"
    assert not hub.dataset_available("ylecun/mnist", None, "test", local_env=text)
    assert hub.dataset_revision("ylecun/mnist", None, "test", local_env=text) == "unresolved"
    assert hub.describe_dataset("ufldl-stanford/svhn", "cropped_digits", "test") == \
        "dataset ufldl-stanford/svhn (cropped_digits) [test]"


def test_the_core_imports_no_hub_library():
    code = ("import sys, mergebench_core, mergebench_core.pools.hub, mergebench_core.pools.hf_models\n"
            "print(sorted(m for m in ('huggingface_hub', 'datasets', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
