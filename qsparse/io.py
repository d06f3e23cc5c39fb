"""Atomic writes: the one way qsparse writes a file or folder that a later run will trust.

A file is written to a temporary sibling ``.<name>.tmp-<pid>`` (same folder, so same
filesystem) and moved over the target with ``os.replace``, which is atomic on POSIX: a reader
sees the old file or the new one, never half of one, whether the writer is killed or two
ranks race. A folder is filled the same way and renamed into place. A writer killed before the
rename leaves its ``.tmp-<pid>`` behind; :func:`qsparse.training.checkpoint.remove_orphaned_temporaries`
removes those of processes that no longer run (the name is its contract).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "atomic_save_npy",
    "atomic_write",
    "atomic_write_dir",
    "atomic_write_jsonl",
    "atomic_write_text",
    "swap_in",
    "temporary_sibling",
]


def temporary_sibling(path: str | os.PathLike[str]) -> Path:
    """``<folder>/.<name>.tmp-<pid>``: where this process writes ``path`` before the rename."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _fsync_dir(folder: Path) -> None:
    """Persist a rename in ``folder`` (some filesystems refuse to open folders: skipped)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[BinaryIO], object], fsync: bool = False
) -> Path:
    """Call ``write(f)`` on a binary file opened at a temporary sibling, then rename it to
    ``path`` (parents created). ``fsync=True`` also flushes the data and the rename to disk
    before returning (checkpoints). On any error the target is left as it was. Returns
    ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if fsync:
        _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`atomic_write` of ``text`` encoded as utf-8."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_save_npy(path: str | os.PathLike[str], array: Any) -> Path:
    """``numpy.save`` of ``array`` (no pickles), written with :func:`atomic_write`."""
    import numpy as np

    return atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def atomic_write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> Path:
    """:func:`atomic_write` of one JSON object per line (utf-8, non-ASCII kept)."""

    def write(f: BinaryIO) -> None:
        for row in rows:
            f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))

    return atomic_write(path, write)


def atomic_write_dir(
    path: str | os.PathLike[str], fill: Callable[[Path], object], replace: bool = True
) -> Path:
    """Call ``fill(tmp)`` on a fresh temporary sibling folder, then make it ``path``.

    ``replace=True``: an existing ``path`` is swapped out and deleted (an export over an older
    one). ``replace=False``: a ``path`` another process published first is kept and this
    copy discarded (caches built from the same inputs). Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier process with this pid
    try:
        tmp.mkdir()
        fill(tmp)
        if replace:
            swap_in(tmp, path)
        else:
            try:
                os.replace(tmp, path)
            except OSError:
                if not path.exists():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def swap_in(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Make the finished temporary folder ``tmp`` the folder ``path``.

    What ``path`` held (a folder, a file or a link) is moved aside first, to
    ``.<name>.old-<random>``, then ``tmp`` is renamed to ``path``; the old entry is deleted once
    the new one is in place and put back if the rename fails, so a failure never leaves
    ``path`` without what it held.
    :func:`atomic_write_dir` and the sharded FSDP checkpoint
    (:meth:`qsparse.training.strategies.FSDP2Strategy.save_checkpoint`, on rank zero after
    every rank has written its shard) both swap folders in with it.
    """
    tmp, path = Path(tmp), Path(path)
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    moved = path.exists() or path.is_symlink()
    if moved:
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except OSError:
        if moved and not (path.exists() or path.is_symlink()):
            os.replace(old, path)  # the rename failed: the old content back in place
        raise
    if not moved:
        return
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
