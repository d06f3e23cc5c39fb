"""The table a training run prints at the end (``qsparse run summary``), from the summary
dict that :class:`~qsparse.training.callbacks.RunSummary` also writes to ``summary.json``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def summary_rows(summary: Mapping[str, Any], run_dir: Path) -> list[tuple[str, str]]:
    """``(label, value)`` rows of the keys present in ``summary``, formatted for reading."""
    rows: list[tuple[str, str]] = [("run dir", str(run_dir)), ("steps", str(summary["step"]))]
    if "val_loss" in summary:
        rows.append(("val loss (nats/token)", f"{summary['val_loss']:.4f}"))
        rows.append(("val perplexity", f"{summary['val_ppl']:.2f}"))
    if "val_ood_loss" in summary:
        rows.append(("out-of-domain val loss", f"{summary['val_ood_loss']:.4f}"))
        rows.append(("out-of-domain val perplexity", f"{summary['val_ood_ppl']:.2f}"))
    if "unigram_entropy" in summary:
        rows.append(("corpus unigram entropy", f"{summary['unigram_entropy']:.4f}"))
    if summary.get("sparsity_overall") is not None:
        rows.append(("measured sparsity (overall)", f"{100 * summary['sparsity_overall']:.2f}%"))
    rows.append(("parameters", f"{summary['params_total']:,}"))
    rows.append(
        (
            "activated parameters",
            f"{summary['params_activated']:,} "
            f"({100 * summary['params_activated'] / max(summary['params_total'], 1):.1f}%)",
        )
    )
    if summary.get("tokens_per_s"):
        rows.append(("tokens/s", f"{summary['tokens_per_s']:,.0f}"))
    if summary.get("mfu") is not None:
        rows.append(("MFU", f"{100 * summary['mfu']:.1f}%"))
    if summary.get("peak_memory_gib") is not None:
        rows.append(("peak GPU memory", f"{summary['peak_memory_gib']:.2f} GiB"))
    if summary.get("train_time_s") is not None:
        rows.append(("training time", f"{summary['train_time_s']:.1f} s"))
    if "loss_curve" in summary:
        rows.append(("loss curve", summary["loss_curve"]))
    return rows


def print_summary(summary: Mapping[str, Any], run_dir: Path) -> None:
    """Print :func:`summary_rows` as a two-column rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="qsparse run summary", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for label, value in summary_rows(summary, run_dir):
        table.add_row(label, value)
    Console().print(table)
