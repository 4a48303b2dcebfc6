"""Routed blocks that replace modules of the pretrained model in an upscaled model.

`WeightEnsemblingBlock` (WEMoE, E-WEMoE) and `RankOneBlock` (Rank-One MoE) compute the block's weights per sample as
θ(x) = θ₀ + Σ_e g_e(x)·Δ_e, with Δ_e a task vector (possibly pruned) or a rank-one component of one, and run the
pretrained block with them. `SmileLinear` (SMILE) routes every token to its top-k low-rank experts and adds their
outputs to the pretrained layer's.

Routing is per sample at evaluation: each sample gets its own weights. With `batch_reduce` (set during test-time
training, as FusionBench's configurations do, to train on one mixture per batch) the coefficients are averaged over the
batch first. When the block is a single `nn.Linear`, the per-sample output is computed in closed form (the output is
linear in the weights: y = base(x) + Σ_e g_e(x)·(Δ_e x)), which equals running the layer once per sample with its own
weights, without materialising them; any other block runs once per sample through `torch.func.functional_call`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from mergebench_core.upscaling.routers import per_sample


def _buffer_name(name: str) -> str:
    return name.replace(".", "__")


class _RoutedBlock(nn.Module):
    """Shared plumbing: a frozen base block, a router (possibly shared with other blocks), and the batch rule."""

    def __init__(self, base: nn.Module, router: nn.Module):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.router = router
        self.batch_reduce = False
        """Average the coefficients over the batch (one mixture for all samples); False routes each sample."""

    def coefficients(self, x: Tensor) -> Tensor:
        """(E,) for a depth-0 router or with `batch_reduce`, else (N, E): one row per sample."""
        gates = self.router(x)
        if gates.dim() == 1:
            return gates
        gates = per_sample(gates)
        return gates.mean(dim=0) if self.batch_reduce else gates

    def weights(self, gates: Tensor) -> dict[str, Tensor]:
        """The block's parameters for one coefficient vector (E,)."""
        raise NotImplementedError

    def linear_delta(self, x: Tensor, gates: Tensor) -> Tensor:
        """Σ_e g_e·(Δ_e x) for a Linear base, gates (N, E): the per-sample closed form."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        gates = self.coefficients(x)
        if gates.dim() == 1:
            return functional_call(self.base, self.weights(gates), (x,))
        if isinstance(self.base, nn.Linear):
            return self.base(x) + self.linear_delta(x, gates)
        return torch.cat([functional_call(self.base, self.weights(g), (x[i:i + 1],)) for i, g in enumerate(gates)])


class WeightEnsemblingBlock(_RoutedBlock):
    """θ(x) = θ₀ + Σ_t g_t(x)·τ_t over every parameter of the block (WEMoE; E-WEMoE with pruned τ)."""

    def __init__(self, base: nn.Module, task_vectors: Mapping[str, Tensor], router: nn.Module):
        super().__init__(base, router)
        own = dict(base.named_parameters())
        missing = [n for n in task_vectors if n not in own]
        if missing:
            raise ValueError(f"task vectors for {missing}, which block {type(base).__name__} does not have")
        self.names = list(task_vectors)
        for name, tau in task_vectors.items():  # (T, *shape): buffers, so they move and count with the model
            self.register_buffer(f"tau_{_buffer_name(name)}", tau.detach().to(own[name].dtype).contiguous())

    def task_vector(self, name: str) -> Tensor:
        return getattr(self, f"tau_{_buffer_name(name)}")

    def weights(self, gates: Tensor) -> dict[str, Tensor]:
        params = dict(self.base.named_parameters())
        for name in self.names:
            params[name] = params[name] + torch.tensordot(gates.to(params[name].dtype), self.task_vector(name), 1)
        return params

    def linear_delta(self, x: Tensor, gates: Tensor) -> Tensor:
        out = 0.0
        tau_w = self.task_vector("weight") if "weight" in self.names else None
        tau_b = self.task_vector("bias") if "bias" in self.names else None
        g = gates if x.dim() == 2 else gates[:, None, :]  # (N, [1,] T) against (N, [L,] T, out)
        if tau_w is not None:
            t, o, i = tau_w.shape
            z = F.linear(x, tau_w.reshape(t * o, i)).unflatten(-1, (t, o))
            out = out + (g.unsqueeze(-1) * z).sum(-2)
        if tau_b is not None:
            out = out + g @ tau_b
        return out if isinstance(out, Tensor) else torch.zeros_like(self.base(x))


class RankOneBlock(_RoutedBlock):
    """θ(x) = θ₀ + Σ_k g_k(x)·s_k u_k v_kᵀ over the block's Linear weights (Rank-One MoE): the experts are the top
    rank_k singular components of every task vector, K = T·rank_k in all, in task-major order; the block's other
    parameters (biases) get a fixed `offsets` (λ·Σ_t τ_t). `select_k` > 0 keeps the largest select_k coefficients
    softly (x · sigmoid(100·(x − the select_k-th largest)), the authors' relaxation); -1 keeps every one."""

    def __init__(self, base: nn.Module, factors: Mapping[str, tuple[Tensor, Tensor]], offsets: Mapping[str, Tensor],
                 router: nn.Module, select_k: int = -1):
        super().__init__(base, router)
        self.names, self.offset_names, self.select_k = list(factors), list(offsets), select_k
        for name, (u, sv) in factors.items():  # u: (K, out), sv: (K, in) with the singular values folded in
            self.register_buffer(f"u_{_buffer_name(name)}", u.detach().contiguous())
            self.register_buffer(f"sv_{_buffer_name(name)}", sv.detach().contiguous())
        for name, delta in offsets.items():
            self.register_buffer(f"offset_{_buffer_name(name)}", delta.detach().contiguous())

    def factor(self, name: str) -> tuple[Tensor, Tensor]:
        key = _buffer_name(name)
        return getattr(self, f"u_{key}"), getattr(self, f"sv_{key}")

    def _select(self, gates: Tensor) -> Tensor:
        if self.select_k <= 0:
            return gates
        threshold = gates.topk(self.select_k, dim=-1).values.min(dim=-1, keepdim=True).values
        return gates * torch.sigmoid(100 * (gates - threshold))

    def _fixed(self) -> dict[str, Tensor]:
        params = dict(self.base.named_parameters())
        for name in self.offset_names:
            params[name] = params[name] + getattr(self, f"offset_{_buffer_name(name)}")
        return params

    def weights(self, gates: Tensor) -> dict[str, Tensor]:
        gates, params = self._select(gates), self._fixed()
        for name in self.names:
            u, sv = self.factor(name)
            params[name] = params[name] + (u * gates[:, None].to(u.dtype)).T @ sv
        return params

    def linear_delta(self, x: Tensor, gates: Tensor) -> Tensor:
        g = self._select(gates)
        g = g if x.dim() == 2 else g[:, None, :]
        u, sv = self.factor("weight")
        out = (F.linear(x, sv) * g) @ u
        for name in self.offset_names:
            delta = getattr(self, f"offset_{_buffer_name(name)}")
            out = out + (F.linear(x, delta) if name == "weight" else delta)
        return out


class SmileLinear(nn.Module):
    """SMILE (Tang et al., 2024): y = W₀x + b₀ + Σ_{t ∈ top-k(x)} w_t(x)·(U_t S_t V_tᵀ x + Δb_t), per token.

    Expert t is the rank-k truncation of τ_t = W_t − W₀ (its bias the bias difference); the router scores expert t by
    ‖V_t[:, :gate_k]ᵀ x‖ (how much of x lies in the input subspace the fine-tuning changed), softmax over experts, keeps
    the top_k and renormalises their weights. Nothing is trained."""

    def __init__(self, base: nn.Linear, gate: Tensor, u: Tensor, svh: Tensor, bias_deltas: Tensor | None,
                 top_k: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.num_experts, self.top_k = u.shape[0], top_k
        self.gate_k = gate.shape[0] // self.num_experts
        self.register_buffer("gate", gate.contiguous())  # (T·gate_k, in): V_t[:, :gate_k]ᵀ stacked
        self.register_buffer("u", u.contiguous())  # (T, out, k)
        self.register_buffer("svh", svh.contiguous())  # (T, k, in): S_t V_tᵀ truncated
        if bias_deltas is not None:
            self.register_buffer("bias_deltas", bias_deltas.contiguous())  # (T, out)
        else:
            self.bias_deltas = None

    def routing(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(weights, experts), each (tokens, top_k), for tokens (tokens, in)."""
        if self.num_experts == 1:
            ones = torch.ones(len(x), 1, dtype=x.dtype, device=x.device)
            return ones, torch.zeros(len(x), 1, dtype=torch.long, device=x.device)
        logits = F.linear(x, self.gate).view(len(x), self.num_experts, self.gate_k).norm(dim=-1)
        weights, chosen = torch.softmax(logits, dim=-1).topk(self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), chosen

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        tokens = x.reshape(-1, x.shape[-1])
        weights, chosen = self.routing(tokens)
        extra = torch.zeros(len(tokens), out.shape[-1], dtype=out.dtype, device=out.device)
        for t in range(self.num_experts):
            rows, slot = torch.nonzero(chosen == t, as_tuple=True)
            if rows.numel() == 0:
                continue
            y = F.linear(F.linear(tokens[rows], self.svh[t]), self.u[t])
            if self.bias_deltas is not None:
                y = y + self.bias_deltas[t]
            extra.index_add_(0, rows, y * weights[rows, slot, None])
        return out + extra.view(out.shape)


class PreferenceBlock(nn.Module):
    """θ(r) = θ₀ + Σ_t g_t(r)·τ_t with the router reading the *preference vector* r over the tasks, not the data
    (PWE-MoE, Tang et al., 2024): the same block gives the model of every trade-off. `set_preference(r)` fixes r for
    the next forward passes (training sets a fresh one every step; evaluation the cell's)."""

    def __init__(self, base: nn.Module, task_vectors: Mapping[str, Tensor], router: nn.Module):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.router = router
        self.names = list(task_vectors)
        for name, tau in task_vectors.items():
            self.register_buffer(f"tau_{_buffer_name(name)}", tau.detach().contiguous())
        self.preference: Tensor | None = None

    def set_preference(self, preference: Tensor) -> None:
        self.preference = preference

    def weights(self) -> dict[str, Tensor]:
        if self.preference is None:
            raise RuntimeError("PreferenceBlock: set a preference vector (set_preference) before the forward pass")
        gates = self.router(self.preference.to(next(self.router.parameters()).device))
        params = dict(self.base.named_parameters())
        for name in self.names:
            tau = getattr(self, f"tau_{_buffer_name(name)}")
            params[name] = params[name] + torch.tensordot(gates.to(tau.dtype), tau, 1)
        return params

    def forward(self, *args: Tensor) -> Tensor:
        return functional_call(self.base, self.weights(), args)


def set_preference(model: nn.Module, preference: Tensor) -> None:
    """Give every preference-routed block of `model` the preference vector r."""
    for module in model.modules():
        if isinstance(module, PreferenceBlock):
            module.set_preference(preference)


def set_batch_reduce(model: nn.Module, value: bool) -> None:
    """Switch every routed block of `model` between one mixture per batch (training) and per sample (evaluation)."""
    for module in model.modules():
        if isinstance(module, _RoutedBlock):
            module.batch_reduce = value


BlockFactory = Callable[[str, nn.Module, list[nn.Module]], nn.Module]
"""(module name, the pretrained module, the experts' modules) -> the routed block that replaces it."""
