"""The streaming pretraining pipeline: files read lazily, tokenized by loader workers, packed
in order; sharded by rank and worker, resumable from a cursor.

The stream of rank ``r`` of ``W``:

1. Documents: the corpus files (their order permuted with ``seed + epoch`` when shuffling and
   there are several) read with ``datasets`` streaming, then
   ``datasets.distributed.split_dataset_by_node(ds, r, W)`` (whole files per rank when the
   file count divides by ``W``, else every ``W``-th row).
2. Chunks (:class:`~qsparse.data.stream_source.ChunkSource`): consecutive windows of ``window`` rows of that stream (``shuffle_buffer``). Chunk
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

Resume: after each batch the packer records a
:class:`~qsparse.data.stream_source.StreamCursor` (the chunk holding the
next token, the tokens of it already used, and ``datasets``' ``state_dict`` at that chunk's
start). :meth:`StreamingPipeline.state_dict` gathers the cursor of every rank at the position
the training loop reached; on resume each rank restarts ``datasets`` from its cursor's state
(files before it are not opened again; within the current file rows are skipped by
``datasets`` without tokenization), re-tokenizes that one chunk and drops its first
``offset`` tokens. A checkpoint without cursors (or from another world size) falls back to
re-reading the epoch and skipping the consumed batches.

:class:`StreamingPipeline` runs these steps for ``PretrainDataModule(streaming=True)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from .packed import unigram_entropy_from_counts
from .pretrain_pipeline import PretrainPipeline
from .resumable import ResumableDataLoader, world_info
from .stream_source import ChunkSource, StreamCursor

if TYPE_CHECKING:
    from .pretrain import PretrainDataModule

__all__ = ["BlockPacker", "StreamingLoader", "StreamingPipeline"]


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


class StreamingPipeline(PretrainPipeline):
    """The streaming pipeline (the module docstring) of a
    :class:`~qsparse.data.pretrain.PretrainDataModule` ``dm``.

    Nothing is built ahead but the tokenizer (a BPE is trained on the training documents as
    streamed). Each ``train_loader()`` is a :class:`StreamingLoader` whose pass starts at
    ``dm.position``: from this rank's cursor saved in the checkpoint, else from the one this
    process recorded there, else by re-reading the epoch and skipping the consumed batches.
    ``state_dict`` adds ``cursors`` (every rank's :class:`StreamCursor` at the position).
    """

    epoch_from_last_batch = True
    tokenizer_key = ("streaming",)

    def __init__(self, dm: PretrainDataModule) -> None:
        super().__init__(dm)
        self.loader: StreamingLoader | None = None  # the current training pass's loader
        self.restored: dict[str, Any] | None = None  # checkpoint cursors and their position

    def source(self, split: str, world: int = 1, rank: int = 0) -> ChunkSource:
        """The chunks of ``split`` for rank ``rank`` of ``world``."""
        dm = self.dm
        assert dm.spec is not None
        return ChunkSource(
            dm.spec,
            dm.tokenizer,  # type: ignore[arg-type]  (None only while training the BPE)
            split=split,
            val_fraction=dm.val_fraction,
            seed=dm.seed,
            shuffle_seed=dm.shuffle_seed,
            cache_dir=dm.cache_dir,
            max_documents=dm.max_documents,
            text_sample_by=dm.text_sample_by,
            shuffle=dm.shuffle,
            window=dm.shuffle_buffer,
            world_size=world,
            rank=rank,
        )

    def prepare(self) -> None:
        if self.dm.tokenizer is not None:
            return

        def stream_texts() -> Iterable[str]:
            source = self.source("train")
            source.shuffle = False
            for table in source.rows().iter(batch_size=1000):
                yield from source.documents(table.column(0).to_pylist(), 0)

        self.dm.tokenizer = self.resolve_tokenizer(stream_texts)

    def setup(self) -> None:
        """Nothing to load: the loaders read the files as they iterate."""

    def num_train_blocks(self) -> int:
        raise ValueError(
            "num_train_blocks is not known ahead with streaming=true (the files are read as "
            "training goes); use streaming=false to count the blocks"
        )

    def unigram_entropy(self, max_tokens: int) -> float:
        """Estimated from the first ``max_tokens`` training tokens, in file order."""
        self.dm.prepare_data()
        counts = np.zeros(self.dm.vocab_size, dtype=np.int64)
        source = self.source("train")
        source.shuffle = False
        for item in source:
            counts += np.bincount(item["tokens"], minlength=len(counts))
            if counts.sum() >= max_tokens:
                break
        return unigram_entropy_from_counts(counts)

    def _ranks(self) -> tuple[int, int, bool]:
        """Prepare the data; ``(world, rank, lockstep)``: this process's place among the ranks,
        and whether their packers agree before each batch so every rank stops together (more
        than one rank in an initialised process group)."""
        self.dm.prepare_data()
        world, rank = world_info(self.dm.trainer)
        return world, rank, world > 1 and torch.distributed.is_initialized()

    def val_loader(self) -> DataLoader:
        dm = self.dm
        world, rank, lockstep = self._ranks()
        seq_len, bs = dm.seq_len, dm.val_batch_size
        return StreamingLoader(
            self.source("val", world, rank),
            dm.num_workers,
            lambda: BlockPacker(seq_len, bs, StreamCursor(), lockstep=lockstep),
        )

    def train_loader(self) -> DataLoader:
        dm = self.dm
        world, rank, lockstep = self._ranks()
        source = self.source("train", world, rank)
        dm._global_batch_size = dm.batch_size * world

        def prepare() -> BlockPacker:
            pos = dm.position
            pos.global_batch_size = dm._global_batch_size
            start, skip = self._start_cursor(world, rank)
            source.epoch, source.start = pos.epoch, start
            k = pos.batches_consumed
            return BlockPacker(dm.seq_len, dm.batch_size, start, k - skip, skip, lockstep)

        loader = StreamingLoader(source, dm.num_workers, prepare)
        loader._position = dm.position
        self.loader = loader
        return loader

    def _start_cursor(self, world: int, rank: int) -> tuple[StreamCursor, int]:
        """This rank's cursor for the current position, and the batches still to skip
        (0 with a cursor; ``batches_consumed`` when re-reading from the epoch start)."""
        pos = self.dm.position
        if pos.batches_consumed == 0:
            return StreamCursor(), 0
        restored = self.restored
        if (
            restored is not None
            and restored["epoch"] == pos.epoch
            and restored["batches_consumed"] == pos.batches_consumed
        ):
            cursors = restored["cursors"]
            if len(cursors) == world:
                return StreamCursor.from_dict(cursors[rank]), 0
            warnings.warn(
                f"the checkpoint's stream cursors are for {len(cursors)} ranks, this run has "
                f"{world}: re-reading epoch {pos.epoch} up to batch {pos.batches_consumed}",
                stacklevel=2,
            )
        cursor = self._cursor_at(pos.epoch, pos.batches_consumed)
        if cursor is not None:
            return cursor, 0
        return StreamCursor(), pos.batches_consumed

    def _cursor_at(self, epoch: int, k: int) -> StreamCursor | None:
        """The cursor this process recorded after ``k`` batches of ``epoch``, if any."""
        if k == 0:
            return StreamCursor()
        loader = self.loader
        packer = loader.packer if loader is not None else None
        if packer is None or loader.dataset.epoch != epoch:  # type: ignore[union-attr]
            return None
        return packer.cursors.get(k)

    def state_dict(self) -> dict[str, Any]:
        """``{"cursors": [cursor of rank r, ...]}`` at the position (gathered from all ranks, so
        call it on every rank as Lightning does); ``{}`` when a rank has none recorded."""
        pos = self.dm.position
        cursor = self._cursor_at(pos.epoch, pos.batches_consumed)
        mine = cursor.to_dict() if cursor is not None else None
        world, _ = world_info(self.dm.trainer)
        dist = torch.distributed
        if world > 1 and dist.is_available() and dist.is_initialized():
            cursors: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(cursors, mine)
        else:
            cursors = [mine]
        return {"cursors": cursors} if all(c is not None for c in cursors) else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the checkpoint's ``cursors`` for the next pass that starts at its position."""
        cursors = state_dict.get("cursors")
        pos = self.dm.position
        self.restored = None
        if cursors:
            self.restored = {
                "epoch": pos.epoch,
                "batches_consumed": pos.batches_consumed,
                "cursors": list(cursors),
            }
