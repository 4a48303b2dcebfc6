"""The experiment's result as tables (github, latex or html) and its regressions as a figure."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from mergebench_core import MergebenchError
from mergebench_mergeability.running import ExperimentResult
from mergebench_mergeability.statistics import Paired, Regression


def _pct(value: float | None, digits: int = 1) -> str:
    return "" if value is None or not math.isfinite(value) else f"{100 * value:.{digits}f}"


def _delta(p: Paired | None) -> str:
    if p is None or p.n == 0:
        return ""
    if not math.isfinite(p.low):
        return f"{100 * p.mean:+.2f}"
    return f"{100 * p.mean:+.2f} [{100 * p.low:+.2f}, {100 * p.high:+.2f}]"


def render(result: ExperimentResult, fmt: str = "github") -> str:
    from tabulate import tabulate

    tablefmt = {"github": "github", "latex": "latex_booktabs", "html": "html"}.get(fmt, fmt)
    exp = result.experiment
    out = []
    rows = [[s.recipe, s.pool, _pct(s.expert_accuracy), f"{s.tau_norm:.3f}",
             f"{s.train_seconds:.1f}" if s.trained_now else "cached"] for s in result.recipes]
    out.append(f"### Recipes on {exp.modelpool} ({exp.trainer}; experts of {len(exp.tasks)} tasks)\n")
    out.append(tabulate(rows, headers=["Recipe (suffix)", "Derived pool", "Experts' acc. (%)", "Mean ‖τ‖",
                                       "Training (s)"], tablefmt=tablefmt, disable_numparse=True))
    out.append("\n### Experts: accuracy on their own task (%) / ‖τ‖; each column is a recipe, named as the guide "
               "names its checkpoints\n")
    rows = []
    for task in exp.tasks:
        row = [task]
        for summary in result.recipes:
            e = summary.experts.get(f"{task}{summary.suffix}", {})
            row.append(f"{_pct(e.get('accuracy'))} / {e.get('tau_norm', math.nan):.3f}")
        rows.append(row)
    out.append(tabulate(rows, headers=["Task", *[f"{{task}}{s.suffix}" for s in result.recipes]],
                        tablefmt=tablefmt, disable_numparse=True))
    n_draws = len(result.draws)
    out.append(f"\n### Validation: each expert merged with {exp.partners} held-out partners, {len(exp.seeds)} "
               f"partner seed(s), {n_draws} draws; Δ = paired difference to baseline on the same draws, mean "
               f"[95 % t-interval], in points\n")
    rows = [[c.recipe, c.method, _pct(c.accuracy), _pct(c.normalized), _delta(c.delta_accuracy),
             _delta(c.delta_normalized), c.n] for c in result.comparison]
    out.append(tabulate(rows, headers=["Recipe", "Method", "Avg. (%)", "Norm. (%)", "Δ Avg.", "Δ Norm.", "n"],
                        tablefmt=tablefmt, disable_numparse=True))
    if result.regressions:
        first = next(iter(result.regressions.values()))
        out.append(f"\n### Stability: normalized accuracy of each merged group regressed on its features "
                   f"(standardised coefficients, {int(100 * first.level)} % bootstrap intervals over groups, "
                   f"{first.bootstrap} resamples)\n")
        rows = []
        for method, reg in result.regressions.items():
            for i, name in enumerate(reg.features):
                lo, hi = reg.intervals[i]
                rows.append([method if i == 0 else "", f"{reg.r2:.2f}" if i == 0 else "", reg.n if i == 0 else "",
                             name, f"{reg.coefficients[i]:+.3f}", f"[{lo:+.3f}, {hi:+.3f}]",
                             f"{reg.vif[i]:.1f}"])
        out.append(tabulate(rows, headers=["Method", "R²", "Groups", "Feature", "Coef.", "95 % interval", "VIF"],
                            tablefmt=tablefmt, disable_numparse=True))
    return "\n".join(out)


def coefficient_figure(regressions: Mapping[str, Regression], out: str | Path, title: str = "") -> Path:
    """Each feature's standardised coefficient per method, with its bootstrap interval (PNG, SVG or PDF)."""
    from mergebench_core.results.plots import PLOT_FORMATS, _pyplot

    out = Path(out)
    if out.suffix.lower() not in PLOT_FORMATS:
        raise MergebenchError(f"plot file {str(out)!r}: use a .png, .svg or .pdf name")
    if not regressions:
        raise MergebenchError("no regression to plot: run with --analyze")
    plt = _pyplot()
    methods = list(regressions)
    features = regressions[methods[0]].features
    fig, ax = plt.subplots(figsize=(1.6 + 1.9 * len(features), 4.2))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        reg = regressions[method]
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(features))]
        lo = [c - a for c, (a, _) in zip(reg.coefficients, reg.intervals)]
        hi = [b - c for c, (_, b) in zip(reg.coefficients, reg.intervals)]
        ax.errorbar(xs, reg.coefficients, yerr=[lo, hi], fmt="o", capsize=3, label=f"{method} (R² {reg.r2:.2f})")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(features)))
    ax.set_xticklabels(features, fontsize=8)
    ax.set_ylabel("standardised coefficient")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "normalized merged accuracy vs group features", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
