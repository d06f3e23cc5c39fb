"""Where the streaming pretraining pipeline reads from: a rank's documents as chunks of
tokens (:class:`ChunkSource`, steps 1-2 of :mod:`qsparse.data.streaming`) and the position in
them (:class:`StreamCursor`), from which a resumed run restarts ``datasets`` without
re-tokenizing the text already consumed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from .documents import load_documents, split_fraction
from .local_files import CorpusSpec

__all__ = ["ChunkSource", "StreamCursor"]


@dataclass
class StreamCursor:
    """Where a rank's token stream stands: the next token is token ``offset`` of chunk
    ``chunk``, and ``source_state`` (``datasets`` ``state_dict``, ``None`` = start of the
    files) reads from that chunk's first row."""

    chunk: int = 0
    offset: int = 0
    source_state: dict[str, Any] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StreamCursor:
        return cls(int(d["chunk"]), int(d["offset"]), d.get("source_state"))


class ChunkSource(IterableDataset):
    """Yields ``{"chunk": c, "tokens": int32[L], "state": dict|None, "next_state": dict}`` per
    chunk of this rank's documents (this worker's share only; see the module docstring)."""

    def __init__(
        self,
        spec: CorpusSpec,
        tokenizer: PreTrainedTokenizerBase,
        *,
        split: str,
        val_fraction: float,
        seed: int,
        shuffle_seed: int,
        cache_dir: Path,
        max_documents: int | None,
        text_sample_by: str,
        shuffle: bool,
        window: int,
        world_size: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"shuffle_buffer must be >= 1 (documents per chunk), got {window}")
        self.spec = spec
        self.tokenizer = tokenizer
        self.split = split
        self.val_fraction = val_fraction
        self.seed = seed  # the split key
        self.shuffle_seed = shuffle_seed  # the order of files and of documents in a chunk
        self.cache_dir = cache_dir
        self.max_documents = max_documents
        self.text_sample_by = text_sample_by
        self.shuffle = shuffle and split == "train"
        self.window = window
        self.world_size = world_size
        self.rank = rank
        self.epoch = 0
        self.start = StreamCursor()

    def rows(self) -> Any:
        """This rank's rows as an Arrow-formatted ``datasets`` IterableDataset."""
        from datasets.distributed import split_dataset_by_node

        files = list(self.spec.data_files)
        if self.shuffle and len(files) > 1:
            order = np.random.default_rng(self.shuffle_seed + self.epoch).permutation(len(files))
            files = [files[i] for i in order]
        ds = load_documents(
            self.spec,
            self.cache_dir,
            True,
            self.text_sample_by,
            self.max_documents,
            data_files=files,
        )
        if self.world_size > 1:
            ds = split_dataset_by_node(ds, self.rank, self.world_size)
        return ds.select_columns(["text"]).with_format("arrow")

    def documents(self, texts: list[Any], chunk: int) -> list[str]:
        """The documents of a chunk's rows that belong to this split, in training order."""
        want_val = self.split == "val"
        docs = [t for t in texts if (split_fraction(t, self.seed) < self.val_fraction) == want_val]
        if self.shuffle and len(docs) > 1:
            rng = np.random.default_rng([self.shuffle_seed, self.epoch, chunk])
            docs = [docs[i] for i in rng.permutation(len(docs))]
        return docs

    def tokenize(self, docs: list[str]) -> np.ndarray:
        """``concat(ids(d) + [eos] for d in docs)`` as int32."""
        if not docs:
            return np.zeros(0, dtype=np.int32)
        eos = self.tokenizer.eos_token_id
        ids = self.tokenizer(docs, add_special_tokens=False)["input_ids"]
        lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
        out = np.empty(int(lengths.sum()), dtype=np.int32)
        pos = 0
        for x in ids:
            out[pos : pos + len(x)] = x
            out[pos + len(x)] = eos
            pos += len(x) + 1
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        n, w = (info.num_workers, info.id) if info is not None else (1, 0)
        ds = self.rows()
        state = self.start.source_state
        if state is not None:
            ds.load_state_dict(state)
        column = "text"  # load_documents renames the corpus text_field
        for i, table in enumerate(ds.iter(batch_size=self.window)):
            next_state = ds.state_dict()
            if i % n == w:
                c = self.start.chunk + i
                docs = self.documents(table.column(column).to_pylist(), c)
                yield {"chunk": c, "tokens": self.tokenize(docs), "state": state,
                       "next_state": next_state}  # fmt: skip
            state = next_state
