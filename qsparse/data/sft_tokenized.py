"""SFT rows -> tokenized examples in an Arrow file on disk (``datasets.map``), split by index.

:func:`build_sft_cache` runs ``datasets.map(batched=True)`` over the raw rows (themselves an
Arrow table that ``datasets`` converted from the jsonl/parquet files), turning each row into
messages, rendering and tokenizing it with the loss mask (:mod:`qsparse.data.sft_format`),
truncating to ``seq_len`` and writing ``input_ids``/``labels`` (int32 lists), ``length``,
``u`` (the split key) and ``keep`` (a response token survived truncation) straight to
``<out>/tokenized.arrow``; memory stays at one map batch whatever the data set size. Then:

* example ``x`` is validation when ``split_fraction(json(messages(x)), seed) < val_fraction``
  (the pretraining rule); if none is (tiny sets), the one with the smallest key is;
* ``train.npy`` / ``val.npy`` hold the row indices of the kept examples of each side (file
  order), and ``meta.json`` the counts; it is written last, into a folder that is renamed
  into place, so its presence marks a complete cache.

:func:`load_sft_cache` memory-maps the Arrow file and returns the two index arrays.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from ..io import atomic_write_dir, atomic_write_text
from .documents import split_fraction
from .sft_format import IGNORE_INDEX, example_to_messages, render_segments, tokenize_segments

__all__ = ["build_sft_cache", "load_sft_cache"]

MAP_BATCH = 1000


def _features() -> Any:
    from datasets import Features, Sequence, Value

    return Features(
        {
            "input_ids": Sequence(Value("int32")),
            "labels": Sequence(Value("int32")),
            "length": Value("int32"),
            "u": Value("float64"),
            "keep": Value("bool"),
        }
    )


def build_sft_cache(
    rows: Any,
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    *,
    fmt: str,
    fields: dict[str, str],
    use_chat_template: bool,
    seq_len: int,
    seed: int,
    val_fraction: float,
    num_proc: int | None = None,
) -> dict[str, int]:
    """Tokenize the ``datasets`` Dataset ``rows`` into ``out`` (see the module docstring);
    returns the meta (``num_train``, ``num_val``, ``dropped``)."""

    def encode(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        names = list(batch)
        msgs = [
            example_to_messages(dict(zip(names, values, strict=True)), fmt, index=i, **fields)
            for i, values in zip(indices, zip(*batch.values(), strict=True), strict=True)
        ]
        segments = [render_segments(m, tokenizer, use_chat_template) for m in msgs]
        out_ids, out_labels, keep = [], [], []
        for ids, labels in tokenize_segments(segments, tokenizer, use_chat_template):
            ids, labels = ids[:seq_len], labels[:seq_len]
            out_ids.append(ids.astype(np.int32))
            out_labels.append(labels.astype(np.int32))
            keep.append(bool((labels != IGNORE_INDEX).any()))
        return {
            "input_ids": out_ids,
            "labels": out_labels,
            "length": [len(x) for x in out_ids],
            "u": [split_fraction(json.dumps(m, sort_keys=True), seed) for m in msgs],
            "keep": keep,
        }

    meta: dict[str, int] = {}

    def fill(tmp: Path) -> None:  # a fresh folder that becomes ``out`` once complete
        tokenized = rows.map(
            encode,
            batched=True,
            batch_size=MAP_BATCH,
            with_indices=True,
            remove_columns=rows.column_names,
            features=_features(),
            cache_file_name=str(tmp / "tokenized.arrow"),
            load_from_cache_file=False,
            new_fingerprint=out.name,
            num_proc=num_proc,
            desc="tokenizing SFT examples",
        )
        cols = tokenized.with_format("numpy", columns=["u", "keep"])[:]
        u, keep = np.asarray(cols["u"]), np.asarray(cols["keep"], dtype=bool)
        is_val = u < val_fraction
        if val_fraction > 0 and not is_val.any() and len(u):
            is_val[int(np.argmin(u))] = True
        if len(u) and is_val.all():
            raise ValueError(
                f"val_fraction={val_fraction} leaves no training examples ({len(u)} examples); "
                "lower it or raise max_examples"
            )
        train, val = np.flatnonzero(~is_val & keep), np.flatnonzero(is_val & keep)
        np.save(tmp / "train.npy", train)
        np.save(tmp / "val.npy", val)
        meta.update({"num_train": len(train), "num_val": len(val), "dropped": int((~keep).sum())})
        atomic_write_text(tmp / "meta.json", json.dumps(meta))

    # a copy another process published first is kept (the inputs, hence the bytes, are equal)
    atomic_write_dir(out, fill, replace=False)
    return meta


def load_sft_cache(out: Path) -> tuple[Any, np.ndarray, np.ndarray, dict[str, int]]:
    """``(table, train_index, val_index, meta)`` of a cache :func:`build_sft_cache` wrote;
    ``table`` is the memory-mapped Arrow file."""
    from datasets import Dataset

    table = Dataset.from_file(str(out / "tokenized.arrow"))
    meta = json.loads((out / "meta.json").read_text())
    return table, np.load(out / "train.npy"), np.load(out / "val.npy"), meta
