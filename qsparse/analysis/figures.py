"""Per-job curves of a small sweep: the paper's figures at small scale.

The scaling-law report (:mod:`qsparse.analysis.report`) compares jobs by their final
validation loss; the figure recipes (``recipe=figures/...``) compare a handful of jobs by
their curves. For a sweep of at most :data:`MAX_CURVE_JOBS` finished jobs this module draws

- ``loss_curves.png``: validation loss (markers) and training loss (a moving average of
  :data:`SMOOTH` logged points) against the optimizer step, one colour per job;
- ``grad_norm_per_layer.png``: the mean gradient L2 norm of every decoder layer over the
  second half of training (Q-Sparse Fig. 2, STE vs masked gradient), for jobs that logged
  ``grad_norm/layer_<i>`` (:class:`~qsparse.training.callbacks.LayerGradNorm`);

and :func:`curve_table` gives the rows report.md prints under them: final validation loss,
its difference to the first job, and the measured overall sparsity. Jobs are labelled by
the overrides that tell them apart (:func:`distinct_overrides`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qsparse.extras import pyplot

from .sweep import Sweep, SweepJob

#: Sweeps with more finished jobs than this get no curve plot (a scaling grid: too many lines).
MAX_CURVE_JOBS = 8
#: Points of the training-loss moving average.
SMOOTH = 5


def distinct_overrides(sweep: Sweep, job: SweepJob) -> str:
    """The overrides of ``job`` that not every job of the sweep shares (all of them when the
    sweep has one job): what names a grid point."""
    if len(sweep.jobs) < 2:
        return " ".join(job.overrides)
    common = set.intersection(*(set(j.overrides) for j in sweep.jobs))
    return " ".join(o for o in job.overrides if o not in common)


def _series(sweep: Sweep, job: SweepJob) -> dict[str, list[tuple[int, float]]]:
    from qsparse.training.metrics_csv import read_metrics

    csv_dir = sweep.path / job.name / "csv"
    if job.status == "missing" or not csv_dir.is_dir():
        return {}
    return read_metrics(csv_dir)


def loss_curves(sweep: Sweep) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Job label -> ``{"train/loss": [(step, loss)], "val/loss": [...]}`` for the finished
    jobs that logged a training loss."""
    out = {}
    for job in sweep.ok:
        series = _series(sweep, job)
        if "train/loss" in series:
            label = distinct_overrides(sweep, job) or job.name
            out[label] = {k: series[k] for k in ("train/loss", "val/loss") if k in series}
    return out


def grad_norm_per_layer(sweep: Sweep) -> dict[str, list[float]]:
    """Job label -> mean ``grad_norm/layer_<i>`` over the second half of its logged steps,
    by layer, for the jobs that logged them."""
    out: dict[str, list[float]] = {}
    for job in sweep.jobs:
        series = {k: v for k, v in _series(sweep, job).items() if k.startswith("grad_norm/")}
        if not series:
            continue
        out[distinct_overrides(sweep, job) or job.name] = [
            float(np.mean([v for _, v in values[len(values) // 2 :]]))
            for _, values in sorted(series.items(), key=lambda kv: _layer_index(kv[0]))
        ]
    return out


def _layer_index(key: str) -> int:
    """``grad_norm/layer_<i>`` -> i (so layer 10 sorts after layer 9)."""
    tail = key.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def report_pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (the ``report`` extra)."""
    return pyplot("report", "qsparse-report's plots")


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write (120 dpi) and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    report_pyplot().close(fig)
    return path


def _moving_average(values: list[float], n: int) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if len(v) < n:
        return v
    return np.convolve(v, np.ones(n) / n, mode="valid")


def plot_loss_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> Path:
    """Training loss (moving average) and validation loss against step, one colour per job."""
    plt = report_pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, series) in enumerate(curves.items()):
        colour = f"C{i}"
        steps, values = zip(*series["train/loss"], strict=True)
        smooth = _moving_average(list(values), SMOOTH)
        ax.plot(steps[len(steps) - len(smooth) :], smooth, color=colour, alpha=0.6, label=label)
        if "val/loss" in series:
            vs, vl = zip(*series["val/loss"], strict=True)
            ax.plot(vs, vl, "o--", color=colour, markersize=5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"loss (lines: train, {SMOOTH}-point average; markers: validation)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_grad_norm_per_layer(norms: dict[str, list[float]], path: Path) -> Path:
    """Gradient norm against layer index, one line per job (Q-Sparse Fig. 2: STE vs no STE)."""
    plt = report_pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in norms.items():
        ax.plot(range(len(values)), values, marker="o", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("gradient L2 norm (mean, 2nd half of training)")
    ax.set_title("gradient norm per layer")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def curve_table(sweep: Sweep) -> list[str]:
    """Markdown rows: job label, final validation loss, its difference to the first finished
    job (the recipe lists its baseline first), measured overall sparsity."""
    jobs = [j for j in sweep.ok if isinstance(j.summary.get("val_loss"), float)]
    if not jobs or len(jobs) > MAX_CURVE_JOBS:
        return []
    base = jobs[0].summary["val_loss"]
    rows = [
        "| job | final val loss | vs first job | measured overall sparsity |",
        "|---|---|---|---|",
    ]
    for job in jobs:
        s = job.summary
        sp = s.get("sparsity_overall")
        rows.append(
            f"| {distinct_overrides(sweep, job) or job.name} | {s['val_loss']:.4f} | "
            f"{s['val_loss'] - base:+.4f} | {'' if sp is None else f'{sp:.1%}'} |"
        )
    return rows


def figure_plots(sweep: Sweep, out: Path) -> list[Path]:
    """Draw the curve plots this sweep has data for into ``out``; return their paths."""
    images = []
    curves = loss_curves(sweep)
    if curves and len(curves) <= MAX_CURVE_JOBS:
        images.append(plot_loss_curves(curves, out / "loss_curves.png"))
    norms = grad_norm_per_layer(sweep)
    if norms:
        images.append(plot_grad_norm_per_layer(norms, out / "grad_norm_per_layer.png"))
    return images
