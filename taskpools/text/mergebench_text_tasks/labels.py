"""Which output of a fine-tuned classifier means which label of the dataset it is scored on.

A classifier's output order is whatever its training pipeline used, and it need not be the dataset's: TextAttack's
MNLI models put contradiction first (TextAttack's own `textattack/dataset_args.py` evaluates its bert and distilbert
MNLI models with the label map {0: 1, 1: 2, 2: 0}, and QData/TextAttack issue #684 reports the same order for
textattack/bert-base-uncased-MNLI). The order is taken, in this order of precedence, from:

1. the model's config: `id2label` names that match the dataset's label names;
2. the model card: lines that pair every `LABEL_<i>` (or output index) with one of the dataset's label names;
3. `KNOWN_OUTPUT_ORDERS` below, each entry with its source;
4. otherwise the dataset's own order (and a warning says so).

`resolve` returns the permutation `order` with `order[k]` = the model output that means dataset label k, and the
source it came from; task pools read logits as `logits[:, order]`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .catalog import GLUE_TASKS

log = logging.getLogger(__name__)

_SYNONYMS = {"neg": "negative", "pos": "positive", "sci_tech": "sci/tech", "scitech": "sci/tech",
             "not_paraphrase": "not_equivalent", "paraphrase": "equivalent"}

KNOWN_OUTPUT_ORDERS: dict[str, tuple[tuple[str, ...], str]] = {
    "textattack/roberta-base-MNLI": (
        ("contradiction", "entailment", "neutral"),
        ("TextAttack's order for its MNLI models (textattack/dataset_args.py label map {0: 1, 1: 2, 2: 0}; "
         "QData/TextAttack issue #684); the config and card of this model name no labels"),
    ),
}
# FusionBench fine-tuned its GPT-2 experts on GLUE's labels as the dataset stores them, and scores them so
# (fusion_bench/taskpool/gpt2_text_classification.py feeds the dataset's labels to each expert's own head).
KNOWN_OUTPUT_ORDERS.update({
    f"tanganke/gpt2_{t}": (GLUE_TASKS[t].label_names,
                           "FusionBench trained and scores these experts on GLUE's own label ids")
    for t in ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2")})


def normalize(name: str) -> str:
    n = re.sub(r"[\s\-]+", "_", name.strip().lower())
    return _SYNONYMS.get(n, n)


@dataclass(frozen=True)
class LabelOrder:
    order: tuple[int, ...]
    source: str

    @property
    def identity(self) -> bool:
        return self.order == tuple(range(len(self.order)))


def _by_names(model_names: Sequence[str], dataset_names: Sequence[str]) -> tuple[int, ...] | None:
    wanted = [normalize(n) for n in dataset_names]
    have = [normalize(n) for n in model_names]
    if sorted(have) != sorted(wanted) or len(set(have)) != len(have):
        return None
    return tuple(have.index(w) for w in wanted)


def from_config(id2label: Mapping[int | str, str] | None, dataset_names: Sequence[str]) -> tuple[int, ...] | None:
    if not id2label or len(id2label) != len(dataset_names):
        return None
    names = [id2label[k] for k in sorted(id2label, key=lambda k: int(k))]
    return _by_names(names, dataset_names)


def from_card(card: str | None, dataset_names: Sequence[str]) -> tuple[int, ...] | None:
    """Pairs like `LABEL_0: contradiction`, `0 -> contradiction` or `| 0 | contradiction |` in a model card, when
    they name every dataset label exactly once."""
    if not card:
        return None
    wanted = {normalize(n): n for n in dataset_names}
    found: dict[int, str] = {}
    pattern = re.compile(r"(?:label_?)?(\d+)\s*(?:[:=|]|->|→)\s*[`'\"]?([A-Za-z][\w/ -]*?)[`'\"]?\s*(?:[|,;)\n]|$)",
                         re.IGNORECASE)
    for m in pattern.finditer(card):
        name = normalize(m.group(2))
        if name in wanted:
            index = int(m.group(1))
            if found.get(index, name) != name:
                return None  # the card contradicts itself
            found[index] = name
    if sorted(found) != list(range(len(dataset_names))) or sorted(found.values()) != sorted(wanted):
        return None
    return _by_names([found[i] for i in range(len(dataset_names))], dataset_names)


def resolve(repo_id: str, id2label: Mapping[int | str, str] | None, card: str | None,
            dataset_names: Sequence[str]) -> LabelOrder:
    order = from_config(id2label, dataset_names)
    if order is not None:
        return LabelOrder(order, "config id2label")
    order = from_card(card, dataset_names)
    if order is not None:
        return LabelOrder(order, "model card")
    if repo_id in KNOWN_OUTPUT_ORDERS:
        names, source = KNOWN_OUTPUT_ORDERS[repo_id]
        order = _by_names(names, dataset_names)
        if order is None:
            raise ValueError(f"KNOWN_OUTPUT_ORDERS[{repo_id!r}] does not name the labels {list(dataset_names)}")
        return LabelOrder(order, f"catalog: {source}")
    log.warning("%s: neither its config nor its model card names its labels; assuming the dataset's order %s",
                repo_id, list(dataset_names))
    return LabelOrder(tuple(range(len(dataset_names))), "dataset order (assumed)")


def best_permutation(confusion: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], float]:
    """For a confusion matrix (rows: dataset label, columns: model output), the output permutation with the highest
    accuracy and that accuracy: a check of a declared order against real predictions."""
    import itertools

    n = len(confusion)
    total = sum(sum(r) for r in confusion) or 1
    best = max(itertools.permutations(range(n)), key=lambda p: sum(confusion[k][p[k]] for k in range(n)))
    return tuple(best), sum(confusion[k][best[k]] for k in range(n)) / total
