"""Local data files for ``datasets``: what they are (:class:`CorpusSpec`), which builder
reads them, and reading them without network use.

Local files are accepted anywhere a corpus name is: a path or list of paths with extension
``.txt``/``.text`` (datasets' ``text`` builder), ``.json``/``.jsonl`` (``json``), ``.parquet``
(``parquet``) or ``.csv`` (``csv``), optionally compressed (``.gz``, ``.bz2``, ``.xz``,
``.zst``).
A file that cannot be read raises :class:`DataFileError` naming the file, the problem and the
fix (empty, not UTF-8, not JSON lines); the check runs after ``datasets`` fails, so good files
are read once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

__all__ = [
    "CorpusSpec",
    "DataFileError",
    "MissingDataFileError",
    "builder_for_files",
    "check_data_file",
    "load_local_dataset",
]


@dataclass(frozen=True)
class CorpusSpec:
    """A corpus ready for ``datasets.load_dataset(builder, data_files=list(data_files))``.

    Attributes:
        name: registry name, or ``"files"`` for user files.
        data_files: absolute paths, read in this order.
        builder: datasets builder name: ``"json"``, ``"text"``, ``"parquet"`` or ``"csv"``.
        text_field: column holding the document text.
        fingerprint: short hash that changes whenever the files change (cache key part).
    """

    name: str
    data_files: tuple[str, ...]
    builder: str
    text_field: str
    fingerprint: str


_EXT_TO_BUILDER = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
_COMPRESSION_EXTS = (".gz", ".bz2", ".xz", ".zst", ".zstd", ".lz4")


def builder_for_files(paths: Sequence[str | os.PathLike[str]]) -> str:
    """The ``datasets`` builder for local files, from their (shared) extension."""
    builders = set()
    for p in paths:
        name = Path(p).name.lower()
        for comp in _COMPRESSION_EXTS:
            if name.endswith(comp):
                name = name[: -len(comp)]
                break
        ext = Path(name).suffix
        if ext not in _EXT_TO_BUILDER:
            raise ValueError(
                f"data_files: cannot read {str(p)!r}: unknown extension {ext!r}; use one of "
                f"{sorted(_EXT_TO_BUILDER)} (optionally compressed: {list(_COMPRESSION_EXTS)})"
            )
        builders.add(_EXT_TO_BUILDER[ext])
    if len(builders) != 1:
        raise ValueError(
            f"data_files: all files must have the same format, got builders {sorted(builders)}"
        )
    return builders.pop()


class DataFileError(UserError):
    """A data file that cannot be read; the message names the file, the problem and the fix."""


class MissingDataFileError(DataFileError, FileNotFoundError):
    """A data file that does not exist."""


def _is_compressed(path: str) -> bool:
    return path.lower().endswith(_COMPRESSION_EXTS)


def _utf8_problem(path: str, chunk: int = 1 << 20) -> str | None:
    """Why ``path`` is not UTF-8 text (its first invalid byte, or a NUL byte), else None."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            nul = block.find(b"\0")
            if nul >= 0:
                return f"has a NUL byte at byte {offset + nul}: a binary file, not text"
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                bad = block[exc.start : exc.start + 1].hex()
                return f"is not UTF-8 text (invalid byte 0x{bad} at byte {offset + exc.start})"
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return f"is not UTF-8 text (it ends inside a multi-byte character at byte {offset})"
    return None


def _json_problem(path: str) -> str | None:
    """Why a ``.json``/``.jsonl`` file cannot be read as JSON lines or one JSON document."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        json.loads(text)
        return None  # one JSON document
    except json.JSONDecodeError:
        pass
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            return f"line {number} is not valid JSON ({exc.msg}, column {exc.colno})"
        if not isinstance(row, dict):
            return f"line {number} is a JSON {type(row).__name__}, not an object"
    return None


def check_data_file(path: str, builder: str) -> None:
    """Raise :class:`DataFileError` naming ``path`` if it is empty, not UTF-8 text (``text``,
    ``json``, ``csv`` builders) or not valid JSON lines (``json``). Compressed files are only
    checked for emptiness."""
    fix = "fix it or remove it from data.data_files"
    if os.path.getsize(path) == 0:
        raise DataFileError(f"data_files: {path} is empty; {fix}")
    if _is_compressed(path) or builder not in ("text", "json", "csv"):
        return
    problem = _utf8_problem(path)
    if problem is None and builder == "json":
        problem = _json_problem(path)
    if problem is not None:
        raise DataFileError(f"data_files: {path} {problem}; {fix}")


def load_local_dataset(
    builder: str, data_files: Sequence[str], cache_dir: Path, **kwargs: Any
) -> Any:
    """``datasets.load_dataset(builder, data_files=..., split="train")`` with no network use.

    ``datasets`` pings the Hub to count downloads of its packaged builders (``json``, ``text``,
    ...) even for local files; that ping is switched off (``HF_UPDATE_DOWNLOAD_COUNTS``).

    Raises:
        DataFileError: a file is empty, or ``datasets`` cannot read one (the file and the
            reason are found by :func:`check_data_file` after the failure, so good files are
            read once).
    """
    import datasets
    from datasets.exceptions import DatasetGenerationError

    for path in data_files:
        if os.path.getsize(path) == 0:
            check_data_file(path, builder)
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        return datasets.load_dataset(
            builder,
            data_files=list(data_files),
            split="train",
            cache_dir=str(cache_dir / "hf_datasets"),
            **kwargs,
        )
    except (DatasetGenerationError, ValueError, UnicodeDecodeError) as exc:
        for path in data_files:
            check_data_file(path, builder)
        cause = exc.__cause__ or exc.__context__ or exc
        files = ", ".join(str(p) for p in data_files)
        raise DataFileError(
            f"data_files: cannot read {files} with the {builder!r} builder: "
            f"{type(cause).__name__}: {' '.join(str(cause).split())}"
        ) from exc
