"""KnOTS against closed forms (alignment reconstructs every update; with `merge` ta it is task arithmetic exactly;
a hand-computed TIES case in the aligned basis), the factored path against the dense one, and FusionBench 0.2.33's
`subspace_alignment` and TIES helpers within 1e-5."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mergebench_knots import (Knots, Params, align, align_factored, knots_adapter, knots_task_vectors, merge_aligned,
                              merge_rows)


def lowrank(out: int, inp: int, rank: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(out, rank, generator=g) @ torch.randn(rank, inp, generator=g)


def test_alignment_reconstructs_each_update_in_one_shared_basis():
    g = torch.Generator().manual_seed(0)
    deltas = [lowrank(6, 5, 2, g) for _ in range(3)]
    aligned = align(deltas, 1e-5)
    assert aligned.basis.shape == (6, 6)  # rank 6 = min(6, 3·2): three rank-2 updates span the whole output space
    torch.testing.assert_close(aligned.basis.T @ aligned.basis, torch.eye(6), atol=1e-5, rtol=0)
    for d, c in zip(deltas, aligned.coefficients):
        torch.testing.assert_close(aligned.basis @ c, d, atol=1e-5, rtol=1e-5)
    # rank-deficient concatenation: singular values below eps are dropped
    small = [lowrank(8, 5, 1, g) for _ in range(2)]
    assert align(small, 1e-5).basis.shape == (8, 2)


def test_ta_is_task_arithmetic_exactly():
    g = torch.Generator().manual_seed(1)
    base = {"fc.weight": torch.randn(6, 4, generator=g), "fc.bias": torch.randn(6, generator=g),
            "norm.weight": torch.randn(6, generator=g)}
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    out = knots_task_vectors(base, experts, {"fc.weight"}, Params(merge="ta"))
    for k in base:
        torch.testing.assert_close(out[k], sum(e[k] - base[k] for e in experts), atol=1e-5, rtol=1e-5)


def test_ties_in_the_aligned_basis_by_hand():
    # Two tasks with orthogonal column spaces: [ΔW_1 ΔW_2] = [3·e1 a1ᵀ, 2·e2 a2ᵀ] has U = (±e1, ±e2) and coefficients
    # C_1 = (3 a1ᵀ; 0), C_2 = (0; 2 a2ᵀ). With a1 = (1, 2), a2 = (-1, 0.5) each task's 4 coefficients are
    # [3, 6, 0, 0] and [0, 0, -2, 1] (up to the basis' signs); k = 0.5 keeps 2 of 4 per task: both non-zeros
    # survive, no entry is shared, so the mean is each alone and the merge is ΔW_1 + ΔW_2. With k = 0.25 each task
    # keeps its largest only: 6 (of task 1) and -2 (of task 2).
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    d1, d2 = 3 * torch.outer(e1, torch.tensor([1.0, 2.0])), 2 * torch.outer(e2, torch.tensor([-1.0, 0.5]))
    aligned = align([d1, d2], 1e-5)
    merged = merge_aligned({"w": aligned}, Params(k=0.5))["w"]
    torch.testing.assert_close(aligned.basis @ merged, d1 + d2, atol=1e-6, rtol=0)
    merged = merge_aligned({"w": aligned}, Params(k=0.25))["w"]
    torch.testing.assert_close(aligned.basis @ merged, torch.tensor([[0.0, 6.0], [-2.0, 0.0]]), atol=1e-6, rtol=0)


def test_disjoint_mean_of_agreeing_coefficients():
    rows = torch.tensor([[4.0, -1.0, 2.0, 0.0], [2.0, 3.0, -6.0, 1.0]])
    # k = 1: nothing trimmed; signs: + (3), + (2), − (−4), + (1); means of the agreeing entries
    torch.testing.assert_close(merge_rows(rows, Params(k=1.0)), torch.tensor([3.0, 3.0, -6.0, 1.0]))
    torch.testing.assert_close(merge_rows(rows, Params(k=1.0, combine="sum")), torch.tensor([6.0, 3.0, -6.0, 1.0]))
    # k = 0.5: task 1 keeps 4, 2; task 2 keeps 3, −6 → +, +, −(2 − 6), 0
    torch.testing.assert_close(merge_rows(rows, Params(k=0.5)), torch.tensor([4.0, 3.0, -6.0, 0.0]))


def test_factored_alignment_equals_the_dense_one():
    g = torch.Generator().manual_seed(2)
    factors = [(torch.randn(3, 7, generator=g), torch.randn(9, 3, generator=g)) for _ in range(3)]
    dense = align([b @ a for a, b in factors], 1e-5)
    fact = align_factored(factors, 1e-5)
    assert fact.basis.shape == dense.basis.shape == (9, 9)
    for c_dense, c_fact, (a, b) in zip(dense.coefficients, fact.coefficients, factors):
        torch.testing.assert_close(fact.basis @ c_fact, b @ a, atol=1e-4, rtol=1e-5)
    md = merge_aligned({"w": dense}, Params())["w"]
    mf = merge_aligned({"w": fact}, Params())["w"]
    torch.testing.assert_close(fact.basis @ mf, dense.basis @ md, atol=1e-4, rtol=1e-5)


def _write_adapter(folder: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], r: int, alpha: float) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    tensors = {}
    for m, (a, b) in factors.items():
        tensors[m + ".lora_A.weight"], tensors[m + ".lora_B.weight"] = a.contiguous(), b.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                                                           "target_modules": ["q"], "base_model_name_or_path": "x"}))
    return folder


def test_adapter_folders_are_merged_in_factored_form(tmp_path):
    pytest.importorskip("safetensors")
    pytest.importorskip("mergebench_lmeval")
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(3)
    modules = ["layer.0.q", "layer.1.q"]
    adapters = [{m: (torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g)) for m in modules}
                for _ in range(3)]
    folders = [_write_adapter(tmp_path / f"a{i}", f, r=2, alpha=4.0) for i, f in enumerate(adapters)]
    params = Params()
    out = load_file(str(knots_adapter(folders, tmp_path / "merged", params) / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] and out["layer.0.q.lora_A.weight"].shape[0] == config["r"] <= 6
    # the dense path on the materialised updates (scaling α/r = 2) gives the same merged updates
    base = {m + ".weight": torch.zeros(5, 6) for m in modules}
    experts = [{m + ".weight": 2.0 * b @ a for m, (a, b) in f.items()} for f in adapters]
    dense = knots_task_vectors(base, experts, set(base), params)
    for m in modules:
        got = out[m + ".lora_B.weight"] @ out[m + ".lora_A.weight"]
        torch.testing.assert_close(got, params.scaling_factor * dense[m + ".weight"], atol=1e-4, rtol=1e-4)


def test_parity_with_fusionbench_alignment_and_ties():
    pytest.importorskip("fusion_bench")
    try:
        from fusion_bench.method.knots.knots_utils import subspace_alignment
        from fusion_bench.method.ties_merging.ties_merging_utils import disjoint_merge, resolve_sign, topk_values_mask
    except ImportError as exc:  # FusionBench installed without one of its own dependencies
        pytest.skip(f"FusionBench's helpers do not import here: {exc}")

    g = torch.Generator().manual_seed(4)
    layers = {"a": [lowrank(8, 6, 2, g) for _ in range(3)], "b": [lowrank(5, 7, 2, g) for _ in range(3)]}
    # FusionBench: its alignment (eps 1e-4), its TIES helpers on the flattened coefficients, disjoint mean
    fb_aligned = {n: subspace_alignment(d, eps=1e-4) for n, d in layers.items()}
    rows = torch.stack([torch.cat([(torch.diag(s) @ vhs[t]).reshape(-1) for _, (u, s, vhs) in fb_aligned.items()])
                        for t in range(3)])
    n = rows.shape[1]
    fb_k = 0.2
    trimmed, *_ = topk_values_mask(rows.clone(), K=fb_k)
    fb_merged = disjoint_merge(trimmed, "mean", resolve_sign(trimmed))
    # mergebench keeps exactly ⌊k·n⌋ entries, FusionBench one more: ask for the same count
    ours_k = (int(n * fb_k) + 1) / n
    ours = {nm: align(d, 1e-4) for nm, d in layers.items()}
    merged = merge_aligned(ours, Params(k=ours_k))
    start = 0
    for nm, (u, s, vhs) in fb_aligned.items():
        size = vhs[0].shape[0] * vhs[0].shape[1]
        expected = u @ fb_merged[start:start + size].view(vhs[0].shape)
        start += size
        torch.testing.assert_close(ours[nm].basis @ merged[nm], expected.float(), atol=1e-5, rtol=1e-5)
        for t in range(3):
            torch.testing.assert_close(ours[nm].basis @ ours[nm].coefficients[t],
                                       (u @ torch.diag(s) @ vhs[t]).float(), atol=1e-5, rtol=1e-5)


def test_runs_on_a_full_weight_pool(digits_pools):
    from mergebench_core import RunContext

    pool, _ = digits_pools
    out = Knots(Params(merge="ta", scaling_factor=0.3)).run(pool, RunContext())
    # with merge ta, KnOTS is task arithmetic on every tensor
    base = pool.state_dict("_pretrained_")
    experts = [pool.state_dict(e) for e in pool.expert_names]
    for k, v in out.model.state_dict().items():
        torch.testing.assert_close(v, base[k] + 0.3 * sum(e[k] - base[k] for e in experts), atol=1e-5, rtol=1e-5)
    assert out.extras["aligned_layers"] == 3


def test_params_are_validated():
    with pytest.raises(ValueError, match="merge"):
        Params(merge="dare")
    with pytest.raises(ValueError, match="k must"):
        Params(k=1.5)


def test_peft_adapter_pool_is_merged_in_factored_form_equal_to_the_dense_merge(tmp_path):
    peft = pytest.importorskip("peft")
    pytest.importorskip("mergebench_lmeval")
    from transformers import AutoModelForCausalLM

    from mergebench_core import PRETRAINED, RunContext
    from mergebench_core.engine.roles import roles_of
    from mergebench_lmeval import CausalLMFolderPool
    from mergebench_lmeval.testing import save_model

    base = save_model(tmp_path / "pretrained")
    folders = {}
    for i, (task, r) in enumerate((("tiny_mc", 2), ("tiny_gen", 3))):
        config = peft.LoraConfig(r=r, lora_alpha=4.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        with torch.random.fork_rng():
            torch.manual_seed(20 + i)
            adapted = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)), config)
        adapted.save_pretrained(tmp_path / task)
        folders[task] = tmp_path / task
    pool = CausalLMFolderPool(base, folders, name="tiny-lora")
    out = Knots(Params()).run(pool, RunContext(cache_dir=tmp_path / "cache"))
    assert out.extras["form"] == "factored"
    merged = out.model.state_dict()
    pretrained = pool.load_model(PRETRAINED)
    linear = {k for k, r in roles_of(pretrained).items() if r.kind == "weight" and r.view is not None}
    dense = knots_task_vectors(pretrained.state_dict(), [pool.load_model(t).state_dict() for t in folders], linear,
                               Params())
    for key, value in pretrained.state_dict().items():
        expected = value + Params().scaling_factor * dense[key] if key in dense else value
        torch.testing.assert_close(merged[key], expected, atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(merged[k], v) for k, v in pretrained.state_dict().items())
