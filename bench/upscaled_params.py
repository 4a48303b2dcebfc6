"""`params ×` of each upscaled method, analytically from an architecture's Linear shapes, checked against a real build.

The count is what `mergebench_core.upscaling.count_parameters` stores with a cell: every tensor the upscaled model
holds (the base's, the experts' task vectors or factors, the routers), over the base's. Formulas, with T experts,
blocks B (each a list of Linear (out, in) shapes and the block's input width d):
- wemoe: base + Σ_B [T·(block weights and biases) + router d·d + d + d·T + T]
- sparse_wemoe: as wemoe with one router per input width (pruned τ are stored dense)
- rankone_moe: base + Σ_B [T·Σ_W k·(out + in) + Σ biases + router (depth 1) d·K + K], K = T·k, k = min(rank_k, W)
- smile: base + Σ_Linear [T·(k·(out + in) + out) + T·gate_k·in], k = min(k, out, in)
- pwe_moe: base + Σ_{MLP and attention blocks} [T·(block weights and biases) + router T·2T + 2T + 2T·T + T]
CLIP-ViT-B/32's vision tower: 12 layers, each q, k, v, o (768 × 768) and an MLP fc1 (3072 × 768), fc2 (768 × 3072),
87,456,000 parameters. On the embedded digits pool the formulas are checked against the models the methods build.

    python bench/upscaled_params.py
"""

from __future__ import annotations

from dataclasses import dataclass

CLIP_B32_BASE = 87_456_000


@dataclass(frozen=True)
class Arch:
    name: str
    base: int
    blocks: list[list[tuple[int, int]]]
    """Per MLP block, its Linear shapes (out, in); the block's input width is the first one's `in`."""
    other_linears: list[tuple[int, int]]
    """Linear layers outside the MLP blocks (attention projections), which only SMILE upscales."""


def clip_b32() -> Arch:
    mlp = [(3072, 768), (768, 3072)]
    return Arch("CLIP-ViT-B/32", CLIP_B32_BASE, [mlp] * 12, [(768, 768)] * 4 * 12)


def wemoe(a: Arch, t: int, shared: bool = False) -> int:
    extra, widths = 0, set()
    for block in a.blocks:
        d = block[0][1]
        extra += t * sum(o * i + o for o, i in block)
        if not shared or d not in widths:
            extra += d * d + d + d * t + t
            widths.add(d)
    return a.base + extra


def rankone(a: Arch, t: int, rank_k: int = 32) -> int:
    extra = 0
    for block in a.blocks:
        k = min([rank_k] + [min(o, i) for o, i in block])
        big_k = t * k
        extra += sum(t * k * (o + i) + o for o, i in block) + block[0][1] * big_k + big_k
    return a.base + extra


def smile(a: Arch, t: int, k: int = 128, gate_k: int = 1) -> int:
    extra = 0
    for o, i in [s for block in a.blocks for s in block] + a.other_linears:
        r = min(o, i)
        extra += t * (min(k, r) * (o + i) + o) + t * min(gate_k, r) * i
    return a.base + extra


def pwe_moe(a: Arch, t: int) -> int:
    """MLP blocks and attention blocks (q, k, v, o: taken four at a time) each become one preference-routed block."""
    attention = [a.other_linears[i:i + 4] for i in range(0, len(a.other_linears), 4)]
    router = t * 2 * t + 2 * t + 2 * t * t + t
    return a.base + sum(t * sum(o * i + o for o, i in block) + router for block in [*a.blocks, *attention])


def digits_check() -> list[list[str]]:
    """The formulas against the real upscaled digits encoder (64 → 256 → 256 → 128 + LayerNorm, 8 experts)."""
    from mergebench_pwe_moe import PWEMoE
    from mergebench_rankone_moe import RankOneMoE
    from mergebench_smile import Smile
    from mergebench_wemoe import SparseWEMoE, WEMoE

    from mergebench_core import RunContext
    from mergebench_core.contract.registry import get_registry
    from mergebench_core.pools.params import make_pool
    from mergebench_core.pools.views import PoolName
    from mergebench_core.upscaling import count_parameters

    pool = make_pool(get_registry().modelpool("digits-mlp_TA8"), PoolName.parse("digits-mlp_TA8"))
    base = pool.load_model("_pretrained_")
    n0 = count_parameters(base)
    arch = Arch("digits", n0, [[(256, 64)], [(256, 256)], [(128, 256)]], [])
    t = len(pool.expert_names)
    rows = []
    for method, formula in ((WEMoE, wemoe(arch, t)), (SparseWEMoE, wemoe(arch, t, shared=True)),
                            (RankOneMoE, rankone(arch, t)), (Smile, smile(arch, t)), (PWEMoE, pwe_moe(arch, t))):
        params = method.Params(steps=0) if "steps" in method.Params.__dataclass_fields__ else method.Params()
        built = count_parameters(method(params).run(pool, RunContext()).model)
        rows.append([method.name, f"{built / n0:.2f}", f"{formula / n0:.2f}", "yes" if built == formula else "NO"])
    return rows


def main() -> int:
    from tabulate import tabulate

    a, t = clip_b32(), 8
    rows = [["wemoe", wemoe(a, t)], ["sparse_wemoe", wemoe(a, t, shared=True)], ["rankone_moe", rankone(a, t)],
            ["smile (k 128)", smile(a, t)], ["smile (k 32)", smile(a, t, k=32)], ["pwe_moe", pwe_moe(a, t)]]
    print(f"{a.name}, {t} experts, base {a.base:,} parameters\n")
    print(tabulate([[n, f"{c:,}", f"{c / a.base:.2f}"] for n, c in rows], headers=["method", "parameters", "params ×"],
                   tablefmt="github"))
    print("\ndigits-mlp_TA8 (8 experts): built model vs formula\n")
    print(tabulate(digits_check(), headers=["method", "params × built", "params × formula", "equal"],
                   tablefmt="github"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
