"""Sweep report: the fits of each precision (:mod:`qsparse.analysis.precision_fit`), S*, a
table, the figures (:mod:`qsparse.analysis.report_plots`), a markdown file and wandb.

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

from .figures import curve_table, distinct_overrides, figure_plots
from .precision_fit import (
    PAPER_S_STAR,
    PrecisionFit,
    default_budget,
    fit_precision,
    format_params,
)
from .report_plots import plot_loss_vs_activated, plot_loss_vs_sparsity
from .scaling_law import BOOTSTRAP_NAMES
from .sweep import FULL_PRECISION, TERNARY, Sweep, law_sparsity

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
            + f"; at Na = {format_params(budget)}: loss {law.loss_at_activated(budget, s_star):.4f}"
            f" at S*, {law.loss_at_activated(budget, 0.0):.4f} dense"
            f" (N = {format_params(budget / (1 - s_star))} total at S*)"
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
