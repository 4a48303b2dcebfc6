"""The model card (README.md) and config.json of a merge made from a MergeKit config.

The card carries the recipe, the config as the user wrote it, so that the merge can be reproduced and the hub shows
where the model came from; its front matter lists the models in the form the hub reads (`base_model`, `tags`).
config.json is the donor's (the base model's, else the first model's), with the layer count of a frankenmerge and
the dtype written, which is what `from_pretrained` needs to build the right model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mergebench_core.mergekit.config import MergeKitConfig


def model_card(config: MergeKitConfig, method: str, title: str) -> str:
    """README.md text for a merge of `config`, computed by registered method `method`."""
    models = config.model_refs()
    front = ["---", "library_name: transformers", "tags:", "- mergebench", "- merge", "base_model:"]
    front += [f"- {json.dumps(m)}" for m in models]
    front.append("---")
    lines = [f"# {title}", "",
             "This model is a merge of pretrained language models, made with "
             "mergebench (`mergebench merge --config`) from a MergeKit config.", "",
             "## Merge", "",
             f"Method: `{config.merge_method}` (MergeKit's name), computed by mergebench's `{method}`."]
    if config.base_model:
        lines.append(f"Base model: `{config.base_model}`.")
    lines += ["", "Models merged:", ""] + [f"- `{m}`" for m in models if m != config.base_model]
    lines += ["", "## Configuration", "", "The config this model was made with:", "", "```yaml",
              config.text.rstrip("\n"), "```", ""]
    return "\n".join(front + lines)


def write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically (a file copied from the donor may sit there)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(text, encoding="utf-8")
    if path.is_symlink():
        path.unlink()
    os.replace(tmp, path)


def adjust_model_config(path: Path, layers: int | None, dtype: torch.dtype | None) -> None:
    """Set `num_hidden_layers` (when the config states one and the output has another count) and the dtype in the
    copied config.json at `path`; nothing when there is none."""
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        return
    if layers is not None and isinstance(data.get("num_hidden_layers"), int):
        data["num_hidden_layers"] = layers
    if dtype is not None:  # transformers 5 writes and reads `dtype`, earlier versions (and MergeKit) `torch_dtype`
        name = str(dtype).removeprefix("torch.")
        data["torch_dtype"] = name
        if "dtype" in data:
            data["dtype"] = name
    write_text(path, json.dumps(data, indent=2) + "\n")
