"""Experiment loggers: Weights & Biases (offline unless ``WANDB_API_KEY``) and CSV.

The wandb run id is written to ``<run_dir>/wandb_run_id`` when the run starts; a run started
with ``resume=true`` reads it back and continues the same wandb run (``resume="allow"``).
Multirun jobs share ``group`` = the sweep name. Call :func:`finish_wandb` in a ``finally``.
"""

from __future__ import annotations

import csv
import io
import os
import secrets
import string
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

WANDB_ID_FILE = "wandb_run_id"


def git_sha(path: str | os.PathLike | None = None) -> str | None:
    """The commit of the source checkout (``-dirty`` appended when it has local changes),
    or ``None`` outside a git checkout."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def wandb_mode(mode: str | None) -> str:
    """``None`` -> ``"online"`` when ``WANDB_API_KEY`` is set, else ``"offline"``."""
    if mode is not None:
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def wandb_run_id(run_dir: Path, resume: bool) -> str:
    """The wandb id for this run: the persisted one when resuming, else a new one."""
    path = run_dir / WANDB_ID_FILE
    if resume and path.exists():
        run_id = path.read_text().strip()
        if run_id:
            return run_id
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


@rank_zero_only
def _persist_id(run_dir: Path, run_id: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / WANDB_ID_FILE).write_text(run_id + "\n")


def build_loggers(
    logger_cfg: Mapping[str, Any],
    run_dir: Path,
    run_name: str,
    resume: bool,
    group: str | None = None,
    tags: Sequence[str] = (),
) -> list[Logger]:
    """CSV logger (``<run_dir>/csv/metrics.csv``; ``csv/resume-NN/`` for each resumed
    segment) and wandb logger; ``tags`` are added to ``logger.wandb.tags`` (multirun jobs:
    their overrides)."""
    loggers: list[Logger] = []
    if logger_cfg.get("csv", True):
        if resume and (run_dir / "csv" / "metrics.csv").exists():
            # Lightning's CSV writer replaces an existing metrics.csv: each resumed segment
            # gets csv/resume-NN/ (read_metrics merges them in order)
            n = len(list((run_dir / "csv").glob("resume-*"))) + 1
            loggers.append(CSVLogger(save_dir=str(run_dir), name="csv", version=f"resume-{n:02d}"))
        else:
            loggers.append(CSVLogger(save_dir=str(run_dir), name="", version="csv"))
    wb = logger_cfg.get("wandb")
    if wb:
        mode = wandb_mode(wb.get("mode"))
        if mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            run_id = wandb_run_id(run_dir, resume)
            _persist_id(run_dir, run_id)
            wandb_logger = WandbLogger(
                project=wb.get("project", "qsparse"),
                entity=wb.get("entity"),
                name=wb.get("name") or run_name,
                group=wb.get("group") or group,
                tags=[*(wb.get("tags") or []), *tags],
                save_dir=str(run_dir),
                id=run_id,
                resume="allow",
                offline=mode == "offline",
                mode=mode,
            )
            # Lightning passes anonymous=None to wandb.init, and wandb >= 0.22 warns that the
            # setting has no effect whenever the key is present: leave it out
            wandb_logger._wandb_init.pop("anonymous", None)
            loggers.append(wandb_logger)
    return loggers


def log_run_config(loggers: list[Logger], config: Mapping[str, Any], sha: str | None) -> None:
    """Log the resolved config and the git SHA to every logger (rank zero)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            if rank_zero_only.rank == 0:
                logger.experiment.config.update(
                    {"cfg": dict(config), "git_sha": sha}, allow_val_change=True
                )
        else:
            logger.log_hyperparams({"cfg": dict(config), "git_sha": sha})


def finish_wandb(exit_code: int = 0) -> None:
    """Close the current wandb run, if any (safe to call when wandb never started)."""
    try:
        import wandb
    except ImportError:  # pragma: no cover
        return
    if wandb.run is not None:
        wandb.finish(exit_code=exit_code)


def drop_rows_from_step(path: Path, step: int) -> int:
    """Rewrite the CSV metrics file ``path`` (atomically) without its rows logged at
    ``step`` or later; return how many were dropped."""
    from qsparse.io import atomic_write_text

    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = list(reader.fieldnames or [])
        rows = list(reader)

    def before(row: dict[str, str]) -> bool:
        try:
            return int(float(row.get("step") or "nan")) < step
        except ValueError:  # no step: keep it
            return True

    kept = [row for row in rows if before(row)]
    if len(kept) != len(rows):
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_text(path, out.getvalue())
    return len(rows) - len(kept)


class TrimResumedMetrics(L.Callback):
    """On a resumed run, drop from the earlier segments' ``metrics.csv`` the rows logged at
    or after the step the run resumes from: the killed segment trained them, the resumed one
    trains (and logs) them again, so ``csv/`` holds each step once."""

    def __init__(self, csv_dir: str | os.PathLike) -> None:
        self.csv_dir = Path(csv_dir)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        current = {
            Path(lg.log_dir) / "metrics.csv" for lg in trainer.loggers if isinstance(lg, CSVLogger)
        }
        for path in sorted(self.csv_dir.rglob("metrics.csv")):
            if path not in current:
                drop_rows_from_step(path, trainer.global_step)
