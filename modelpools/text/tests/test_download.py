"""`mergebench download` for the text pools: every model, adapter and dataset split is fetched through the hub
clients (replaced here by recorders), and offline it refuses at once, naming everything still missing."""

from __future__ import annotations

import pytest
from mergebench_text_tasks import suite

from mergebench_core.cli import main
from mergebench_core.pools import hub


@pytest.fixture()
def recorded(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "MERGEBENCH_TEXT_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("MERGEBENCH_PLUGINS", "text,text_tasks")
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    from mergebench_core.contract import registry

    monkeypatch.setattr(registry, "_REGISTRY", None)
    calls: dict[str, list] = {"models": [], "datasets": []}

    class Api:
        def list_repo_files(self, repo_id):
            return ["config.json", "pytorch_model.bin"] if repo_id.startswith("textattack/") else \
                ["config.json", "model.safetensors"]

    def snapshot_download(repo_id, cache_dir, allow_patterns):
        calls["models"].append((repo_id, tuple(allow_patterns)))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(datasets, "load_dataset", lambda d, c, split: calls["datasets"].append((d, c, split)))
    return calls


@pytest.mark.parametrize("pool", ["gpt2_glue", "roberta-base_textattack4", "flan-t5-base_glue-lora16"])
def test_download_fetches_every_model_and_split(pool, recorded, capsys):
    assert main(["download", "--modelpool", pool]) == 0, capsys.readouterr().err
    s = suite(pool)
    assert {r for r, _ in recorded["models"]} == {s.base_model, *s.experts.values()}
    for repo, patterns in recorded["models"]:
        assert "README.md" in patterns and "*.json" in patterns  # cards (label orders) and configs
        assert ("pytorch_model.bin" in patterns) == repo.startswith("textattack/")
    assert set(recorded["datasets"]) == {(t.dataset, t.config, split) for t in s.tasks.values()
                                         for split in (t.test_split, t.train_split)}


def test_download_offline_refuses_naming_what_is_missing(recorded, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["download", "--modelpool", "gpt2_glue"]) != 0
    err = capsys.readouterr().err
    assert "cannot fetch 8 item(s)" in err and "model tanganke/gpt2_rte" in err
    assert recorded["models"] == [] and recorded["datasets"] == []
