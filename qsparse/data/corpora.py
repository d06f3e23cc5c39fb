"""The corpus registry: a corpus name or local files -> a :class:`CorpusSpec` ``datasets`` reads.

Names are the packaged corpora of :mod:`qsparse.data.packaged_corpora` (``wiki_en``, ``kjv``,
``factbook``, ...; ``docs/corpora.md`` has the table with sizes and licences) plus any added
with :func:`register_corpus`; local files (``.txt``, ``.json``/``.jsonl``, ``.parquet``,
``.csv``, optionally compressed) are read as :mod:`qsparse.data.local_files` describes.
Nothing is fetched at run time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ..cache import file_fingerprint, stable_hash
from .local_files import CorpusSpec, MissingDataFileError, builder_for_files
from .packaged_corpora import PACKAGED_CORPORA

__all__ = [
    "CORPUS_REGISTRY",
    "CorpusSpec",
    "available_corpora",
    "register_corpus",
    "resolve_corpus",
]

#: name -> ``builder(cache_dir) -> CorpusSpec``: the packaged corpora, then registered ones
CORPUS_REGISTRY: dict[str, Callable[[str | os.PathLike[str] | None], CorpusSpec]] = dict(
    PACKAGED_CORPORA
)


def register_corpus(
    name: str, builder: Callable[[str | os.PathLike[str] | None], CorpusSpec]
) -> None:
    """Add a named corpus; ``builder(cache_dir)`` must return a :class:`CorpusSpec`."""
    if not name or "/" in name or name in CORPUS_REGISTRY:
        raise ValueError(f"corpus name {name!r} is empty, contains '/' or is already registered")
    CORPUS_REGISTRY[name] = builder


def available_corpora() -> list[str]:
    """Registered corpus names."""
    return sorted(CORPUS_REGISTRY)


def resolve_corpus(
    corpus: str | None = None,
    data_files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    text_field: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> CorpusSpec:
    """Resolve a registry name or local files to a :class:`CorpusSpec`.

    Exactly one of ``corpus`` (a registered name, see :func:`available_corpora`) and
    ``data_files`` (a path or list of paths) must be given. ``text_field`` overrides the
    column name (default ``"text"``; the ``text`` builder always yields ``"text"``).

    Raises:
        ValueError: both or neither given, unknown corpus name, mixed/unknown extensions.
        FileNotFoundError: a data file does not exist, or a corpus package is missing.
    """
    if (corpus is None) == (data_files is None):
        raise ValueError(
            "give exactly one of `corpus` (one of "
            f"{available_corpora()}) and `data_files` (local text/jsonl/parquet/csv paths); "
            f"got corpus={corpus!r}, data_files={data_files!r}"
        )
    if corpus is not None:
        if corpus not in CORPUS_REGISTRY:
            raise ValueError(
                f"corpus: unknown corpus {corpus!r}; choose one of {available_corpora()} or pass "
                "`data_files` with local paths"
            )
        spec = CORPUS_REGISTRY[corpus](cache_dir)
        if text_field is not None and text_field != spec.text_field:
            spec = CorpusSpec(
                spec.name, spec.data_files, spec.builder, text_field, spec.fingerprint
            )
        return spec

    if isinstance(data_files, (str, os.PathLike)):
        files = [data_files]
    else:
        files = list(data_files)  # type: ignore[arg-type]
    if not files:
        raise ValueError("data_files: empty list; give at least one local file")
    paths = []
    for f in files:
        p = Path(f).expanduser()
        if not p.is_file():
            raise MissingDataFileError(
                f"data_files: file not found: {str(f)!r}; check the path in data.data_files"
            )
        paths.append(str(p.resolve()))
    builder = builder_for_files(paths)
    field = "text" if builder == "text" else (text_field or "text")
    if builder == "text" and text_field not in (None, "text"):
        raise ValueError(
            f"text_field={text_field!r} cannot be used with plain text files, whose column is "
            "always 'text'; drop text_field"
        )
    return CorpusSpec(
        "files",
        tuple(paths),
        builder,
        field,
        file_fingerprint(paths) + stable_hash(builder, length=4),
    )
