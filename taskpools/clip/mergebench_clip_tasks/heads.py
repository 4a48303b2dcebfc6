"""Zero-shot classification heads from the pretrained CLIP text encoder, computed once and cached on disk.

A head is one unit vector per class: every prompt (template × class name) is embedded by the text tower and its
projection, each embedding is L2-normalised, the embeddings of a class are averaged over templates, and the average
is normalised again (Radford et al., as in the task-vectors code and FusionBench). Logits are then
`logit_scale.exp() * normalize(visual_projection(pooled image features)) @ heads.T`.

The heads, the visual projection and the logit scale depend only on the base model and the task's words, so they
are cached as safetensors per (base model, revision, task, hash of class names and templates); an evaluation that
finds them needs no text tower at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mergebench_core.engine.safetensors_reader import load_state_dict
from mergebench_core.engine.safetensors_writer import save_state_dict

from .catalog import TaskSpec

log = logging.getLogger(__name__)

TextEmbedder = Callable[[list[str]], torch.Tensor]
"""Prompts -> (len(prompts), D) unnormalised text embeddings (after the text projection)."""


def zeroshot_heads(embed: TextEmbedder, classnames: Sequence[str], templates: Sequence[str],
                   chunk: int = 256) -> torch.Tensor:
    """(num classes, D) unit vectors: per class, the renormalised mean of the normalised prompt embeddings."""
    prompts = [t.format(c) for c in classnames for t in templates]
    parts = [embed(prompts[i:i + chunk]).float() for i in range(0, len(prompts), chunk)]
    emb = F.normalize(torch.cat(parts), dim=-1).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


def words_digest(spec: TaskSpec) -> str:
    payload = json.dumps([spec.classnames, spec.templates], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class ProjectionSide:
    """What the image side of a zero-shot classifier takes from the pretrained model besides its vision tower."""

    visual_projection: torch.Tensor
    """(D, hidden) weight of the bias-free visual projection."""
    logit_scale: torch.Tensor
    """The learned log temperature (a scalar); logits use its exp()."""


class HeadCache:
    """Heads and projection of one base model, built from its text tower on first use and kept as safetensors."""

    def __init__(self, root: Path, base_id: str, revision: str, load_clip: Callable[[], tuple]):
        """`load_clip()` returns (CLIPModel, tokenizer); it is called at most once, and only if something is missing."""
        self.folder = root / base_id.replace("/", "--") / revision
        self._load_clip = load_clip
        self._clip: tuple | None = None

    @property
    def text_tower_loaded(self) -> bool:
        """Whether the text tower was loaded: heads read back from the cache never need it."""
        return self._clip is not None

    def _model(self) -> tuple:
        if self._clip is None:
            log.info("loading the text tower of the base model to build zero-shot heads")
            self._clip = self._load_clip()
        return self._clip

    def embedder(self) -> TextEmbedder:
        model, tokenizer = self._model()
        max_length = model.config.text_config.max_position_embeddings  # CLIP's 77-token context

        def embed(texts: list[str]) -> torch.Tensor:
            tokens = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            with torch.inference_mode():
                out = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 4 vs 5

        return embed

    def head(self, spec: TaskSpec) -> torch.Tensor:
        path = self.folder / f"head-{spec.name}-{words_digest(spec)}.safetensors"
        if path.is_file():
            return load_state_dict(path)["weight"]
        log.info("building the zero-shot head of %s (%d classes x %d templates)", spec.name,
                 len(spec.classnames), len(spec.templates))
        weight = zeroshot_heads(self.embedder(), spec.classnames, spec.templates).contiguous()
        save_state_dict({"weight": weight}, path, {"task": spec.name})
        return weight

    def projection(self) -> ProjectionSide:
        path = self.folder / "projection.safetensors"
        if not path.is_file():
            model, _ = self._model()
            save_state_dict({"visual_projection": model.visual_projection.weight.detach().float().contiguous(),
                             "logit_scale": model.logit_scale.detach().float().reshape(())}, path)
        t = load_state_dict(path)
        return ProjectionSide(t["visual_projection"], t["logit_scale"])
