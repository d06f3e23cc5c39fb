"""The scaling-law report's figures: loss against activated parameters, predicted loss against
sparsity at a fixed budget (S*). matplotlib (the ``report`` extra) on the file-only Agg
backend; the per-job curves are in :mod:`qsparse.analysis.figures`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .figures import report_pyplot, save_figure
from .precision_fit import PAPER_S_STAR, PrecisionFit, format_params
from .sweep import FULL_PRECISION, TERNARY

__all__ = ["plot_loss_vs_activated", "plot_loss_vs_sparsity", "sparsity_plot_ylim"]


def _ratio_groups(fit: PrecisionFit) -> dict[float, list[int]]:
    groups: dict[float, list[int]] = {}
    for i, job in enumerate(fit.jobs):
        groups.setdefault(float(job.settings.get("ratio") or 0.0), []).append(i)
    return dict(sorted(groups.items()))


def _label_log_axis(ax) -> None:
    """Parameter counts (``"3M"``) at the 1, 2 and 5 of every decade of a log x axis, nothing at
    the other minor ticks (matplotlib's default labels every minor tick of a short range in
    scientific notation, and they overlap)."""
    from matplotlib.ticker import FuncFormatter

    def label(value: float, _pos: int) -> str:
        lead = round(value / 10 ** np.floor(np.log10(value)), 6) if value > 0 else 0.0
        return format_params(value) if lead in (1.0, 2.0, 5.0) else ""

    ax.xaxis.set_major_formatter(FuncFormatter(label))
    ax.xaxis.set_minor_formatter(FuncFormatter(label))


def sparsity_plot_ylim(
    grid: np.ndarray, curves: Sequence[np.ndarray], measured_max: Sequence[float]
) -> tuple[float, float] | None:
    """y-range of the loss-against-S panel, shape ``grid: [G]``, each curve ``[G]``.

    From the lowest predicted loss to the highest one inside each fit's measured sparsity range
    ``S <= measured_max[i]`` (at least the curve's value at ``S = 0``), with 5% margins: beyond
    the data the law grows like ``exp(beta / (1 - S))`` and an unclipped axis would flatten
    every curve into a line at its minimum. ``None`` when there is no finite point.
    """
    lows, highs = [], []
    for curve, s_max in zip(curves, measured_max, strict=True):
        finite = np.isfinite(curve)
        if not finite.any():
            continue
        lows.append(float(curve[finite].min()))
        inside = finite & (grid <= max(s_max, float(grid[0])))
        highs.append(float(curve[inside].max()) if inside.any() else float(curve[finite].max()))
    if not lows:
        return None
    lo, hi = min(lows), max(highs)
    pad = 0.05 * (hi - lo) if hi > lo else 0.05 * abs(lo) or 0.05
    return lo - pad, hi + pad


def plot_loss_vs_activated(fits: Sequence[PrecisionFit], path: Path) -> Path:
    """Loss against activated parameters ``(1 - S) N``, one colour per configured top-k
    ratio, one panel per precision; the fitted law drawn through each group's sizes at the
    group's mean S."""
    plt = report_pyplot()

    panels = [f for f in fits if len(f.jobs)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4))
    axes = np.atleast_1d(axes)
    cmap = plt.get_cmap("viridis")
    for ax, fit in zip(axes, panels, strict=False):
        groups = _ratio_groups(fit)
        for gi, (ratio, idx) in enumerate(groups.items()):
            color = cmap(gi / max(1, len(groups) - 1))
            na = (1.0 - fit.s[idx]) * fit.n[idx]
            ax.scatter(na, fit.loss[idx], color=color, label=f"top-k S={ratio:g}", zorder=3)
            if fit.law is not None:
                s_mean = float(np.mean(fit.s[idx]))
                n_grid = np.geomspace(fit.n[idx].min() / 1.5, fit.n[idx].max() * 1.5, 100)
                ax.plot((1 - s_mean) * n_grid, fit.law.loss(n_grid, s_mean), color=color)
        ax.set_xscale("log")
        _label_log_axis(ax)
        ax.set_xlabel("activated parameters (1 - S) N")
        ax.set_ylabel("validation loss")
        title = fit.precision + ("" if fit.law is not None else " (no fit)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_loss_vs_sparsity(fits: Sequence[PrecisionFit], budget: float, path: Path) -> Path:
    """Fitted loss against S at fixed activated parameters ``Na = budget`` per precision,
    S* marked (solid) beside the paper's S* (dotted)."""
    plt = report_pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    grid = np.linspace(0.0, 0.9, 181)
    colors = {FULL_PRECISION: "tab:blue", TERNARY: "tab:red"}
    curves, measured_max = [], []
    for fit in fits:
        if fit.law is None:
            continue
        color = colors.get(fit.precision, "k")
        curve = np.array([fit.law.loss_at_activated(budget, s) for s in grid])
        curves.append(curve)
        measured_max.append(float(fit.s.max()) if len(fit.s) else 0.0)
        ax.plot(grid, curve, color=color, label=f"{fit.precision} fit")
        s_star = fit.law.optimal_sparsity()
        ax.axvline(s_star, color=color, lw=1.2)
        ax.annotate(f"S*={100 * s_star:.1f}%", (s_star, fit.law.loss_at_activated(budget, s_star)),
                    textcoords="offset points", xytext=(4, 8), color=color, fontsize=8)  # fmt: skip
        paper = PAPER_S_STAR.get(fit.precision)
        if paper is not None:
            ax.axvline(paper, color=color, ls=":", lw=1,
                       label=f"paper S*={100 * paper:.2f}% ({fit.precision})")  # fmt: skip
    ylim = sparsity_plot_ylim(grid, curves, measured_max)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel("sparsity S")
    ax.set_ylabel(f"predicted loss at Na = {format_params(budget)}")
    ax.set_title("loss at fixed activated parameters")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return save_figure(fig, path)
