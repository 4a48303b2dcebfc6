"""Text model pools from the Hugging Face hub: what is merged, and how each model is read.

- GPT-2 (`gpt2_glue`): the transformer body, `GPT2Model` (embeddings, blocks, final LayerNorm); each expert's `score`
  head stays with the task pool. Checkpoints store the body under `transformer.` (experts) or bare (`gpt2`).
  GPT-2's linear layers are `Conv1D`, whose weight is stored transposed, (in, out): the core's statistics and
  RegMean handle both layouts.
- RoBERTa (`roberta-base_textattack4`): the encoder body, `RobertaModel` without pooler (the textattack experts are
  `RobertaForSequenceClassification`s, which have none), stored under `roberta.`; heads stay with the task pool.
- RoBERTa with merged heads (`roberta-base_textattack4_padded-heads`, the seed's way): the whole
  `RobertaForSequenceClassification`, its `out_proj` zero-padded to the largest label count; roberta-base has no
  classification head, so the pretrained model's head is zero and each head's task vector is the expert's head.
- Flan-T5 (`flan-t5-base_glue`, `-lora16`): the whole `T5ForConditionalGeneration`; a LoRA expert is the base model
  with its peft adapter merged in (`merge_and_unload`), so its task vector is the LoRA delta B·A·(α/r) on the adapted
  layers and zero elsewhere, as FusionBench loads them. T5's tied embeddings appear once in its state dict
  (`shared.weight`; `name_tied_parameters_once`), so every method merges them once.

Data-free methods read GPT-2 and RoBERTa bodies and full Flan-T5 models tensor by tensor from the files
(`tensor_source`, through the core's `CheckpointPool`); LoRA experts and padded heads are built first.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path

import torch
from mergebench_text_tasks import suite
from torch import nn

from mergebench_core import PRETRAINED
from mergebench_core.engine.sources import StateDictSource, TensorSource
from mergebench_core.pools import hub
from mergebench_core.pools.folder import CheckpointPool, RenamedSource
from mergebench_core.pools.hf_models import dtype_kwargs, folder_source, parse_dtype, quiet_transformers

log = logging.getLogger(__name__)

BODY_PREFIXES = {"gpt2": ("", "transformer."), "roberta": ("", "roberta.")}
TIED_EMBEDDINGS = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight",
                   "lm_head.weight": "shared.weight"}
"""T5 checkpoints store its tied embeddings once, as `shared.weight` (and the LM head too when it is tied)."""


def name_tied_parameters_once(model: nn.Module) -> nn.Module:
    """Make `model.state_dict()` hold each tied parameter once, under its first name (T5's `shared.weight`, not also
    `encoder.embed_tokens.weight` and `decoder.embed_tokens.weight`), and let `load_state_dict` accept such a dict.

    Merging then sees one tensor per parameter: a method that weighs tensors differently (Fisher), draws per tensor
    (DARE) or learns per tensor (AdaMerging, through `torch.func.functional_call`, which refuses two values for one
    tied parameter) cannot give a tied parameter two merged values of which loading would keep the last.
    """
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    if not aliases:
        return model

    def drop(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        for alias in aliases:
            state_dict.pop(prefix + alias, None)

    def fill(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
        for alias, canonical in aliases.items():
            if prefix + alias not in state_dict and prefix + canonical in state_dict:
                state_dict[prefix + alias] = state_dict[prefix + canonical]

    model._register_state_dict_hook(drop)
    model._register_load_state_dict_pre_hook(fill, with_module=True)
    return model


class TextModelPool(CheckpointPool):
    """The pretrained model and one expert per task of a text suite (see the module docstring for what is merged)."""

    has_pretrained = True

    def __init__(self, suite_name: str, *, dtype: str | torch.dtype | None = None):
        self.suite = suite(suite_name)
        self.name = suite_name
        self.default_taskpool = suite_name
        self.dtype = parse_dtype(dtype)

    def configure(self, *, dtype: str | None = None, trust_pickle: bool = False) -> None:
        if dtype is not None:
            self.dtype = parse_dtype(dtype)

    @property
    def expert_names(self) -> list[str]:
        return self.suite.task_names

    def repo_id(self, name: str) -> str:
        if name == PRETRAINED:
            return self.suite.base_model
        if name not in self.suite.experts:
            raise KeyError(f"pool {self.name!r} has no model {name!r}; models: {PRETRAINED}, "
                           f"{', '.join(self.suite.experts)}")
        return self.suite.experts[name]

    def repo_ids(self) -> list[str]:
        return [self.repo_id(n) for n in (PRETRAINED, *self.expert_names)]

    def _is_adapter(self, name: str) -> bool:
        return self.suite.lora and name != PRETRAINED

    def location(self, name: str) -> str:
        return hub.model_location(self.repo_id(name), adapter=self._is_adapter(name))

    # -- provenance and resources -------------------------------------------------------------------------------
    def identity(self, name: str) -> str:
        repo = self.repo_id(name)
        ident = f"{repo}@{hub.model_revision(repo)}"
        if self._is_adapter(name):  # a merged adapter also depends on the base it is merged into
            ident += f"+{self.suite.base_model}@{hub.model_revision(self.suite.base_model)}"
        return ident

    def version_info(self) -> dict[str, str]:
        return {f"text_models/{self.name}": ",".join(f"{r}@{hub.model_revision(r)[:12]}" for r in self.repo_ids())}

    def missing_resources(self) -> list[str]:
        if not hub.offline():
            return []
        return [f"model {self.repo_id(n)}" for n in (PRETRAINED, *self.expert_names)
                if hub.model_snapshot(self.repo_id(n), adapter=self._is_adapter(n)) is None]

    def download(self, progress: hub.Progress | None = None) -> None:
        """Fetch every model (and adapter) with its config, tokenizer files and card; offline, refuse at once naming
        whatever is still missing."""
        if hub.offline():
            hub.require_online(self.missing_resources())
            return
        for repo in self.repo_ids():
            hub.download_model(repo, progress)

    # -- loading ------------------------------------------------------------------------------------------------
    def load_model(self, name: str) -> nn.Module:
        arch = self.suite.architecture
        with quiet_transformers():
            if arch == "gpt2":
                from transformers import GPT2Model

                model = GPT2Model.from_pretrained(self.location(name), **dtype_kwargs(self.dtype))
            elif arch == "roberta" and self.suite.head_mode == "expert":
                from transformers import RobertaModel

                model = RobertaModel.from_pretrained(self.location(name), add_pooling_layer=False,
                                                     **dtype_kwargs(self.dtype))
            elif arch == "roberta":
                model = self._padded_classifier()
                model.load_state_dict(self.state_dict(name))
                if self.dtype is not None:
                    model = model.to(self.dtype)
            elif arch == "t5":
                model = name_tied_parameters_once(self._seq2seq(name))
            else:
                raise ValueError(f"unknown architecture {arch!r}")
        return model.eval()

    def _seq2seq(self, name: str) -> nn.Module:
        """A `T5ForConditionalGeneration`; a LoRA expert is the base with its adapter merged in by peft (in float32,
        then cast, so the delta is not rounded twice)."""
        from transformers import T5ForConditionalGeneration

        if not self._is_adapter(name):
            return T5ForConditionalGeneration.from_pretrained(self.location(name), **dtype_kwargs(self.dtype))
        return self.with_adapter(self.location(name))

    def adapter_folder(self, name: str) -> Path | None:
        """The peft LoRA adapter folder of expert `name` on a LoRA suite, None otherwise: methods that merge LoRA
        factors (`knots`, `lora_task_arithmetic`) then never build a full-size update."""
        return Path(self.location(name)) if self._is_adapter(name) else None

    def with_adapter(self, folder: str | Path) -> nn.Module:
        """The pretrained model with the LoRA adapter in `folder` merged in (float32, then cast)."""
        from peft import PeftModel
        from transformers import T5ForConditionalGeneration

        if not self.suite.lora:
            raise ValueError(f"pool {self.name!r} has whole-model experts, not LoRA adapters")
        base = T5ForConditionalGeneration.from_pretrained(hub.model_location(self.suite.base_model))
        merged = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
        return (merged.to(self.dtype) if self.dtype is not None else merged).eval()

    @cached_property
    def _module_keys(self) -> list[str]:
        """The state-dict keys of the mergeable module, from a model built on the meta device."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(hub.model_location(self.suite.base_model))
        with torch.device("meta"):
            if self.suite.architecture == "gpt2":
                from transformers import GPT2Model

                return list(GPT2Model(config).state_dict())
            if self.suite.architecture == "t5":
                from transformers import T5ForConditionalGeneration

                return list(name_tied_parameters_once(T5ForConditionalGeneration(config)).state_dict())
            from transformers import RobertaModel

            return list(RobertaModel(config, add_pooling_layer=False).state_dict())

    def _lazy(self, name: str) -> bool:
        """Whether the model's mergeable tensors can be read from its files one at a time."""
        if self.suite.architecture == "t5":
            return not self._is_adapter(name)
        return self.suite.head_mode == "expert"

    def checkpoint_path(self, name: str) -> Path:
        return Path(self.location(name))

    def source_name(self, name: str) -> str:
        return self.repo_id(name)

    def stored_tensors(self, name: str) -> TensorSource:
        """Safetensors lazily, else the weights-only pickle that older repositories (textattack) only have."""
        return folder_source(self.checkpoint_path(name), self.source_name(name))

    def module_tensors(self, name: str, stored: TensorSource) -> TensorSource:
        """The module's own names: bodies are stored under a prefix beside a head, T5's tied embeddings once."""
        return RenamedSource.for_module(stored, self._module_keys, self.source_name(name),
                                        prefixes=BODY_PREFIXES.get(self.suite.architecture, ("",)),
                                        aliases=TIED_EMBEDDINGS)

    def tensor_source(self, name: str) -> TensorSource:
        """Tensor-by-tensor access to a model's mergeable tensors, under the module's own names: read lazily from
        the files where they hold them, else the state dict of the built model (LoRA experts, padded heads)."""
        if not self._lazy(name):
            return StateDictSource(self.state_dict(name), self.source_name(name))
        return super().tensor_source(name)

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        if self.suite.architecture == "roberta" and self.suite.head_mode == "padded":
            return self._padded_state_dict(name)
        if not self._lazy(name):
            return self.load_model(name).state_dict()
        return super().state_dict(name)

    # -- RoBERTa with zero-padded heads -------------------------------------------------------------------------
    @property
    def max_labels(self) -> int:
        return max(t.num_labels for t in self.suite.tasks.values())

    def _padded_classifier(self) -> nn.Module:
        from transformers import AutoConfig, RobertaForSequenceClassification

        config = AutoConfig.from_pretrained(hub.model_location(self.suite.base_model), num_labels=self.max_labels)
        return RobertaForSequenceClassification(config)

    @cached_property
    def _padded_keys(self) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            module = self._padded_classifier()
        return {k: tuple(v.shape) for k, v in module.state_dict().items()}

    def _padded_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The body as stored, and the expert's head zero-padded to `max_labels` outputs (zero for the pretrained
        model, which has no head)."""
        label = self.repo_id(name)
        files = self.stored_tensors(name)
        present = set(files.keys())
        out: dict[str, torch.Tensor] = {}
        for key, shape in self._padded_keys.items():
            if key.startswith("classifier."):
                if name == PRETRAINED:
                    out[key] = torch.zeros(shape)
                    continue
                stored = files.get(key)
                padded = torch.zeros(shape, dtype=stored.dtype)
                padded[tuple(slice(0, s) for s in stored.shape)] = stored
                out[key] = padded
                continue
            for candidate in (key, key.removeprefix("roberta.")):
                if candidate in present:
                    out[key] = files.get(candidate)
                    break
            else:
                raise KeyError(f"{label}: the checkpoint has no tensor for {key!r}")
        return out

