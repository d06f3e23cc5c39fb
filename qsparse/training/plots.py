"""The loss curve of a run (``<run_dir>/loss_curve.png``), drawn from its CSV logs with
matplotlib (the ``plots`` extra, imported only when a plot is drawn)."""

from __future__ import annotations

from pathlib import Path

from qsparse.extras import pyplot

from .metrics_csv import read_metrics


def plot_loss_curve(
    csv_dir: str | Path,
    out_path: str | Path,
    title: str = "",
    reference: float | None = None,
) -> Path | None:
    """Write a PNG of ``train/loss``, ``val/loss`` and ``val_ood/loss`` against the step
    (log-scale loss, nats/token) from the CSV logs under ``csv_dir``, with an optional
    horizontal ``reference`` line (e.g. the corpus unigram entropy); returns the path, or
    ``None`` when there is nothing to plot. Raises
    :class:`~qsparse.extras.MissingExtraError` without matplotlib."""
    series = read_metrics(csv_dir)
    if not series.get("train/loss") and not series.get("val/loss"):
        return None
    plt = pyplot(feature="the loss curve (loss_curve.png)")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for key, style in (("train/loss", "-"), ("val/loss", "o-"), ("val_ood/loss", "s-")):
        points = series.get(key)
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, style, label=key, markersize=3, linewidth=1.2)
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", linewidth=1, label="unigram entropy")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
