"""The CLIP task catalog: which dataset each task reads, its class names and prompt templates, and the suites.

The facts live in `tasks.json` (taken from FusionBench, which the published TA8/TA14/TA20 numbers come from) so
that they can be read and diffed as data; this module only types them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources

BASE_MODELS = {
    "b32": "openai/clip-vit-base-patch32",
    "b16": "openai/clip-vit-base-patch16",
    "l14": "openai/clip-vit-large-patch14",
}
"""Size tag (as in pool names such as clip-vit-b32_TA8) -> the pretrained CLIP checkpoint on the Hugging Face hub."""

SUITES = ("TA8", "TA14", "TA20")


@dataclass(frozen=True)
class TaskSpec:
    """One classification task: where its images come from and how its classes are put into words."""

    name: str
    dataset: str
    """Hugging Face dataset id."""
    config: str | None
    test_split: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    """Format strings with one `{}` for the class name."""
    train_split: str = "train"
    image_column: str = "image"
    label_column: str = "label"

    def split_name(self, split: str) -> str:
        """The dataset's own name for mergebench's "test" or "train" split (food101 scores on "validation")."""
        if split == "test":
            return self.test_split
        if split == "train":
            return self.train_split
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")

    def prompts(self, classname: str) -> list[str]:
        return [t.format(classname) for t in self.templates]


@cache
def _raw() -> dict:
    return json.loads(resources.files(__package__).joinpath("tasks.json").read_text(encoding="utf-8"))


@cache
def task(name: str) -> TaskSpec:
    tasks = _raw()["tasks"]
    if name not in tasks:
        raise KeyError(f"unknown CLIP task {name!r}; known: {', '.join(tasks)}")
    d = tasks[name]
    return TaskSpec(name=name, dataset=d["dataset"], config=d.get("config"), test_split=d["split"],
                    classnames=tuple(d["classnames"]), templates=tuple(d["templates"]),
                    train_split=d.get("train_split", "train"), image_column=d.get("image_column", "image"),
                    label_column=d.get("label_column", "label"))


def suite(name: str) -> list[str]:
    """Task names of TA8, TA14 or TA20, in FusionBench's order."""
    suites = _raw()["suites"]
    if name not in suites:
        raise KeyError(f"unknown suite {name!r}; known: {', '.join(suites)}")
    return list(suites[name])


def all_tasks() -> list[str]:
    return list(_raw()["tasks"])
