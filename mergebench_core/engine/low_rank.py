"""Low-rank truncation of task vectors by SVD, shared by the methods that keep a few singular directions per task
(CART, its AdaMerging variant, AdaRank's starting point)."""

from __future__ import annotations

import torch


def kept_rank(ratio: float, dim: int) -> int:
    """CART's rank rule (the authors' code): none at ratio 0, else max(1, ⌊ratio · dim⌋), at most `dim`."""
    return 0 if ratio <= 0.0 else min(dim, max(1, int(ratio * dim)))


def truncate_each(matrices: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-`rank` approximation of each of the stacked matrices (T, m, n), kept apart (T, m, n)."""
    if rank == 0:
        return torch.zeros_like(matrices)
    u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
    return torch.einsum("tmr,tr,trn->tmn", u[:, :, :rank], s[:, :rank], vh[:, :rank, :])
