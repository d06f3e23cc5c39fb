"""Former home of the cache and atomic-write helpers, kept as names only.

They live in :mod:`qsparse.cache` (cache root, hashes, package data files) and
:mod:`qsparse.io` (atomic writes). The names below are what ``data/pretrain.py`` and
``data/sft.py`` still import; :func:`atomic_save_npy` is :func:`qsparse.io.atomic_write`
with ``np.save``. New code imports from ``qsparse.cache`` / ``qsparse.io``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..cache import (
    CACHE_FORMAT_VERSION,
    file_fingerprint,
    resolve_cache_dir,
    stable_hash,
)
from ..io import atomic_write, atomic_write_text

__all__ = [
    "CACHE_FORMAT_VERSION",
    "atomic_save_npy",
    "atomic_write_text",
    "file_fingerprint",
    "resolve_cache_dir",
    "stable_hash",
]


def atomic_save_npy(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """``np.save`` (no pickles) written with :func:`qsparse.io.atomic_write`."""
    return atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))
