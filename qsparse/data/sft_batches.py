"""SFT batches over tokenized examples stored in Arrow: padding and packing, memory bounded.

Examples are rows of a memory-mapped ``datasets`` Arrow file (:mod:`qsparse.data.sft_tokenized`)
selected by an index array, read one at a time, so memory does not grow with the data set.

* ``packing=False``: :class:`ExampleDataset` items ``{"input_ids", "labels"}: LongTensor[L]``,
  batched by :func:`pad_collate` (right padding to the longest example: ``pad_token_id``,
  labels ``-100``, ``attention_mask`` 0).
* ``packing=True``: whole examples placed greedily, in order, into blocks of ``seq_len``
  (:func:`pack_boundaries`: an example that does not fit starts a new block; the rest of a
  block is padding with labels ``-100`` and attention_mask 0). Examples in one block attend
  to the earlier ones (plain causal attention), as in common SFT packing. Only the block
  boundaries (``int64[num_blocks + 1]``) are kept; :class:`PackedBlocks` assembles a block
  when it is read.

Not TRL's packing (``trl.pack_dataset``, what ``SFTTrainer(packing=True)`` runs): TRL is no
dependency of qsparse; its default best-fit strategy reorders examples and keeps them apart
through ``position_ids`` for padding-free attention kernels, which qsparse's attention (SDPA
with a causal mask) does not read; and it writes the packed rows out as a new dataset, where
this module keeps only the block boundaries and a fixed block order that exact resume
(:mod:`qsparse.data.resumable`) indexes into.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .sft_format import IGNORE_INDEX

__all__ = ["ExampleDataset", "ExampleRows", "PackedBlocks", "pack_boundaries", "pad_collate"]


class ExampleRows(Sequence):
    """``rows[i] -> (input_ids, labels)``, int64 arrays, of the Arrow rows ``index``."""

    def __init__(self, table: Any, index: np.ndarray) -> None:
        self.table = table.with_format("numpy", columns=["input_ids", "labels"])
        self.index = np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        row = self.table[int(self.index[i])]
        return row["input_ids"].astype(np.int64), row["labels"].astype(np.int64)

    def lengths(self) -> np.ndarray:
        """``int64[len(self)]``: tokens per example."""
        column = self.table.data.column("length").to_numpy()  # Arrow -> numpy, no Python ints
        return column[self.index].astype(np.int64)


class ExampleDataset(Dataset):
    """Variable-length examples: item -> ``{"input_ids", "labels"}: LongTensor[L]``."""

    def __init__(self, examples: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, labels = self.examples[i]
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}


def pack_boundaries(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """Greedy in-order packing: block ``b`` holds examples ``starts[b]:starts[b+1]``.

    Returns ``starts``, ``int64[num_blocks + 1]``. Every length must be at most ``seq_len``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > seq_len:
        i = int(np.argmax(lengths > seq_len))
        raise ValueError(f"example {i} has {int(lengths[i])} tokens > seq_len={seq_len}")
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    blocks, used = 0, 0
    for i, n in enumerate(lengths):
        if used + n > seq_len:
            blocks += 1
            starts[blocks] = i
            used = 0
        used += n
    if len(lengths):
        blocks += 1
        starts[blocks] = len(lengths)
    return starts[: blocks + 1].copy()


class PackedBlocks(Dataset):
    """Packed blocks: item -> ``{"input_ids", "labels", "attention_mask"}: LongTensor[T]``."""

    def __init__(
        self, examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_token_id: int
    ) -> None:
        lengths = (
            examples.lengths()
            if isinstance(examples, ExampleRows)
            else np.asarray([len(x[0]) for x in examples])
        )
        self.examples = examples
        self.starts = pack_boundaries(lengths, seq_len)
        self.seq_len = seq_len
        self.pad_token_id = pad_token_id

    def __len__(self) -> int:
        return max(len(self.starts) - 1, 0)

    def __getitem__(self, b: int) -> dict[str, torch.Tensor]:
        if not 0 <= b < len(self):
            raise IndexError(b)
        t = self.seq_len
        ids = torch.full((t,), self.pad_token_id, dtype=torch.long)
        labels = torch.full((t,), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(t, dtype=torch.long)
        pos = 0
        for j in range(int(self.starts[b]), int(self.starts[b + 1])):
            x, y = self.examples[j]
            ids[pos : pos + len(x)] = torch.from_numpy(x)
            labels[pos : pos + len(x)] = torch.from_numpy(y)
            mask[pos : pos + len(x)] = 1
            pos += len(x)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pad_collate(pad_token_id: int) -> Any:
    """Collate function padding ``input_ids``/``labels`` to the longest example (right side).

    Returns batches ``{"input_ids", "labels", "attention_mask"}: LongTensor[B, L_max]`` with
    ``pad_token_id`` / ``-100`` / ``0`` in padded positions.
    """

    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        n = max(len(x["input_ids"]) for x in items)
        b = len(items)
        ids = torch.full((b, n), pad_token_id, dtype=torch.long)
        labels = torch.full((b, n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((b, n), dtype=torch.long)
        for i, x in enumerate(items):
            m = len(x["input_ids"])
            ids[i, :m] = x["input_ids"]
            labels[i, :m] = x["labels"]
            mask[i, :m] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate
