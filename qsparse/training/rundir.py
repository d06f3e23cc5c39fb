"""The run directory before training starts: what a previous run left there, and what may
be replaced.

:func:`check_run_dir` reads (never writes) ``<run_dir>`` and decides how the new run may use
it: a finished run (``summary.json``) or an unfinished one (``checkpoints/last.ckpt``) is
never overwritten unless ``overwrite=true``; ``resume=true`` needs a complete ``last.ckpt``
and a run that is not finished yet. :func:`prepare_run_dir` then makes the directory ready:
it clears the previous run's files on ``overwrite=true``, removes temporaries orphaned by
killed writers (``last.ckpt.tmp-<pid>``, ``.hf.tmp-<pid>/``) and writes Hydra's ``.hydra``
record. :func:`remove_if_empty` undoes the directory Hydra created for a run that failed
before writing anything.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from qsparse.errors import UserError

from .checkpoint import remove_orphaned_temporaries

#: everything a training run writes into its directory (cleared by ``overwrite=true``)
RUN_ARTIFACTS: tuple[str, ...] = (
    ".hydra",
    "checkpoints",
    "csv",
    "wandb",
    "hf",
    "config.yaml",
    "summary.json",
    "loss_curve.png",
    "wandb_run_id",
    "train.log",
)


class RunDirError(UserError):
    """The run directory holds a run this command must not overwrite or cannot resume."""


@dataclass(frozen=True)
class RunState:
    """What a previous run left in a run directory.

    ``checkpoint``: ``checkpoints/last.ckpt`` if present; ``finished_step``: the step recorded
    in ``summary.json`` (written when a run finishes), ``None`` for a run that never finished.
    """

    checkpoint: Path | None
    finished_step: int | None

    @property
    def empty(self) -> bool:
        """No previous run: neither a checkpoint nor a summary."""
        return self.checkpoint is None and self.finished_step is None


def run_state(run_dir: Path) -> RunState:
    """Read what a previous run left in ``run_dir`` (nothing is written)."""
    last = run_dir / "checkpoints" / "last.ckpt"
    summary = run_dir / "summary.json"
    step = None
    if summary.is_file():
        try:
            step = int(json.loads(summary.read_text()).get("step", 0))
        except (ValueError, AttributeError, TypeError):
            step = 0  # unreadable summary: the run still finished
    return RunState(last if last.is_file() or last.is_dir() else None, step)


def check_checkpoint_file(path: Path) -> None:
    """Raise :class:`RunDirError` if ``path`` is not a complete ``torch.save`` archive (a
    write that was cut short: the zip directory at its end is missing)."""
    if path.is_dir():  # a sharded (FSDP2) checkpoint: Lightning's meta.pt and the shard index
        if not (path / ".metadata").is_file():
            raise RunDirError(
                f"{path} is an incomplete sharded checkpoint (no .metadata); it cannot be "
                "resumed: delete it and start over with overwrite=true"
            )
        path = path / "meta.pt"
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise RunDirError(
            f"{path} is truncated or corrupt ({exc}); it cannot be resumed: delete it and "
            "start over with overwrite=true, or restore a complete copy"
        ) from None


def check_run_dir(
    run_dir: Path, resume: bool, overwrite: bool, max_steps: int | None
) -> str | None:
    """Decide how a new run may use ``run_dir``; return the checkpoint to resume from.

    Raises :class:`RunDirError` for ``resume=true`` without a complete checkpoint or on a run
    that already reached ``max_steps``, and for a new run (``resume=false``) over a previous
    one unless ``overwrite`` (both ``resume`` and ``overwrite`` is a contradiction).
    """
    state = run_state(run_dir)
    if resume and overwrite:
        raise RunDirError(
            "resume=true and overwrite=true contradict each other: resume continues the run "
            f"in {run_dir}, overwrite replaces it; pass one of them"
        )
    if resume:
        if state.checkpoint is None:
            raise RunDirError(
                f"resume=true but {run_dir / 'checkpoints' / 'last.ckpt'} does not exist; "
                "start without resume or set run_name/run_dir to the run to continue"
            )
        check_checkpoint_file(state.checkpoint)
        done = state.finished_step
        if done is not None and (max_steps is None or max_steps < 0 or done >= max_steps):
            raise RunDirError(
                f"resume=true but the run in {run_dir} is finished ({done} steps, "
                f"trainer.max_steps={max_steps}); raise trainer.max_steps to train it further, "
                "or choose a new run_name"
            )
        return str(state.checkpoint)
    if state.empty or overwrite:
        return None
    if state.finished_step is not None:
        what = f"a finished run ({state.finished_step} steps)"
    else:
        what = "an unfinished run (resume=true continues it)"
    raise RunDirError(
        f"{run_dir} holds {what}; a new run would overwrite it: choose another run_name, "
        "or pass overwrite=true to replace it"
    )


def prepare_run_dir(run_dir: Path, overwrite: bool, task_config: DictConfig | None = None) -> None:
    """Create ``run_dir`` for a run that passed every check: on ``overwrite`` remove the
    previous run's files (:data:`RUN_ARTIFACTS`), remove checkpoint and export temporaries of
    killed writers, and write Hydra's ``.hydra`` record of the composed config when run by Hydra."""
    if overwrite:
        for name in RUN_ARTIFACTS:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temporaries(run_dir / "checkpoints")
    remove_orphaned_temporaries(run_dir)  # a killed export's .hf.tmp-<pid>/
    _write_hydra_record(run_dir, task_config)


def _write_hydra_record(run_dir: Path, task_config: DictConfig | None) -> None:
    """``.hydra/{config,hydra,overrides}.yaml`` as Hydra writes them, but only now that the
    run is known to start (``hydra.output_subdir`` is null, so Hydra itself writes none)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    out = run_dir / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    if task_config is not None:
        OmegaConf.save(task_config, out / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), out / "hydra.yaml")
    OmegaConf.save(hydra_cfg.overrides.task, out / "overrides.yaml")


def remove_if_empty(run_dir: Path, stop: Path) -> None:
    """Remove ``run_dir`` and the folders created on the way to it, inside ``stop`` (not
    ``stop`` itself), when nothing was written into them: a run that failed its checks leaves
    no trace. ``outputs/../escape`` covers both ``escape`` and ``outputs``."""
    stop = Path(os.path.abspath(stop))
    literal = Path(run_dir).absolute()
    folders = {Path(os.path.abspath(p)) for p in (literal, *literal.parents)}
    inside = [p for p in folders if stop in p.parents]
    for path in sorted(inside, key=lambda p: len(p.parts), reverse=True):
        try:
            path.rmdir()
        except OSError:  # not empty, or not there
            continue
