"""KnOTS (Stoica et al., "Model Merging with SVD to Tie the KnOTS", ICLR 2025; authors' code gstoica27/KnOTS,
FusionBench 0.2.33 `fusion_bench.method.knots.knots_utils.subspace_alignment`): merge LoRA updates after aligning them
in one shared basis.

Per layer, the experts' updates ΔW_t (out × in) are concatenated side by side, [ΔW_1 … ΔW_T] = U S [V_1 … V_T]ᵀ
(singular values ≤ `svd_eps` dropped, SVD in float64), so every task's update is U (S V_tᵀ): one basis U for all
tasks and per-task coefficients C_t = S V_tᵀ. The coefficients, flattened over every layer into one vector per task
(the authors' `s_on_V`), are merged like task vectors by the core's pipeline (`mergebench_core.engine`):
`merge` = "ties" keeps each task's top `k` by magnitude over the whole model (exactly ⌊k·n⌋ entries, the core's
rule; the authors' and FusionBench's code keep one more), elects a sign, and combines the agreeing entries by
`combine` ("mean", the authors' `merging_type`, or "sum"); `merge` = "ta" adds them. The merged update is
λ · U C with λ = `scaling_factor`. Defaults (k 0.2, mean, λ 0.6) are the authors' ViT-B/32 rank-16
`configs/vitB_r16_knots_ties.py`; `svd_eps` 1e-5 is theirs (FusionBench's helper uses 1e-4).

Where it runs: pools whose experts are peft LoRA adapter folders (`adapter_folder`/`with_adapter`: the causal-LM
folder pool, `gemma3-270m_lora4`, `flan-t5-base_glue-lora16`) are merged in factored form, never building a
full-size update: with B̃ = [s_1 B_1 … s_T B_T] = Q R, [ΔW_1 … ΔW_T] = Q · R · blockdiag(A_1 … A_T), whose small
SVD gives U and the coefficients, and the result is written as a peft adapter (B = U, A = λ C, rank at most Σ r_t).
Every other pool with a pretrained model (a LoRA pool whose experts are stored merged, `minilm_text8-lora16`, and
full fine-tunes such as `digits-mlp_TA8`) is merged on its task vectors: every Linear weight is a layer, with its
bias appended as a last column as the authors do, and a tensor no expert changed is left alone (on LoRA pools, all
but the adapted weights). Other changed tensors (norms, embeddings, conv kernels) go through the same
trim/elect/combine on their plain task vectors, as the authors' `merge_other_params`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from mergebench_core import PRETRAINED, MergeOutput, Method, MethodInfo, ModelPool, RunContext, hookimpl
from mergebench_core.engine.exact_topk import keep_count, topk_mask
from mergebench_core.engine.pipeline import Pipeline
from mergebench_core.engine.roles import declared_roles, model_roles
from mergebench_core.engine.task_vector_stages import combine
from mergebench_core.engine.tensor_math import is_mergeable

log = logging.getLogger(__name__)


@dataclass
class Params:
    scaling_factor: float = 0.6
    """λ on the merged update (the authors' ViT-B/32 KnOTS-TIES config)."""
    k: float = 0.2
    """`merge` ties: fraction of each task's aligned coefficients kept by magnitude, over the whole model."""
    merge: str = "ties"
    """"ties" (trim, elect, combine) or "ta" (sum of the aligned coefficients: task arithmetic, exactly)."""
    combine: str = "mean"
    """`merge` ties: "mean" (the authors' disjoint mean) or "sum" of the entries that agree with the sign."""
    svd_eps: float = 1e-5
    """Singular values at or below this are dropped from the shared basis (the authors' threshold)."""

    def __post_init__(self) -> None:
        if not math.isfinite(self.scaling_factor):
            raise ValueError(f"scaling_factor must be a finite number, got {self.scaling_factor}")
        if not 0.0 <= self.k <= 1.0:
            raise ValueError(f"k must be a fraction in [0, 1], got {self.k}")
        if self.merge not in ("ties", "ta"):
            raise ValueError(f"merge must be 'ties' or 'ta', got {self.merge!r}")
        if self.combine not in ("mean", "sum"):
            raise ValueError(f"combine must be 'mean' or 'sum', got {self.combine!r}")
        if not (math.isfinite(self.svd_eps) and self.svd_eps >= 0):
            raise ValueError(f"svd_eps must be a number ≥ 0, got {self.svd_eps}")


@dataclass
class Aligned:
    """One layer in the shared basis: U (out × R) and each task's coefficients C_t (R × in)."""

    basis: torch.Tensor
    coefficients: list[torch.Tensor]


def align(deltas: Sequence[torch.Tensor], eps: float) -> Aligned:
    """The shared basis of the updates `deltas` (each out × in) from the SVD of their concatenation."""
    width = deltas[0].shape[1]
    u, s, vh = torch.linalg.svd(torch.cat([d.double() for d in deltas], 1), full_matrices=False)
    keep = s > eps
    coeffs = (s[keep, None] * vh[keep]).float()
    return Aligned(u[:, keep].float(), list(torch.split(coeffs, width, dim=1)))


def align_factored(factors: Sequence[tuple[torch.Tensor, torch.Tensor]], eps: float) -> Aligned:
    """`align` of the updates B_t A_t given as factors (A_t: r_t × in, B_t: out × r_t, scaling folded into B_t), never
    forming an out × in matrix: [B_1 A_1 … B_T A_T] = Q (R blockdiag(A_t)), and only the small right factor is
    decomposed."""
    q, r = torch.linalg.qr(torch.cat([b.double() for _, b in factors], 1))
    right = r @ torch.block_diag(*[a.double() for a, _ in factors])
    u, s, vh = torch.linalg.svd(right, full_matrices=False)
    keep = s > eps
    width = factors[0][0].shape[1]
    coeffs = (s[keep, None] * vh[keep]).float()
    return Aligned((q @ u[:, keep]).float(), list(torch.split(coeffs, width, dim=1)))


def merge_rows(rows: torch.Tensor, params: Params) -> torch.Tensor:
    """The merged vector of task rows (T, n) by the core's pipeline: ties (global top-k per row, sign election,
    combine) or ta (the sum)."""
    if params.merge == "ta":
        return combine(rows, Pipeline())
    count = keep_count(params.k, rows.shape[1])
    trimmed = torch.stack([row * topk_mask(row, count) for row in rows])
    return combine(trimmed, Pipeline(elect=True, combine=params.combine))


def merge_aligned(layers: dict[str, Aligned], params: Params) -> dict[str, torch.Tensor]:
    """Per layer, the merged coefficients (R × in), unscaled: every layer's coefficients are one vector per task."""
    names = list(layers)
    tasks = len(next(iter(layers.values())).coefficients) if layers else 0
    rows = torch.stack([torch.cat([layers[n].coefficients[t].reshape(-1) for n in names]) for t in range(tasks)]) \
        if layers else torch.zeros(0, 0)
    merged = merge_rows(rows, params) if layers else rows
    out, start = {}, 0
    for n in names:
        shape = layers[n].coefficients[0].shape
        out[n] = merged[start:start + shape.numel()].view(shape)
        start += shape.numel()
    return out


def knots_task_vectors(base: dict[str, torch.Tensor], experts: Sequence[dict[str, torch.Tensor]],
                       linear: set[str], params: Params) -> dict[str, torch.Tensor]:
    """The merged update of every floating-point tensor of `base` (unscaled), from full state dicts: the weights named
    in `linear` (with their biases as a last column) aligned, the rest merged on plain task vectors."""
    keys = [k for k, v in base.items() if is_mergeable(v.dtype)]
    layers: dict[str, Aligned] = {}
    bias_of: dict[str, str] = {}
    for key in keys:
        if key not in linear:
            continue
        deltas = [e[key].float() - base[key].float() for e in experts]
        bias = key[: -len("weight")] + "bias" if key.endswith("weight") else ""
        if bias in base and base[bias].shape == (base[key].shape[0],):
            bias_of[key] = bias
            deltas = [torch.cat([d, (e[bias].float() - base[bias].float())[:, None]], 1)
                      for d, e in zip(deltas, experts)]
        if not any(bool(d.any()) for d in deltas):
            continue  # no expert changed this layer (a module no adapter targets)
        layers[key] = align(deltas, params.svd_eps)
    out: dict[str, torch.Tensor] = {}
    for key, coeffs in merge_aligned(layers, params).items():
        update = layers[key].basis @ coeffs
        if key in bias_of:
            out[bias_of[key]] = update[:, -1]
            update = update[:, :-1]
        out[key] = update.view(base[key].shape)
    others = [k for k in keys if k not in out and k not in linear
              and any(not torch.equal(e[k], base[k]) for e in experts)]  # unchanged tensors (LoRA pools) stay
    if others:
        rows = torch.stack([torch.cat([(e[k].float() - base[k].float()).reshape(-1) for k in others])
                            for e in experts])
        merged, start = merge_rows(rows, params), 0
        for k in others:
            n = base[k].numel()
            out[k] = merged[start:start + n].view(base[k].shape)
            start += n
    return out


@runtime_checkable
class AdapterPool(Protocol):
    """A pool whose experts may be peft LoRA adapter folders of its pretrained model (the causal-LM folder pool)."""

    def adapter_folder(self, name: str) -> Path | None: ...

    def with_adapter(self, folder: str | Path) -> nn.Module: ...


def knots_adapter(folders: Sequence[Path], out: Path, params: Params) -> Path:
    """Write to `out` the peft LoRA adapter KnOTS makes of the adapters in `folders`, in factored form."""
    from safetensors.torch import save_file

    from mergebench_lmeval.lora_factored import read_adapter  # the pools that hand out adapter folders ship it

    read = [read_adapter(Path(f)) for f in folders]
    modules = sorted({m for _, factors, _ in read for m in factors})
    layers: dict[str, Aligned] = {}
    for module in modules:
        shape = next((b.shape[0], a.shape[1]) for _, f, _ in read if module in f for a, b in [f[module]])
        factors = []
        for config, f, scaling in read:
            a, b = f.get(module, (torch.zeros(int(config["r"]), shape[1]), torch.zeros(shape[0], int(config["r"]))))
            factors.append((a.float(), b.float() * scaling))
        layers[module] = align_factored(factors, params.svd_eps)
    merged = merge_aligned(layers, params)
    rank = max([1, *(c.shape[0] for c in merged.values())])
    tensors = {}
    for module, coeffs in merged.items():
        pad = rank - coeffs.shape[0]  # peft keeps one rank for every module: zero blocks fill the rest
        tensors[module + ".lora_A.weight"] = torch.cat([params.scaling_factor * coeffs,
                                                        torch.zeros(pad, coeffs.shape[1])]).contiguous()
        basis = layers[module].basis
        tensors[module + ".lora_B.weight"] = torch.cat([basis, torch.zeros(basis.shape[0], pad)], 1).contiguous()
    config = dict(read[0][0])
    config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={},
                  target_modules=sorted({t for c, _, _ in read for t in (c.get("target_modules") or [])}))
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


class Knots(Method):
    """Align the experts' updates in one SVD basis per layer, then merge the per-task coefficients by TIES."""

    name = "knots"
    Params = Params
    info = MethodInfo(kind="merge", data="none", task_vectors=True)

    def run(self, pool: ModelPool, ctx: RunContext) -> MergeOutput:
        experts = list(pool.expert_names)
        if isinstance(pool, AdapterPool) and experts and all(pool.adapter_folder(e) is not None for e in experts):
            folders = [Path(pool.adapter_folder(e)) for e in experts]  # type: ignore[arg-type]
            key = hashlib.sha256(json.dumps([[pool.identity(e) for e in experts], vars(self.params),
                                             ctx.method_version]).encode()).hexdigest()[:16]
            out = knots_adapter(folders, Path(ctx.cache_dir) / "lora-merges" / f"knots-{key}", self.params)
            ctx.log.info("merged adapter written to %s", out)
            return MergeOutput(pool.with_adapter(out), extras={"adapter": str(out), "form": "factored"})
        model = pool.load_model(PRETRAINED)
        roles = model_roles(model, declared_roles(pool))
        linear = {k for k, r in roles.items() if r.kind == "weight" and r.view is not None and r.view.kind == "linear"}
        base = pool.state_dict(PRETRAINED)
        updates = knots_task_vectors(base, [pool.state_dict(e) for e in experts], linear, self.params)
        state = {k: (v.float() + self.params.scaling_factor * updates[k]).to(v.dtype) if k in updates else v
                 for k, v in base.items()}
        model.load_state_dict(state)
        return MergeOutput(model, extras={"form": "task vectors", "aligned_layers": len(linear & set(updates))})


@hookimpl
def register_methods(register):
    register(Knots)
