"""The four tasks: real data from pinned packages, a seeded split, and lm-eval YAML tasks over local JSONL files.

| task | data (package, licence) | train / test | scored by lm-eval as |
|---|---|---|---|
| `mbg_arith` | mathematics-dataset's arithmetic generator (`add_or_sub`, `mul`), entropy (2, 3), seeded | 2,000 / 200 distinct questions | greedy answer, exact match |
| `mbg_capitals` | countryinfo's country files: name and capital (MIT) | 75 % / 25 % of countries | greedy answer, exact match |
| `mbg_german` | pycountry's ISO 3166-1 names and their German translations (iso-codes, LGPL-2.1) | 75 % / 25 % of the names that differ in German | greedy answer, exact match |
| `mbg_code` | HumanEval's problems and canonical solutions (MIT) | 123 / 41 problems (signature and the docstring's first line; trained on the first 3 lines of each solution) | 4-way choice of the solution's first line (log-likelihood) |

Prompts are the same in training and scoring (`prompt`, answered by ` target` and a newline, where generation stops).
A split depends on the data's bytes (checked by digest) and `SPLIT_SEED` only, so every machine scores the same
examples. The code task's distractors are first lines of other held-out problems' solutions, drawn with the seed.
"""

from __future__ import annotations

import contextlib
import gettext
import gzip
import importlib
import json
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mergebench_core.pools import packaged

from . import sources

__all__ = ["SPLIT_SEED", "TASKS", "TASK_VERSIONS", "TaskData", "load_task", "write_lmeval_tasks"]

TASKS = ("mbg_arith", "mbg_capitals", "mbg_code", "mbg_german")
SPLIT_SEED = 20261205
TASK_VERSIONS = {"mbg_arith": 1, "mbg_capitals": 1, "mbg_code": 2, "mbg_german": 1}
"""Bumped when a task's split or prompt changes (they name experts' cache entries and lm-eval's task versions).
mbg_code 2: compact prompts (signature and the docstring's first line), so scoring fits a CPU."""
ARITH_TRAIN, ARITH_TEST = 2000, 200
TEST_FRACTION = 0.25


@dataclass(frozen=True)
class TaskData:
    """Training pairs (prompt, target) and the held-out documents as lm-eval reads them."""

    train: list[tuple[str, str]]
    test: list[dict]
    kind: str  # "generate" or "choice"
    separator: str = " "
    """Between prompt and answer, in training as in scoring (code: none, the answer is an indented line)."""


@contextlib.contextmanager
def _global_random(seed: int) -> Iterator[None]:
    """mathematics-dataset draws from Python's and NumPy's global generators: seed them, then put them back."""
    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


def _arithmetic_modules():
    """mathematics-dataset's arithmetic module. Version 1.0.1 imports `base_solution_linear` from
    `sympy.solvers.diophantine`, which sympy ≥ 1.6 moved to its `diophantine` submodule: the name is put back
    where it looks before the import (nothing else of sympy changes)."""
    packaged.verified_tree(sources.MATH, ".")
    package = importlib.import_module("sympy.solvers.diophantine")
    module = sys.modules["sympy.solvers.diophantine"]
    if not hasattr(module, "base_solution_linear"):
        module.base_solution_linear = importlib.import_module(  # type: ignore[attr-defined]
            "sympy.solvers.diophantine.diophantine").base_solution_linear
    del package
    from mathematics_dataset.modules import arithmetic

    return arithmetic.train(lambda _: (2.0, 3.0))


def _arith() -> TaskData:
    modules = _arithmetic_modules()
    seen: dict[str, str] = {}
    with _global_random(SPLIT_SEED):
        while len(seen) < ARITH_TRAIN + ARITH_TEST:
            problem = modules["add_or_sub" if random.random() < 0.5 else "mul"]()
            seen.setdefault(str(problem.question), str(problem.answer))
    pairs = [(f"Question: {q}\nAnswer:", a) for q, a in seen.items()]
    return TaskData(pairs[:ARITH_TRAIN], [{"prompt": p, "target": t} for p, t in pairs[ARITH_TRAIN:]], "generate")


def _split(pairs: list[tuple[str, str]], salt: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    order = sorted(set(pairs))
    random.Random(f"{SPLIT_SEED}/{salt}").shuffle(order)
    n_test = round(len(order) * TEST_FRACTION)
    return order[n_test:], order[:n_test]


def _generation(train: list[tuple[str, str]], test: list[tuple[str, str]]) -> TaskData:
    return TaskData(train, [{"prompt": p, "target": t} for p, t in test], "generate")


def _capitals() -> TaskData:
    folder = packaged.verified_tree(sources.COUNTRIES, "data")
    pairs = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        name, capital = str(data.get("name") or "").strip(), str(data.get("capital") or "").strip()
        if name and capital and "\n" not in name + capital:
            pairs.append((f"Question: What is the capital of {name}?\nAnswer:", capital))
    return _generation(*_split(pairs, "capitals"))


def _german() -> TaskData:
    names = json.loads(packaged.verified_file(sources.ISO, "databases/iso3166-1.json").read_text(encoding="utf-8"))
    with open(packaged.verified_file(sources.ISO, "locales/de/LC_MESSAGES/iso3166-1.mo"), "rb") as f:
        german = gettext.GNUTranslations(f)
    pairs = []
    for entry in names["3166-1"]:
        english = entry["name"]
        translated = german.gettext(english)
        if translated != english:  # names German spells the same teach nothing about German
            pairs.append((f"English: {english}\nGerman:", translated))
    return _generation(*_split(pairs, "german"))


def _opening(solution: str, lines: int = 3) -> str:
    """The first `lines` non-empty lines of a solution: what the code expert learns to write (whole solutions would
    multiply its training cost on a CPU; the task scores a solution's first line)."""
    return "\n".join([line for line in solution.splitlines() if line.strip()][:lines])


def _compact(problem: dict) -> str:
    """The problem's signature line and its docstring's first line: HumanEval's whole prompts (imports, helper
    functions, examples) are 150-600 tokens, and lm-eval scores each of the 4 choices with its whole context."""
    lines = problem["prompt"].splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"def {problem['entry_point']}("))
    doc = next((line.strip().strip('"').strip("'").strip() for line in lines[at + 1:]
                if line.strip().strip('"').strip("'").strip()), "")
    return f'{lines[at]}\n    """{doc}"""\n'


def _code() -> TaskData:
    with gzip.open(packaged.verified_file(sources.CODE, "data/HumanEval.jsonl.gz"), "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    order = list(range(len(problems)))
    random.Random(f"{SPLIT_SEED}/code").shuffle(order)
    n_test = round(len(problems) * TEST_FRACTION)
    test_ids, train_ids = order[:n_test], order[n_test:]
    train = [(_compact(problems[i]), _opening(problems[i]["canonical_solution"])) for i in train_ids]
    firsts = {i: next(line for line in problems[i]["canonical_solution"].splitlines() if line.strip())
              for i in test_ids}
    rng = random.Random(f"{SPLIT_SEED}/code-choices")
    docs = []
    for i in test_ids:
        others = [j for j in test_ids if j != i and firsts[j] != firsts[i]]
        choices = [firsts[i], *(firsts[j] for j in rng.sample(others, 3))]
        rng.shuffle(choices)
        docs.append({"prompt": _compact(problems[i]), "choices": choices, "gold": choices.index(firsts[i]),
                     "task_id": problems[i]["task_id"]})
    return TaskData(train, docs, "choice", separator="")


_LOADERS = {"mbg_arith": _arith, "mbg_capitals": _capitals, "mbg_code": _code, "mbg_german": _german}


def load_task(name: str) -> TaskData:
    """The task's training pairs and held-out documents (read from the packages and checked each time)."""
    if name not in _LOADERS:
        raise KeyError(f"no task {name!r}; tasks: {', '.join(TASKS)}")
    return _LOADERS[name]()


_GENERATE = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 24
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: false
    ignore_punctuation: false
metadata:
  version: {version}
"""

_CHOICE = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""


def write_lmeval_tasks(folder: Path, tasks: tuple[str, ...] = TASKS, final: Path | None = None) -> Path:
    """Write each task's held-out JSONL and its lm-eval YAML into `folder` (lm-eval's `include_path`). The YAML
    names its data file by absolute path inside `final`, where the folder will live (default: `folder`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in tasks:
        data = load_task(name)
        jsonl = folder / f"{name}.jsonl"
        jsonl.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in data.test), encoding="utf-8")
        template = _GENERATE if data.kind == "generate" else _CHOICE
        where = Path(final or folder).resolve() / jsonl.name
        (folder / f"{name}.yaml").write_text(template.format(name=name, data=where, version=TASK_VERSIONS[name]))
    return folder
