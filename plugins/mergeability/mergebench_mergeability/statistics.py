"""Statistics of the mergeability experiment: paired Student-t intervals for "does this recipe merge better than
the baseline on the same draws", and standardised regressions with bootstrap intervals for "which features of a
group predict how well it merges". numpy only, so that every number can be checked against a known answer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mergebench_core import MergebenchError


def student_t_quantile(p: float, df: float) -> float:
    """The p-quantile (0.5 < p < 1) of Student's t with `df` degrees of freedom: the CDF (Simpson's rule on the
    density, in the variable u = atan(x/√df), where the integrand is smooth and bounded) inverted by bisection."""
    if not (0.5 < p < 1) or df <= 0:
        raise ValueError(f"need 0.5 < p < 1 and df > 0, got p={p}, df={df}")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        # x = √df tan u, dx = √df sec²u du, (1 + x²/df) = sec²u: density·dx = c √df cos^(df-1)(u) du
        upper, n = math.atan(x / math.sqrt(df)), 2000
        h = upper / n
        total = 0.0
        for i in range(n + 1):
            w = 1 if i in (0, n) else (4 if i % 2 else 2)
            total += w * math.cos(i * h) ** (df - 1)
        return 0.5 + math.exp(log_c) * math.sqrt(df) * total * h / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass
class Paired:
    """A paired comparison: the mean of the differences and its Student-t interval."""

    mean: float
    low: float
    high: float
    n: int


def paired_interval(differences: Sequence[float], level: float = 0.95) -> Paired:
    """Mean of paired differences with the Student-t interval mean ± t_{(1+level)/2, n−1} · sd / √n (nan bounds
    for fewer than two differences)."""
    d = np.asarray([x for x in differences if x is not None and math.isfinite(x)], dtype=np.float64)
    n = len(d)
    if n == 0:
        return Paired(math.nan, math.nan, math.nan, 0)
    mean = float(d.mean())
    if n < 2:
        return Paired(mean, math.nan, math.nan, n)
    half = student_t_quantile((1 + level) / 2, n - 1) * float(d.std(ddof=1)) / math.sqrt(n)
    return Paired(mean, mean - half, mean + half, n)


@dataclass
class Regression:
    """A standardised linear regression of an outcome on features."""

    features: list[str]
    coefficients: list[float]
    """Standardised coefficients: the outcome's change in standard deviations per standard deviation of a feature,
    the others held fixed."""
    intervals: list[tuple[float, float]]
    """Percentile bootstrap intervals of the coefficients."""
    r2: float
    n: int
    vif: list[float]
    """Variance inflation factors: 1 / (1 − R²) of each feature regressed on the others."""
    bootstrap: int
    level: float = 0.95


def _standardised_fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float] | None:
    sx, sy = x.std(axis=0), y.std()
    if sy == 0 or np.any(sx == 0):
        return None
    z, zy = (x - x.mean(axis=0)) / sx, (y - y.mean()) / sy
    beta, *_ = np.linalg.lstsq(z, zy, rcond=None)
    residual = zy - z @ beta
    return beta, 1.0 - float(residual @ residual) / float(zy @ zy)


def standardized_regression(x: Any, y: Any, features: Sequence[str], *, bootstrap: int = 2000, seed: int = 0,
                            level: float = 0.95) -> Regression:
    """Least squares of z-scored `y` on z-scored columns of `x` (n × p), with percentile bootstrap intervals over
    rows (resamples where a column or y is constant are drawn again)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n, p = x.shape
    if n < p + 2:
        raise MergebenchError(f"a regression on {p} features needs at least {p + 2} merged groups, got {n}")
    fit = _standardised_fit(x, y)
    if fit is None:
        constant = [f for f, s in zip(features, x.std(axis=0)) if s == 0] or ["the outcome"]
        raise MergebenchError(f"cannot standardise: {', '.join(constant)} does not vary over the {n} groups")
    beta, r2 = fit
    corr = np.corrcoef(x, rowvar=False).reshape(p, p)
    try:
        vif = [float(v) for v in np.diag(np.linalg.inv(corr))]
    except np.linalg.LinAlgError:
        vif = [math.inf] * p
    rng = np.random.default_rng(seed)
    draws, attempts = [], 0
    while len(draws) < bootstrap and attempts < 10 * bootstrap:
        attempts += 1
        rows = rng.integers(0, n, n)
        refit = _standardised_fit(x[rows], y[rows])
        if refit is not None:
            draws.append(refit[0])
    intervals = [(math.nan, math.nan)] * p
    if draws:
        stacked = np.stack(draws)
        tail = 100 * (1 - level) / 2
        lo, hi = np.percentile(stacked, tail, axis=0), np.percentile(stacked, 100 - tail, axis=0)
        intervals = [(float(a), float(b)) for a, b in zip(lo, hi)]
    return Regression(list(features), [float(b) for b in beta], intervals, r2, n, vif, len(draws), level)
