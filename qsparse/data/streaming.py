"""The streaming pretraining pipeline: files read lazily, tokenized by loader workers, packed
in order; sharded by rank and worker, resumable from a cursor.

The stream of rank ``r`` of ``W``:

1. Documents: the corpus files (their order permuted with ``seed + epoch`` when shuffling and
   there are several) read with ``datasets`` streaming, then
   ``datasets.distributed.split_dataset_by_node(ds, r, W)`` (whole files per rank when the
   file count divides by ``W``, else every ``W``-th row).
2. Chunks: consecutive windows of ``window`` rows of that stream (``shuffle_buffer``). Chunk
   ``c`` is cleaned and split (:mod:`qsparse.data.documents`), its documents permuted with
   ``(seed, epoch, c)`` when shuffling, tokenized, EOS appended to each, and concatenated.
   DataLoader worker ``w`` of ``n`` tokenizes the chunks ``c`` with ``(c - c0) % n == w``
   (``c0`` the first chunk of this pass) and only skips over the rows of the others (Arrow
   tables, never tokenized).
3. Packing, in the main process (:class:`BlockPacker`): the DataLoader returns the workers'
   items round-robin, i.e. in chunk order, so the token stream, its blocks of ``seq_len`` and
   batches of ``batch_size`` blocks are the same for every ``num_workers`` (tokens carry over
   chunk boundaries; the last incomplete batch of an epoch is dropped).
4. Ranks stay in step: with ``W > 1`` every batch is preceded by a one-element all-reduce
   (minimum of "this rank has a batch"), so all ranks end an epoch at the same batch.

Resume: after each batch the packer records a :class:`StreamCursor` (the chunk holding the
next token, the tokens of it already used, and ``datasets``' ``state_dict`` at that chunk's
start). ``PretrainDataModule.state_dict`` gathers the cursor of every rank at the position
the training loop reached; on resume each rank restarts ``datasets`` from its cursor's state
(files before it are not opened again; within the current file rows are skipped by
``datasets`` without tokenization), re-tokenizes that one chunk and drops its first
``offset`` tokens. A checkpoint without cursors (or from another world size) falls back to
re-reading the epoch and skipping the consumed batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from .documents import load_documents, split_fraction
from .local_files import CorpusSpec
from .resumable import ResumableDataLoader

__all__ = ["BlockPacker", "ChunkSource", "StreamCursor", "StreamingLoader"]


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
        self.seed = seed
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
            order = np.random.default_rng(self.seed + self.epoch).permutation(len(files))
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
            rng = np.random.default_rng([self.seed, self.epoch, chunk])
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


def _as_is(item: Any) -> Any:
    return item


def _all_ranks_have(flag: bool) -> bool:
    """All-reduce (min) of one flag over the default process group (any backend)."""
    dist = torch.distributed
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


class BlockPacker:
    """Turns chunk items (in chunk order) into ``{"input_ids", "labels"}: LongTensor[B, T]``
    batches, recording after each batch the cursor of the next token.

    Args:
        seq_len, batch_size: ``T`` and ``B``.
        start: where the pass starts (its chunk's leading ``offset`` tokens are dropped).
        first_batch: index (within the epoch) of the first batch this pass yields.
        skip_batches: batches to drop first (resume without a cursor).
        lockstep: all-reduce before each batch so every rank stops together.
    """

    def __init__(
        self,
        seq_len: int,
        batch_size: int,
        start: StreamCursor,
        first_batch: int = 0,
        skip_batches: int = 0,
        lockstep: bool = False,
    ) -> None:
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.start = start
        self.first_batch = first_batch
        self.skip_batches = skip_batches
        self.lockstep = lockstep
        self.cursors: dict[int, StreamCursor] = {first_batch: start}

    def _record(self, k: int, cursor: StreamCursor) -> None:
        self.cursors[k] = cursor
        self.cursors.pop(k - 64, None)  # the loop is at most a few batches behind

    def batches(self, items: Iterator[dict[str, Any]]) -> Iterator[dict[str, torch.Tensor]]:
        need = self.seq_len * self.batch_size
        pending: list[list[Any]] = []  # [chunk, tokens, offset, state, next_state]
        available = 0
        k = self.first_batch
        skip = self.skip_batches
        for item in items:
            tokens = np.asarray(item["tokens"])
            offset = self.start.offset if item["chunk"] == self.start.chunk else 0
            pending.append([item["chunk"], tokens, offset, item["state"], item["next_state"]])
            available += len(tokens) - offset
            while available >= need:
                parts, want = [], need
                while want:
                    entry = pending[0]
                    take = min(want, len(entry[1]) - entry[2])
                    parts.append(entry[1][entry[2] : entry[2] + take])
                    entry[2] += take
                    want -= take
                    if entry[2] == len(entry[1]) and (want or len(pending) > 1):
                        pending.pop(0)
                available -= need
                k += 1
                head = pending[0]
                if head[2] == len(head[1]):  # chunk used up: the next one starts fresh
                    cursor = StreamCursor(head[0] + 1, 0, head[4])
                else:
                    cursor = StreamCursor(head[0], head[2], head[3])
                self._record(k, cursor)
                if skip:
                    skip -= 1
                    continue
                if self.lockstep and not _all_ranks_have(True):
                    return
                ids = torch.from_numpy(np.concatenate(parts).astype(np.int64))
                ids = ids.view(self.batch_size, self.seq_len)
                yield {"input_ids": ids, "labels": ids.clone()}
        if self.lockstep:
            _all_ranks_have(False)


class StreamingLoader(ResumableDataLoader):
    """DataLoader over a :class:`ChunkSource` whose iterator packs the chunks into batches.

    ``prepare`` (called at every ``iter()``, before workers copy the source) returns the
    :class:`BlockPacker` for the pass; it sets the source's epoch and start cursor first.
    """

    def __init__(
        self,
        source: ChunkSource,
        num_workers: int,
        prepare: Callable[[], BlockPacker],
    ) -> None:
        super().__init__(
            source,
            batch_size=None,
            num_workers=num_workers,
            collate_fn=_as_is,
            prefetch_factor=2 if num_workers > 0 else None,
        )
        self._prepare = prepare
        self.packer: BlockPacker | None = None

    def __iter__(self) -> Any:
        packer = self._prepare()
        self.packer = packer
        return packer.batches(DataLoader.__iter__(self))
