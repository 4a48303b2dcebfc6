"""Building the pool once per recipe: the pretrained checkpoint, the frozen heads, and the experts (full or LoRA).

Everything lands in the core's content-addressed cache (`mergebench_core.cache.ContentCache`, under
`$MERGEBENCH_CACHE/pools/minilm`): each entry is one safetensors file keyed by its recipe, with a digest of its bytes,
built under a lock, written atomically; a damaged file is rebuilt, never trusted. The keys hold the digests of the
sources (weights and data), so a different package version cannot be mistaken for the pinned one.

- **Heads** (the task pool's, built as the CLIP pools build zero-shot heads, with no training): per task, the
  unit-norm mean of the pretrained model's unit-norm embeddings of each class's train texts, times one logit scale
  shared by every task that calibrates the pretrained model on the train splits (minimum cross-entropy, as the digits
  and EfficientNet pools do). They depend on the pretrained weights and the data only.
- **Experts**: the encoder fine-tuned on one task through its frozen head with Adam, in train mode (BERT's dropout
  0.1 on), `MinilmParams.steps` steps of `batch_size` texts drawn with replacement. `full` trains every weight;
  `lora` trains rank-16 LoRA adapters (peft, α 32, on the attention's query and value, FusionBench's Flan-T5 LoRA
  recipe) and stores the merged weights W₀ + (α/r)·BA, so each expert's task vector is low rank in those matrices
  and zero elsewhere, and every method merges it unchanged.

Each expert draws from generators of its own (derived from the seed, the task and the kind), with one torch thread,
so the same recipe gives the same bits on any machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from mergebench_digits_tasks import calibrated_scale

from mergebench_core.cache import ContentCache, Entry
from mergebench_core.contract.checked_params import CheckedParams
from mergebench_core.paths import cache_dir

from . import sources
from .encoder import MAX_LENGTH, MiniLMEncoder, encode, pretrained_state_dict
from .tasks import SPLIT_VERSION, TASKS, load_task

__all__ = ["LORA_ALPHA", "LORA_RANK", "LORA_TARGETS", "MinilmParams", "PoolCache", "build_expert", "build_heads",
           "expert_key", "heads_key", "pretrained_key"]

log = logging.getLogger(__name__)

VERSION = 1  # bump when the build code changes in a way the keys do not show
LORA_RANK, LORA_ALPHA, LORA_TARGETS = 16, 32, ("query", "value")
KINDS = ("full", "lora")


@dataclass(frozen=True)
class MinilmParams(CheckedParams):
    """How the experts are fine-tuned (the pool's parameters; they name the experts' cache entries)."""

    lr: float = 1e-4
    """Adam's learning rate (the LoRA pool's default is 1e-3: adapters start at zero and need larger steps)."""
    steps: int = 100
    """Optimizer steps per expert."""
    batch_size: int = 16
    """Texts per step, drawn with replacement from the task's train split."""
    seed: int = 0
    """Seeds every expert's batch order and dropout."""

    above = {"lr": 0.0}
    at_least = {"steps": 1, "batch_size": 1, "seed": 0}
    at_most = {"lr": 10.0, "steps": 10**6, "batch_size": 4096, "seed": 2**32 - 1}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread while building: the same float sums on every machine, so the same bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _source_digests() -> dict[str, Any]:
    return {s.pin: [d for _, d in s.files] + [d for *_, d in s.trees] for s in sources.SOURCES}


def pretrained_key() -> dict[str, Any]:
    return {"what": "minilm/pretrained", "weights": [d for _, d in sources.MINILM.files], "version": VERSION}


def heads_key(tasks: tuple[str, ...] = TASKS) -> dict[str, Any]:
    return {"what": "minilm/heads", "sources": _source_digests(), "tasks": list(tasks), "split": SPLIT_VERSION,
            "max_length": MAX_LENGTH, "version": VERSION}


def expert_key(kind: str, params: MinilmParams, task: str) -> dict[str, Any]:
    key = {"what": f"minilm/expert-{kind}", "task": task, "params": dataclasses.asdict(params),
           "sources": _source_digests(), "split": SPLIT_VERSION, "max_length": MAX_LENGTH, "version": VERSION}
    if kind == "lora":
        key["lora"] = {"r": LORA_RANK, "alpha": LORA_ALPHA, "targets": list(LORA_TARGETS)}
    return key


class PoolCache(ContentCache):
    """The pool's entries, `<what>/<hash of the key>.safetensors` under `$MERGEBENCH_CACHE/pools/minilm`."""

    def __init__(self, root: Path | None = None):
        super().__init__(root or cache_dir() / "pools" / "minilm")

    def entry_name(self, key: Any, digest: str) -> str:
        return f"{str(key['what']).removeprefix('minilm/')}/{digest}"

    def path_of(self, key: dict[str, Any], build: Any, what: str) -> Path:
        """The entry's file, built first when missing or damaged."""
        self.get_or_build(key, build, what)
        return self.entry_path(key)


def _embed(model: MiniLMEncoder, ids: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(ids[i:i + batch_size]) for i in range(0, len(ids), batch_size)])


def build_pretrained() -> Entry:
    return Entry(pretrained_state_dict(), {"source": sources.MINILM.pin})


def build_heads(tasks: tuple[str, ...] = TASKS) -> Entry:
    """Each task's prototype head (classes, 384), already multiplied by the shared calibrated scale."""
    started = time.perf_counter()
    with one_thread(), torch.inference_mode(False):
        model = MiniLMEncoder()
        model.load_state_dict(pretrained_state_dict())
        model.eval()
        prototypes, cosines, labels = {}, {}, {}
        for t in tasks:
            data = load_task(t)
            unit = F.normalize(_embed(model, encode(data.train_texts)), dim=-1)
            y = torch.tensor(data.train_labels)
            rows = torch.stack([unit[y == c].mean(0) for c in range(len(data.classes))])
            prototypes[t] = F.normalize(rows, dim=-1)
            cosines[t], labels[t] = unit @ prototypes[t].T, y
        scale = calibrated_scale(cosines, labels)
    log.info("minilm heads: logit scale %.2f (%.1f s)", scale, time.perf_counter() - started)
    return Entry({t: (scale * rows).contiguous() for t, rows in prototypes.items()},
                 {"logit_scale": scale, "seconds": round(time.perf_counter() - started, 1)})


def _generator(params: MinilmParams, task: str, kind: str) -> torch.Generator:
    seed = int(hashlib.sha256(f"{params.seed}/{task}/{kind}".encode()).hexdigest()[:15], 16)
    return torch.Generator().manual_seed(seed)


def _lora_model(model: MiniLMEncoder) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=list(LORA_TARGETS), lora_dropout=0.0,
                        bias="none")
    return get_peft_model(model, config)


def build_expert(kind: str, params: MinilmParams, task: str, head: torch.Tensor) -> Entry:
    """The encoder fine-tuned on `task` through its frozen `head` (full weights, or LoRA merged into them)."""
    if kind not in KINDS:
        raise ValueError(f"expert kind must be one of {KINDS}, got {kind!r}")
    started = time.perf_counter()
    data = load_task(task)
    x, y = encode(data.train_texts), torch.tensor(data.train_labels)
    gen = _generator(params, task, kind)
    with one_thread(), torch.inference_mode(False), torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))  # dropout and LoRA's initialisation
        model = MiniLMEncoder()
        model.load_state_dict(pretrained_state_dict())
        trained: Any = _lora_model(model) if kind == "lora" else model
        trained.train()
        opt = torch.optim.Adam([p for p in trained.parameters() if p.requires_grad], lr=params.lr)
        for _ in range(params.steps):
            idx = torch.randint(0, len(x), (params.batch_size,), generator=gen)
            logits = F.linear(F.normalize(trained(x[idx]), dim=-1), head)
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        final = trained.merge_and_unload() if kind == "lora" else trained
        state = {k: v.detach().clone().contiguous() for k, v in final.state_dict().items()}
    seconds = round(time.perf_counter() - started, 1)
    log.info("minilm %s expert %s: %d steps in %.1f s (last loss %.3f)", kind, task, params.steps, seconds,
             float(loss.detach()))
    return Entry(state, {"seconds": seconds, "last_loss": float(loss.detach())})
