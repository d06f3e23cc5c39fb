"""Atomic checkpoint writes.

Lightning 2.6 writes a checkpoint through an fsspec transaction whose temporary file lives in
the system temp directory; committing it is a ``shutil.move``, which is a copy (not atomic)
when the temp directory and the run directory are different filesystems. A job killed during
that copy leaves a truncated ``last.ckpt`` that cannot be resumed. :class:`AtomicCheckpointIO`
writes ``<name>.tmp-<pid>`` next to the target, fsyncs it and ``os.replace``-s it over the
target (atomic on POSIX within one filesystem), so ``last.ckpt`` is always a complete file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # persist the rename itself
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems refuse opening directories
        return
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dir_fd)


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
