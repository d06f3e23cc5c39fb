"""Sweep report: the scaling-law fit per precision, S*, a table, plots, and wandb.

For each precision (full-precision weights, BitNet b1.58 ternary weights) the finished jobs
give points ``(N, S, L)``: N = ``params_total``, S from :func:`~qsparse.analysis.sweep.
law_sparsity`, L = ``val_loss``. :func:`~qsparse.analysis.scaling_law.fit_scaling_law` fits

    L(N, S) = E + (B + C exp(beta / (1 - S))) / N^alpha

(L-BFGS on Huber(delta=1e-3) of log-loss residuals over a grid of starts) and
:func:`~qsparse.analysis.scaling_law.bootstrap_scaling_law` gives percentile intervals. At
fixed activated parameters ``Na = (1 - S) N`` the loss is minimal at
``S* = argmin_S (B + C e^{beta/(1-S)}) (1-S)^alpha`` (independent of Na); the report also
gives the predicted loss at S* and dense at a chosen budget Na. The paper (Q-Sparse §3)
finds S* = 45.58% (full precision) and 61.25% (1.58-bit).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .figures import curve_table, distinct_overrides, figure_plots, report_pyplot, save_figure
from .scaling_law import (
    BOOTSTRAP_NAMES,
    BootstrapIntervals,
    ScalingLaw,
    bootstrap_scaling_law,
    fit_scaling_law,
)
from .sweep import FULL_PRECISION, TERNARY, Sweep, SweepJob, law_sparsity

#: S* of the paper's fits (Q-Sparse §3), by precision.
PAPER_S_STAR = {FULL_PRECISION: 0.4558, TERNARY: 0.6125}


@dataclass
class PrecisionFit:
    """The fit of one precision's points, or why there is none (``reason``)."""

    precision: str
    jobs: list[SweepJob]
    n: np.ndarray
    s: np.ndarray
    loss: np.ndarray
    law: ScalingLaw | None = None
    intervals: BootstrapIntervals | None = None
    reason: str = ""

    @property
    def s_star(self) -> float | None:
        return None if self.law is None else self.law.optimal_sparsity()


def fit_precision(
    precision: str,
    jobs: Sequence[SweepJob],
    sparsity_mode: str = "overall",
    n_boot: int = 200,
    seed: int = 0,
) -> PrecisionFit:
    """Fit ``L(N, S)`` to one precision's finished jobs (needs >= 5 points, >= 2 sizes and
    >= 2 sparsities; otherwise ``law`` is ``None`` and ``reason`` says why)."""
    jobs = [j for j in jobs if j.status == "ok" and j.precision == precision]
    n = np.array([float(j.summary["params_total"]) for j in jobs])
    s = np.array([law_sparsity(j, sparsity_mode) for j in jobs])
    y = np.array([float(j.summary["val_loss"]) for j in jobs])
    out = PrecisionFit(precision, list(jobs), n, s, y)
    if len(jobs) < 5:
        out.reason = f"{len(jobs)} finished job(s); fitting 5 constants needs at least 5"
    elif len(set(n.tolist())) < 2:
        out.reason = "one model size only: alpha and E cannot be separated"
    elif len(set(np.round(s, 4).tolist())) < 2:
        out.reason = "one sparsity only: A(S) cannot be fitted"
    if out.reason:
        return out
    out.law = fit_scaling_law(n, s, y)
    if n_boot > 0:
        out.intervals = bootstrap_scaling_law(n, s, y, fit=out.law, n_boot=n_boot, seed=seed)
    return out


def default_budget(sweep: Sweep) -> float:
    """The median activated parameters of the finished jobs (the S* plot's Na)."""
    values = [float(j.summary.get("params_activated") or 0) for j in sweep.ok]
    values = [v for v in values if v > 0]
    return float(np.median(values)) if values else 1e6


def _fmt_params(x: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def parse_params(text: str) -> float:
    """``"2.9B"``, ``"350M"``, ``"120K"`` or ``"1e6"`` to a number of parameters."""
    t = text.strip().upper()
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}.get(t[-1:], 1.0)
    value = float(t[:-1] if scale != 1.0 else t) * scale
    if value <= 0:
        raise ValueError(f"parameter budget {text!r} must be positive")
    return value


# --------------------------------------------------------------------------- outputs


def write_runs_csv(sweep: Sweep, path: Path, sparsity_mode: str = "overall") -> Path:
    """Every job (finished or not) as one row, with the law's S of the finished ones."""
    rows = []
    for job in sweep.jobs:
        row = job.row()
        row["law_sparsity"] = law_sparsity(job, sparsity_mode) if job.status == "ok" else None
        rows.append(row)
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _ratio_groups(fit: PrecisionFit) -> dict[float, list[int]]:
    groups: dict[float, list[int]] = {}
    for i, job in enumerate(fit.jobs):
        groups.setdefault(float(job.settings.get("ratio") or 0.0), []).append(i)
    return dict(sorted(groups.items()))


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
    for fit in fits:
        if fit.law is None:
            continue
        color = colors.get(fit.precision, "k")
        ax.plot(grid, [fit.law.loss_at_activated(budget, s) for s in grid], color=color,
                label=f"{fit.precision} fit")  # fmt: skip
        s_star = fit.law.optimal_sparsity()
        ax.axvline(s_star, color=color, lw=1.2)
        ax.annotate(f"S*={100 * s_star:.1f}%", (s_star, fit.law.loss_at_activated(budget, s_star)),
                    textcoords="offset points", xytext=(4, 8), color=color, fontsize=8)  # fmt: skip
        paper = PAPER_S_STAR.get(fit.precision)
        if paper is not None:
            ax.axvline(paper, color=color, ls=":", lw=1,
                       label=f"paper S*={100 * paper:.2f}% ({fit.precision})")  # fmt: skip
    ax.set_xlabel("sparsity S")
    ax.set_ylabel(f"predicted loss at Na = {_fmt_params(budget)}")
    ax.set_title("loss at fixed activated parameters")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def _interval(fit: PrecisionFit, name: str) -> str:
    if fit.intervals is None:
        return ""
    lo, hi = fit.intervals.interval(name)
    return f"[{lo:.4g}, {hi:.4g}]"


def summary_lines(sweep: Sweep, fits: Sequence[PrecisionFit], budget: float) -> list[str]:
    """The console summary: job counts, every job that is not ok, each fit and S*."""
    lines = [
        f"sweep {sweep.name} ({sweep.path}): {len(sweep.ok)} ok, "
        f"{sum(j.status == 'failed' for j in sweep.jobs)} failed, "
        f"{sum(j.status == 'missing' for j in sweep.jobs)} missing"
        + (f" of {sweep.expected} expected" if sweep.expected is not None else "")
    ]
    for job in sweep.not_ok:  # name each by the overrides that tell it apart
        lines.append(
            f"  {job.status.upper()} job {job.name} [{distinct_overrides(sweep, job)}]: {job.error}"
        )
    for fit in fits:
        if fit.law is None:
            if fit.jobs or fit.reason:
                lines.append(f"{fit.precision}: no fit ({fit.reason})")
            continue
        law = fit.law
        level = f"{100 * fit.intervals.level:.0f}% " if fit.intervals else ""
        lines.append(
            f"{fit.precision}: L(N,S) = {law.E:.4g} + ({law.B:.4g} + {law.C:.4g} "
            f"exp({law.beta:.4g}/(1-S))) / N^{law.alpha:.4g}   ({len(fit.jobs)} points)"
        )
        if fit.intervals is not None:
            lines.append(
                f"  {level}bootstrap: "
                + ", ".join(f"{k} {_interval(fit, k)}" for k in BOOTSTRAP_NAMES)
            )
        s_star = law.optimal_sparsity()
        paper = PAPER_S_STAR.get(fit.precision)
        if law.alpha < 1e-6 or law.beta < 1e-6 or not 0.01 < s_star < 0.98:
            lines.append(
                "  WARNING: degenerate fit (alpha or beta at its bound 0, or S* at an end of "
                "[0, 1)): these points do not show the law's trade-off; more steps, sizes or "
                "sparsities are needed before S* means anything"
            )
        lines.append(
            f"  S* = {100 * s_star:.2f}%"
            + (f" (paper: {100 * paper:.2f}%)" if paper is not None else "")
            + f"; at Na = {_fmt_params(budget)}: loss {law.loss_at_activated(budget, s_star):.4f}"
            f" at S*, {law.loss_at_activated(budget, 0.0):.4f} dense"
            f" (N = {_fmt_params(budget / (1 - s_star))} total at S*)"
        )
    return lines


def write_markdown(
    sweep: Sweep,
    fits: Sequence[PrecisionFit],
    budget: float,
    path: Path,
    images: Sequence[Path],
    sparsity_mode: str,
) -> Path:
    """``report.md``: summary, per-precision fit with intervals, the job table, the plots."""
    out = [
        f"# Sweep report: {sweep.name}",
        "",
        "```",
        *summary_lines(sweep, fits, budget),
        "```",
        "",
    ]
    out += [
        "Fit: `L(N, S) = E + (B + C exp(beta/(1-S))) / N^alpha`, N = total parameters, "
        f"S = {'measured overall sparsity (1 - activated/total)' if sparsity_mode == 'overall' else 'configured top-k ratio'}, "
        "L = validation loss; L-BFGS on Huber(1e-3) of log-loss residuals over a grid of "
        "starts; percentile bootstrap over jobs. `S* = argmin_S (B + C e^{beta/(1-S)}) "
        "(1-S)^alpha` at fixed activated parameters.",
        "",
    ]
    for fit in fits:
        if fit.law is None:
            continue
        out += [
            f"## {fit.precision}",
            "",
            "| constant | fit | bootstrap interval |",
            "|---|---|---|",
        ]
        values = {**{k: getattr(fit.law, k) for k in BOOTSTRAP_NAMES[:5]}, "S*": fit.s_star}
        out += [f"| {k} | {values[k]:.4g} | {_interval(fit, k)} |" for k in BOOTSTRAP_NAMES]
        out.append("")
    cols = ["job", "status", "precision", "hidden_size", "num_layers", "ratio", "weights",
            "params_total", "params_activated", "val_loss", "error"]  # fmt: skip
    out += ["## Jobs", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for job in sweep.jobs:
        row = job.row()
        cells = ["" if row.get(c) is None else str(row[c]) for c in cols]
        if isinstance(row.get("val_loss"), float):
            cells[cols.index("val_loss")] = f"{row['val_loss']:.4f}"
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    curves = curve_table(sweep)
    if curves:
        out += ["## Curves", "", *curves, ""]
    out += [f"![{p.stem}]({p.name})" for p in images]
    path.write_text("\n".join(out) + "\n")
    return path


def log_to_wandb(
    sweep: Sweep,
    fits: Sequence[PrecisionFit],
    images: Sequence[Path],
    csv_path: Path,
    mode: str | None = None,
) -> str | None:
    """Log the job table, the fits and the plots as one ``report`` run in the sweep's wandb
    group (offline unless ``WANDB_API_KEY``; ``mode="disabled"`` skips it). Returns the run
    directory, or ``None`` when wandb is unavailable or disabled."""
    from qsparse.training.logging import finish_wandb, wandb_mode

    mode = wandb_mode(mode)
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:  # pragma: no cover
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(
        project=sweep.project,
        group=sweep.name,
        job_type="report",
        name=f"{sweep.name}/report",
        dir=str(sweep.path),
        mode=mode,
        reinit="finish_previous",
    )
    exit_code = 1
    try:
        with csv_path.open() as f:
            rows = list(csv.reader(f))
        run.log(
            {
                "sweep/runs": wandb.Table(columns=rows[0], data=rows[1:]),
                **{f"sweep/{p.stem}": wandb.Image(str(p)) for p in images},
            }
        )
        summary: dict[str, Any] = {"sweep/ok": len(sweep.ok), "sweep/not_ok": len(sweep.not_ok)}
        for fit in fits:
            if fit.law is not None:
                key = f"fit/{fit.precision}"
                summary.update({f"{key}/{k}": getattr(fit.law, k) for k in BOOTSTRAP_NAMES[:5]})
                summary[f"{key}/S*"] = fit.s_star
        run.summary.update(summary)
        exit_code = 0
        return str(Path(run.dir).parent)
    finally:
        finish_wandb(exit_code)


@dataclass
class Report:
    """What :func:`make_report` produced."""

    sweep: Sweep
    fits: list[PrecisionFit]
    budget: float
    files: dict[str, Path]
    lines: list[str]
    wandb_dir: str | None = None

    @property
    def problems(self) -> int:
        """Jobs that did not finish (failed + missing): the CLI's exit status."""
        return len(self.sweep.not_ok)


def make_report(
    sweep: Sweep,
    out_dir: Path | None = None,
    budget: float | None = None,
    sparsity_mode: str = "overall",
    n_boot: int = 200,
    wandb_mode: str | None = None,
    seed: int = 0,
) -> Report:
    """Fit each precision, write ``runs.csv``, ``report.md``, ``loss_vs_activated.png`` and
    ``loss_vs_sparsity.png`` into ``out_dir`` (default: the sweep directory) and log them to
    wandb (``wandb_mode``: ``None`` = offline unless ``WANDB_API_KEY``, or ``disabled``)."""
    out = Path(out_dir) if out_dir is not None else sweep.path
    out.mkdir(parents=True, exist_ok=True)
    fits = [
        fit_precision(p, sweep.jobs, sparsity_mode, n_boot=n_boot, seed=seed)
        for p in (FULL_PRECISION, TERNARY)
    ]
    fits = [f for f in fits if f.jobs or any(j.precision == f.precision for j in sweep.jobs)]
    budget = float(budget) if budget is not None else default_budget(sweep)
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget={budget} must be a positive number of activated parameters")
    files = {"runs.csv": write_runs_csv(sweep, out / "runs.csv", sparsity_mode)}
    images: list[Path] = []
    if any(f.jobs for f in fits):
        images.append(plot_loss_vs_activated(fits, out / "loss_vs_activated.png"))
    if any(f.law is not None for f in fits):
        images.append(plot_loss_vs_sparsity(fits, budget, out / "loss_vs_sparsity.png"))
    images += figure_plots(sweep, out)
    files.update({p.name: p for p in images})
    files["report.md"] = write_markdown(
        sweep, fits, budget, out / "report.md", images, sparsity_mode
    )
    report = Report(sweep, fits, budget, files, summary_lines(sweep, fits, budget))
    report.wandb_dir = log_to_wandb(sweep, fits, images, files["runs.csv"], mode=wandb_mode)
    return report
