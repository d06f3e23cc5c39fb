"""The one document reader: corpus files -> documents, with one split rule for every user.

Training (:mod:`qsparse.data.pretrain`), evaluation (:mod:`qsparse.evaluation.perplexity`)
and calibration read text through :func:`load_documents` (a ``datasets`` table, optionally
streamed) or :func:`read_documents` (a list of strings). The rule:

- files are read with ``datasets``' packaged builders (:func:`qsparse.data.local_files.load_local_dataset`,
  no network): ``.txt``/``.text`` with the ``text`` builder, one document per paragraph
  (blank-line separated; also ``"line"`` or ``"document"``: ``text_sample_by``),
  ``.json``/``.jsonl`` (``json``), ``.parquet``, ``.csv``, optionally compressed;
- a plain-text document is stripped of surrounding whitespace (paragraphs keep stray
  newlines at their edges); other formats are taken as stored;
- a document that is missing, empty or only whitespace is dropped;
- ``max_documents`` keeps the first that many documents left after that;
- document ``d`` belongs to validation when ``u(d) = blake2b(f"{seed}\\0{text}") / 2**64 <
  val_fraction`` (:func:`split_fraction`): the split depends on the text only, not on order,
  sharding or ``max_documents``.

The result has one column, ``text``, whatever the corpus's ``text_field``. Both pretraining
pipelines (:mod:`qsparse.data.packed`, cached; :mod:`qsparse.data.streaming`) and the SFT
split use these rules, so they agree with evaluation on what a document is.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from ..cache import resolve_cache_dir, stable_hash
from .corpora import available_corpora, resolve_corpus
from .local_files import CorpusSpec, load_local_dataset

__all__ = ["TEXT_SAMPLE_BY", "load_documents", "read_documents", "split_fraction"]

#: how the ``text`` builder cuts a plain-text file into documents
TEXT_SAMPLE_BY = ("line", "paragraph", "document")


def split_fraction(text: str, seed: int) -> float:
    """Deterministic pseudo-uniform number in [0, 1) for a document (train/val split key)."""
    digest = hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def _clean(texts: list[Any], strip: bool) -> list[str]:
    """The split rule on one batch: drop missing/blank documents, strip plain text."""
    kept = [t for t in texts if isinstance(t, str) and t.strip()]
    return [t.strip() for t in kept] if strip else kept


def load_documents(
    spec: CorpusSpec,
    cache_dir: str | os.PathLike[str] | None = None,
    streaming: bool = False,
    text_sample_by: str = "paragraph",
    max_documents: int | None = None,
    data_files: list[str] | None = None,
) -> Any:
    """The documents of ``spec`` as a ``datasets.Dataset`` (``IterableDataset`` when
    ``streaming``) with the single column ``text``, cleaned by the module's rule.

    ``cache_dir``: cache root (``datasets``' Arrow files go to ``<cache_dir>/hf_datasets``;
    default :func:`qsparse.cache.resolve_cache_dir`). ``data_files``: the corpus's files in
    another order (the streaming pipeline shuffles them per epoch).

    Raises:
        ValueError: ``text_sample_by`` is not one of :data:`TEXT_SAMPLE_BY`, or
            ``spec.text_field`` is no column of the files (the message lists them).
        DataFileError: a file is empty or unreadable.
    """
    kwargs: dict[str, Any] = {}
    if spec.builder == "text":
        if text_sample_by not in TEXT_SAMPLE_BY:
            raise ValueError(
                f"text_sample_by must be one of {TEXT_SAMPLE_BY}, got {text_sample_by!r}"
            )
        kwargs["sample_by"] = text_sample_by
    root = resolve_cache_dir(cache_dir)
    files = list(data_files or spec.data_files)
    ds = load_local_dataset(spec.builder, files, root, streaming=streaming, **kwargs)
    columns = ds.column_names
    if columns is None and streaming:
        columns = list(next(iter(ds)).keys())
    field = spec.text_field
    if field not in columns:
        raise ValueError(
            f"text_field={field!r} is not a column of {list(spec.data_files)}; "
            f"available columns: {sorted(columns)}; set text_field to one of them"
        )
    strip = spec.builder == "text"
    ds = ds.select_columns([field])
    if field != "text":
        ds = ds.rename_column(field, "text")
    map_kwargs: dict[str, Any] = dict(batched=True, input_columns="text")
    if not streaming:  # derived in memory, named by the inputs (no fingerprint hashing)
        order = "" if data_files is None else "-" + stable_hash("files", files)
        fingerprint = f"{spec.fingerprint}-{spec.builder}-{text_sample_by}{order}-docs"
        map_kwargs.update(keep_in_memory=True, new_fingerprint=fingerprint)
    ds = ds.map(lambda texts: {"text": _clean(texts, strip)}, **map_kwargs)
    if max_documents is not None:
        if streaming:
            ds = ds.take(max_documents)
        else:
            ds = ds.select(range(min(max_documents, len(ds))), keep_in_memory=True)
    return ds


def read_documents(
    source: str | os.PathLike[str] | CorpusSpec,
    text_field: str | None = None,
    max_documents: int | None = None,
    text_sample_by: str = "paragraph",
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[str]:
    """The documents of a bundled corpus name, a local file or a :class:`CorpusSpec`, as a
    list of strings (:func:`load_documents`). ``text_field``: the column of a json, parquet
    or csv file or corpus (default: the corpus's, ``"text"`` for files; plain text has only
    ``text``).

    Raises:
        FileNotFoundError: ``source`` is no file and no corpus name (the message lists them).
        ValueError: unknown extension, or a missing ``text_field`` column.
    """
    if isinstance(source, CorpusSpec):
        spec = source
    elif Path(source).expanduser().is_file():
        spec = resolve_corpus(data_files=source, text_field=text_field, cache_dir=cache_dir)
    elif str(source) in available_corpora():
        spec = resolve_corpus(str(source), text_field=text_field, cache_dir=cache_dir)
    else:
        raise FileNotFoundError(
            f"{str(source)!r}: no such file and not a bundled corpus "
            f"({', '.join(available_corpora())})"
        )
    from datasets.utils import logging as ds_logging

    quiet = ds_logging.is_progress_bar_enabled()
    if quiet:  # a list for a caller that prints its own results: no progress bars
        ds_logging.disable_progress_bar()
    try:
        ds = load_documents(spec, cache_dir, False, text_sample_by, max_documents)
        return list(ds["text"])
    finally:
        if quiet:
            ds_logging.enable_progress_bar()
