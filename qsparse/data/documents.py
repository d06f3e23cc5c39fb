"""Pretraining documents: reading a corpus, the document rules, and the train/val split key.

Both pretraining pipelines (:mod:`qsparse.data.packed`, cached; :mod:`qsparse.data.streaming`)
read documents through here, so they agree on what a document is:

* files are read with ``datasets.load_dataset`` (``streaming=True`` for the streaming pipeline);
  for plain ``.txt`` files a document is a ``line``, a blank-line separated ``paragraph``
  (default) or the whole ``document`` (``text_sample_by``) and is stripped of surrounding
  whitespace;
* empty (or whitespace-only) documents are dropped;
* document ``d`` belongs to validation when ``u(d) = blake2b(f"{seed}\\0{text}") / 2**64 <
  val_fraction`` (:func:`split_fraction`): the split depends on the text only, not on order,
  sharding or ``max_documents``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .corpora import CorpusSpec, load_local_dataset

__all__ = ["clean_documents", "load_documents", "split_fraction"]

TEXT_SAMPLE_BY = ("line", "paragraph", "document")


def split_fraction(text: str, seed: int) -> float:
    """Deterministic pseudo-uniform number in [0, 1) for a document (train/val split key)."""
    digest = hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def load_documents(
    spec: CorpusSpec,
    cache_dir: Path,
    streaming: bool = False,
    text_sample_by: str = "paragraph",
    data_files: list[str] | None = None,
) -> Any:
    """``datasets`` Dataset (or IterableDataset when streaming) of the corpus files
    (``data_files``: the same files in another order, e.g. shuffled per epoch).

    Raises:
        ValueError: ``spec.text_field`` is not a column of the files, or a bad
            ``text_sample_by``.
    """
    kwargs: dict[str, Any] = {}
    if spec.builder == "text":
        if text_sample_by not in TEXT_SAMPLE_BY:
            raise ValueError(
                f"text_sample_by must be 'line', 'paragraph' or 'document', got {text_sample_by!r}"
            )
        kwargs["sample_by"] = text_sample_by
    files = list(data_files or spec.data_files)
    ds = load_local_dataset(spec.builder, files, cache_dir, streaming=streaming, **kwargs)
    columns = ds.column_names
    if columns is None and streaming:
        columns = list(next(iter(ds)).keys())
    if spec.text_field not in columns:
        raise ValueError(
            f"text_field={spec.text_field!r} is not a column of {list(spec.data_files)}; "
            f"available columns: {sorted(columns)}; set text_field to one of them"
        )
    return ds


def clean_documents(texts: Iterable[str | None], builder: str) -> list[str]:
    """The documents among ``texts``: empty ones dropped, ``.txt`` ones stripped."""
    if builder == "text":
        return [t.strip() for t in texts if t and t.strip()]
    return [t for t in texts if t and t.strip()]
