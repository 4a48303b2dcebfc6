"""Task arithmetic on LoRA adapters in factored form: Σ_t λ_t·s_t·B_t·A_t written as one peft LoRA adapter.

A sum of low-rank products is itself low-rank, exactly, when the factors are stacked: A = [A_1; …; A_T] (ranks
concatenated) and B = [λ_1·s_1·B_1, …, λ_T·s_T·B_T], with the merged adapter's own scaling set to 1 (lora_alpha = r).
So the merged adapter is as small as the experts together, never materialises a full-size delta, and is loaded like
any peft adapter. A module that some adapter does not adapt contributes zero blocks of that adapter's rank, which
keeps one rank for every module. What this cannot express (DoRA, bias training, modules saved whole, embeddings
adapted in their own layout) is refused by name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mergebench_core.errors import MergebenchError

_A, _B = ".lora_A.weight", ".lora_B.weight"


def read_adapter(folder: Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """(config, {module: (A, B)}, scaling) of a peft LoRA adapter folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    refused = [k for k in ("use_dora",) if config.get(k)] + \
        [k for k in ("modules_to_save", "rank_pattern", "alpha_pattern") if config.get(k)] + \
        (["bias"] if config.get("bias", "none") != "none" else [])
    if config.get("peft_type", "LORA") != "LORA" or refused:
        raise MergebenchError(f"adapter {folder}: factored task arithmetic merges plain LoRA adapters; this one has "
                              f"{'peft_type ' + str(config.get('peft_type')) if not refused else ', '.join(refused)}"
                              f" set. Load it as an expert of CausalLMFolderPool instead (merged into the base)")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    other = [k for k in tensors if not k.endswith((_A, _B))]
    if other:
        raise MergebenchError(f"adapter {folder}: tensors other than lora_A/lora_B ({', '.join(other[:3])}) cannot be "
                              f"merged in factored form")
    modules = {k[: -len(_A)] for k in tensors if k.endswith(_A)}
    factors = {m: (tensors[m + _A], tensors[m + _B]) for m in sorted(modules)}
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return config, factors, scaling


def task_arithmetic_adapter(adapters: Sequence[str | Path], out: str | Path,
                            weights: float | Sequence[float] = 1.0) -> Path:
    """Write to `out` the LoRA adapter whose delta is Σ_t weights[t]·ΔW_t of `adapters` (one folder each, adapters
    of one base model), in factored form; returns `out`."""
    from safetensors.torch import save_file

    if not adapters:
        raise MergebenchError("factored task arithmetic needs at least one adapter folder")
    lambdas = [float(weights)] * len(adapters) if isinstance(weights, (int, float)) else [float(w) for w in weights]
    if len(lambdas) != len(adapters):
        raise MergebenchError(f"{len(lambdas)} weights for {len(adapters)} adapters; give one per adapter")
    read = [read_adapter(Path(a)) for a in adapters]
    bases = {c.get("base_model_name_or_path") for c, _, _ in read}
    if len(bases) > 1:
        raise MergebenchError(f"the adapters were trained on different base models ({', '.join(map(str, bases))}); "
                              f"their deltas do not add up")
    shapes: dict[str, tuple[int, int]] = {}
    for _, factors, _ in read:
        for module, (a, b) in factors.items():
            shapes.setdefault(module, (b.shape[0], a.shape[1]))
    merged: dict[str, torch.Tensor] = {}
    for module, (rows, cols) in sorted(shapes.items()):
        a_blocks, b_blocks = [], []
        for (config, factors, scaling), lam in zip(read, lambdas):
            if module in factors:
                a, b = factors[module]
                a_blocks.append(a.float())
                b_blocks.append(b.float() * (lam * scaling))
            else:  # this adapter leaves the module alone: zero blocks keep one rank for every module
                r = int(config["r"])
                a_blocks.append(torch.zeros(r, cols))
                b_blocks.append(torch.zeros(rows, r))
        merged[module + _A] = torch.cat(a_blocks, 0).contiguous()
        merged[module + _B] = torch.cat(b_blocks, 1).contiguous()
    rank = sum(int(c["r"]) for c, _, _ in read)
    config = dict(read[0][0])
    targets = sorted({t for c, _, _ in read for t in (c.get("target_modules") or [])})
    config.update(r=rank, lora_alpha=rank, use_rslora=False, target_modules=targets, rank_pattern={},
                  alpha_pattern={})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out
