"""Cache directory resolution, content hashing and atomic writes for ``qsparse.data``.

Everything the data pipeline derives from raw inputs (converted corpora, trained tokenizers,
tokenized token streams, synthetic SFT sets) lives under one cache directory so that a
second run reuses it. The directory is, in order of precedence: an explicit ``cache_dir``
argument, the ``QSPARSE_CACHE`` environment variable, ``<cwd>/.cache/qsparse``.

Writes are atomic (write to a temporary sibling, then ``os.replace``) so that a killed run or
two ranks racing never leave a half-written file that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

CACHE_ENV_VAR = "QSPARSE_CACHE"

# Bump when the on-disk layout of cached artefacts changes so stale caches are not reused.
CACHE_FORMAT_VERSION = 1


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the cache root (created if missing).

    Args:
        cache_dir: explicit directory; ``None`` falls back to ``$QSPARSE_CACHE`` and then to
            ``.cache/qsparse`` under the current working directory.
    """
    if cache_dir is None or str(cache_dir) == "":
        env = os.environ.get(CACHE_ENV_VAR)
        cache_dir = env if env else Path.cwd() / ".cache" / "qsparse"
    path = Path(cache_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def stable_hash(*parts: Any, length: int = 16) -> str:
    """Hex digest (``length`` chars) of a JSON rendering of ``parts``; stable across runs.

    Objects that JSON cannot encode are rendered with ``repr``.
    """
    payload = json.dumps(parts, sort_keys=True, default=repr, ensure_ascii=False)
    return hashlib.blake2b(payload.encode("utf-8"), digest_size=32).hexdigest()[:length]


def hash_texts(texts: Iterable[str], length: int = 16) -> str:
    """Digest of a sequence of strings (order matters, boundaries are unambiguous)."""
    h = hashlib.blake2b(digest_size=32)
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:length]


def file_fingerprint(paths: Iterable[str | os.PathLike[str]]) -> str:
    """Cheap fingerprint of local files: absolute path, size and modification time of each.

    Reading the content would be exact but slow for large corpora; a changed file almost
    always changes its size or mtime, which invalidates every cache entry derived from it.
    """
    items = []
    for p in paths:
        path = Path(p).resolve()
        st = path.stat()
        items.append((str(path), st.st_size, st.st_mtime_ns))
    return stable_hash(items)


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    return Path(name)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (utf-8) to ``path`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> Path:
    """Write one JSON object per line to ``path`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False))
                f.write("\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_save_npy(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Save ``array`` as ``.npy`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path, suffix=".npy")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_publish_dir(tmp_dir: Path, final_dir: Path) -> Path:
    """Move a fully written ``tmp_dir`` to ``final_dir``.

    If another process published ``final_dir`` first, its copy is kept and ``tmp_dir`` is
    removed (both were built from the same inputs).
    """
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp_dir, final_dir)
    except OSError:
        if not final_dir.exists():
            raise
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return final_dir


def make_tmp_dir(final_dir: Path) -> Path:
    """A fresh temporary directory beside ``final_dir`` (same filesystem, so rename is atomic)."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", suffix=".tmp", dir=final_dir.parent))
