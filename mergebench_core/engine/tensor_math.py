"""Small tensor rules that every data-free method shares: which tensors are merged at all, finiteness, stacked task
vectors, and the polar factor of the spectral methods."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergebench_core.errors import CheckpointError


def check_finite(tensor: torch.Tensor, key: str, source: str) -> None:
    """Raise if `tensor` holds NaN or ±inf.

    min and max of a tensor are both finite exactly when every entry is (NaN propagates through them); one fused
    min/max reduction costs about as much as a sum, where `isfinite(t).all()` writes a mask first (~20x slower).
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    lo, hi = torch.aminmax(tensor)
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(f"tensor {key!r} in {source} has {bad} non-finite values (NaN or inf)")


def task_vectors(experts: Sequence[torch.Tensor], base: torch.Tensor,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stacked task vectors, shape (n_experts, *base.shape), written in place into one fresh tensor.

    Subtracting into slices of a preallocated result avoids the temporary per expert that `torch.stack` would copy,
    and tensors already in `dtype` are not converted at all.
    """
    b = base if base.dtype == dtype else base.to(dtype)
    out = torch.empty((len(experts), *base.shape), dtype=dtype, device=base.device)
    for i, e in enumerate(experts):
        torch.sub(e if e.dtype == dtype else e.to(dtype), b, out=out[i])
    return out


def is_mergeable(tensor_dtype: torch.dtype) -> bool:
    """Only floating-point tensors are merged; integer buffers (position ids, counters) are copied."""
    return tensor_dtype.is_floating_point


def polar_factor(a: torch.Tensor) -> torch.Tensor:
    """The orthonormal matrix nearest to `a` in Frobenius norm (orthogonal Procrustes): U Vᵀ from a = U Σ Vᵀ.

    The spectral methods (TSV-M, Iso-CTS) use it to decorrelate concatenated singular bases.
    """
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u @ vh

