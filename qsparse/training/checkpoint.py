"""Atomic checkpoint writes.

Lightning 2.6 writes a checkpoint through an fsspec transaction whose temporary file lives in
the system temp directory; committing it is a ``shutil.move``, which is a copy (not atomic)
when the temp directory and the run directory are different filesystems. A job killed during
that copy leaves a truncated ``last.ckpt`` that cannot be resumed. :class:`AtomicCheckpointIO`
writes ``.<name>.tmp-<pid>`` next to the target (:mod:`qsparse.io`), fsyncs it and ``os.replace``-s it over the
target (atomic on POSIX within one filesystem), so ``last.ckpt`` is always a complete file.
A writer killed before the rename leaves its ``.tmp-<pid>`` file behind;
:func:`remove_orphaned_temporaries` removes those of processes that no longer run (each run
calls it on its checkpoint folder when it starts).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from qsparse.io import atomic_write

_TMP_SUFFIX = re.compile(r"\.tmp-(\d+)$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_orphaned_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the ``.<name>.tmp-<pid>`` files :func:`atomic_torch_save` (and folders
    :func:`qsparse.models.export.export`) left in ``folder`` when their process was killed
    mid-write (those of another live process are kept); return them. Call it before this
    process writes there: its own pid counts as dead (a killed run's pid is often reused in
    containers)."""
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _TMP_SUFFIX.search(path.name)
        pid = int(match.group(1)) if match else -1
        if pid < 0 or (pid != os.getpid() and _process_alive(pid)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path`` (written with
    :func:`qsparse.io.atomic_write`, fsynced)."""
    atomic_write(path, lambda f: torch.save(obj, f), fsync=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes each checkpoint atomically (local paths)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                "AtomicCheckpointIO.save_checkpoint takes no storage_options; "
                f"got {storage_options!r}"
            )
        if "://" in str(path):  # remote storage: keep Lightning's own writer
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, path)


class PeriodicCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is also refreshed when training ends.

    Lightning 2.6 writes ``last.ckpt`` at the end of training only if it never wrote one, so
    a run of 250 steps checkpointing every 200 would end with a step-200 ``last.ckpt``. Here
    the final step is always saved (unless it was just saved), so ``resume=true`` after a
    finished run continues from its true end.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (
            self.save_last
            and not trainer.fast_dev_run
            and self._last_global_step_saved != trainer.global_step
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_end(trainer, pl_module)
