"""``PretrainDataModule``: causal-LM pretraining batches from a corpus, cached or streamed.

Documents -> tokens (+EOS) -> one stream -> fixed blocks of ``seq_len``; batches are
``{"input_ids": LongTensor[B, T], "labels": LongTensor[B, T]}`` with ``labels == input_ids``
(the model shifts them). Two pipelines, chosen once by ``streaming``:

* cached (default, :mod:`qsparse.data.packed`): the corpus is tokenized once into a token
  array per split on disk and memory-mapped; blocks are shuffled per epoch by
  :class:`~qsparse.data.resumable.ResumableSampler`;
* streaming (:mod:`qsparse.data.streaming`): files are read lazily, tokenized by DataLoader
  workers in chunks and packed on the fly, sharded by rank and worker, resumable from a
  cursor without re-tokenizing consumed text. Nothing is cached but the tokenizer.

Both read documents by the same rules and split them by the same key
(:mod:`qsparse.data.documents`), so with ``shuffle=False`` on one rank they yield the same
token stream. Exact resume: :mod:`qsparse.data.resumable` (``state_dict`` = position in the
stream, plus each rank's stream cursor when streaming).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from ..cache import CACHE_FORMAT_VERSION, stable_hash
from .checks import check_positive_or_none
from .corpora import resolve_corpus
from .corpus_module import CorpusDataModule
from .documents import split_fraction
from .local_files import CorpusSpec
from .packed import (
    PackedTokenBlocks,
    build_token_cache,
    documents_with_split_key,
    split_documents,
    unigram_entropy_from_counts,
)
from .resumable import world_info
from .streaming import BlockPacker, ChunkSource, StreamCursor, StreamingLoader
from .tokenizer import resolve_tokenizer, tokenizer_fingerprint

__all__ = ["PackedTokenBlocks", "PretrainDataModule", "split_fraction"]


class PretrainDataModule(CorpusDataModule):
    """LightningDataModule for causal-LM pretraining on packed token blocks.

    Args:
        corpus: registered corpus name (``"wiki_en"``, ``"kjv"``, ``"kjv_verses"``); the
            default when neither ``corpus`` nor ``data_files`` is given is ``"wiki_en"``.
        data_files: local ``.txt``/``.jsonl``/``.json``/``.parquet``/``.csv`` file(s) instead of
            a corpus (give one or the other).
        text_field: document column (default ``"text"``).
        tokenizer: local tokenizer folder, or ``None``/``"bpe"`` for a byte-level BPE trained
            on the training split and cached; a tokenizer object is accepted too.
        vocab_size: size of the trained BPE (ignored for a tokenizer folder).
        seq_len: tokens per block ``T``.
        batch_size: blocks per batch per rank ``B``.
        val_fraction: expected fraction of documents in validation, in [0, 1).
        num_workers: DataLoader workers (streaming: they tokenize chunks in parallel).
        seed: split key, shuffle seed (``seed + epoch``).
        cache_dir: cache root (default ``$QSPARSE_CACHE`` or ``./.cache/qsparse``).
        max_documents: keep only the first N documents (tiny runs, tests).
        streaming: read files lazily and pack on the fly (large inputs; no token cache).
        text_sample_by: for ``.txt`` files: a document is a ``"line"``, ``"paragraph"``
            (blank-line separated; default) or the whole ``"document"``.
        shuffle: shuffle training blocks (cached) or documents (streaming) every epoch.
        shuffle_buffer: streaming: rows per chunk, the unit that is shuffled, tokenized by
            one worker and resumed from.
        val_batch_size: validation batch size (default ``batch_size``).

    Attributes (after ``setup``): ``tokenizer``, ``vocab_size`` (``len(tokenizer)``),
    ``num_train_tokens``/``num_val_tokens`` (tokens in whole blocks), ``num_train_blocks``.
    """

    def __init__(
        self,
        corpus: str | None = None,
        data_files: str | Sequence[str] | None = None,
        text_field: str | None = None,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        vocab_size: int = 4096,
        seq_len: int = 256,
        batch_size: int = 8,
        val_fraction: float = 0.01,
        num_workers: int = 0,
        seed: int = 1234,
        cache_dir: str | None = None,
        max_documents: int | None = None,
        streaming: bool = False,
        text_sample_by: str = "paragraph",
        shuffle: bool = True,
        shuffle_buffer: int = 10_000,
        val_batch_size: int | None = None,
    ) -> None:
        super().__init__(
            corpus=corpus,
            data_files=data_files,
            tokenizer=tokenizer,
            vocab_size=vocab_size,
            seq_len=seq_len,
            val_fraction=val_fraction,
            cache_dir=cache_dir,
            batch_size=batch_size,
            seed=seed,
            num_workers=num_workers,
            shuffle=shuffle,
            val_batch_size=val_batch_size,
            default_corpus="wiki_en",
            purpose="train",
        )
        check_positive_or_none("max_documents", max_documents)
        check_positive_or_none("shuffle_buffer", shuffle_buffer)
        self.text_field = text_field
        self.max_documents = max_documents
        self.streaming = streaming
        self.text_sample_by = text_sample_by
        self.shuffle_buffer = shuffle_buffer
        self.spec: CorpusSpec | None = None
        self.num_train_tokens: int | None = None
        self.num_val_tokens: int | None = None
        self._train_dataset: PackedTokenBlocks | None = None
        self._val_dataset: PackedTokenBlocks | None = None
        self._meta: dict[str, Any] = {}
        self._epoch_from_last_batch = streaming
        # streaming: the loader of the current pass, and cursors restored from a checkpoint
        self._stream_loader: StreamingLoader | None = None
        self._restored: dict[str, Any] | None = None

    # ----------------------------------------------------------------- build
    def _split_key(self) -> list[Any]:
        assert self.spec is not None
        return [
            self.spec.fingerprint,
            self.spec.text_field,
            self.max_documents,
            self.val_fraction,
            self.seed,
            self.text_sample_by if self.spec.builder == "text" else None,
        ]

    def _resolve_tokenizer(self, texts: Any, streaming: bool) -> PreTrainedTokenizerBase:
        assert self.spec is not None
        tok = resolve_tokenizer(
            self.tokenizer_spec,
            texts=texts,
            corpus_name=self.spec.name,
            key_parts=self._split_key() + (["streaming"] if streaming else []),
            vocab_size=self.bpe_vocab_size,
            cache_dir=self.cache_dir,
        )
        if tok.eos_token_id is None:
            raise ValueError(
                "tokenizer has no eos_token; documents are separated by EOS. Set "
                "tokenizer.eos_token (e.g. in tokenizer_config.json) or use the trained BPE"
            )
        return tok

    def prepare_data(self) -> None:
        """Resolve the corpus and the tokenizer; cached: build the token cache (idempotent)."""
        if self.spec is None:
            self.spec = resolve_corpus(
                self.corpus, self.data_files, self.text_field, self.cache_dir
            )
        if self.streaming:
            if self.tokenizer is None:

                def stream_texts() -> Iterable[str]:
                    source = self._source("train", 1, 0, tokenizer=None)
                    source.shuffle = False
                    for table in source.rows().iter(batch_size=1000):
                        yield from source.documents(table.column(0).to_pylist(), 0)

                self.tokenizer = self._resolve_tokenizer(stream_texts, streaming=True)
            return
        if self.cache_path is not None and (self.cache_path / "meta.json").is_file():
            return
        docs_cache: dict[str, Any] = {}

        def split_docs() -> tuple[Any, Any]:
            if "split" not in docs_cache:
                docs = documents_with_split_key(
                    self.spec, self.cache_dir, self.text_sample_by, self.max_documents,
                    self.seed, self._split_key(),
                )  # fmt: skip
                docs_cache["split"] = split_documents(docs, self.val_fraction)
            return docs_cache["split"]

        def train_texts() -> Iterable[str]:
            for batch in split_docs()[0].iter(batch_size=1000):
                yield from batch["text"]

        if self.tokenizer is None:
            self.tokenizer = self._resolve_tokenizer(train_texts, streaming=False)
        tok = self.tokenizer
        key = stable_hash(
            CACHE_FORMAT_VERSION, "packed", self._split_key(), tokenizer_fingerprint(tok)
        )
        self.cache_path = self.cache_dir / "packed" / f"{self.spec.name}-{key}"
        if not (self.cache_path / "meta.json").is_file():
            build_token_cache(*split_docs(), tok, self.cache_path)

    def setup(self, stage: str | None = None) -> None:
        """Load the cached token streams (building them first if ``prepare_data`` did not run)."""
        self.prepare_data()
        if self.streaming or self._train_dataset is not None:
            return
        assert self.cache_path is not None
        self._meta = json.loads((self.cache_path / "meta.json").read_text())
        self._train_dataset = PackedTokenBlocks(self.cache_path / "train.npy", self.seq_len)
        self._val_dataset = PackedTokenBlocks(self.cache_path / "val.npy", self.seq_len)
        if len(self._train_dataset) == 0:
            raise ValueError(
                f"the training split has {self._meta['train_tokens']} tokens, fewer than "
                f"seq_len={self.seq_len}; lower seq_len or raise max_documents"
            )
        if self.val_fraction > 0 and len(self._val_dataset) == 0:
            raise ValueError(
                f"the validation split has {self._meta['val_tokens']} tokens, fewer than "
                f"seq_len={self.seq_len}; raise val_fraction or max_documents, or lower seq_len"
            )
        self.num_train_tokens = len(self._train_dataset) * self.seq_len
        self.num_val_tokens = len(self._val_dataset) * self.seq_len

    @property
    def num_train_blocks(self) -> int:
        """Training blocks per epoch (all ranks together); cached pipeline only."""
        if self._train_dataset is None:
            self.setup("fit")
        assert self._train_dataset is not None
        return len(self._train_dataset)

    def unigram_entropy(self, max_tokens: int = 5_000_000) -> float:
        """Entropy (nats) of the unigram distribution of the training tokens.

        ``H = -sum_v p_v ln p_v`` with ``p_v`` the frequency of token ``v`` in the training
        stream (documents + EOS). This is the cross-entropy of the best model that ignores
        context, so a language model's validation loss must fall clearly below it. Streaming
        mode estimates it from the first ``max_tokens`` training tokens.
        """
        if not self.streaming:
            if self._train_dataset is None:
                self.setup("fit")
            return float(self._meta["unigram_entropy"])
        self.prepare_data()
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        source = self._source("train", 1, 0)
        source.shuffle = False
        for item in source:
            counts += np.bincount(item["tokens"], minlength=len(counts))
            if counts.sum() >= max_tokens:
                break
        return unigram_entropy_from_counts(counts)

    # --------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        """Training batches ``{"input_ids", "labels"}: LongTensor[B, T]``, resumable."""
        if self.streaming:
            return self._streaming_loader(train=True)
        return self._split_loader(train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in fixed order (sharded across ranks)."""
        if self.streaming:
            return self._streaming_loader(train=False)
        return self._split_loader(train=False)

    def set_epoch(self, epoch: int) -> None:
        """Streaming mode without Lightning: start ``epoch`` on the next iteration.

        Under a Trainer the streaming epoch advances by itself after the last batch of an
        epoch; map-style loaders use their sampler's ``set_epoch`` (called by Lightning).
        """
        pos = self.position
        if pos.epoch != int(epoch):
            pos.epoch, pos.batches_consumed, pos.samples_consumed = int(epoch), 0, 0

    # ------------------------------------------------------------- streaming
    def _source(self, split: str, world: int, rank: int, tokenizer: Any = "self") -> ChunkSource:
        assert self.spec is not None
        return ChunkSource(
            self.spec,
            self.tokenizer if tokenizer == "self" else tokenizer,  # type: ignore[arg-type]
            split=split,
            val_fraction=self.val_fraction,
            seed=self.seed,
            cache_dir=self.cache_dir,
            max_documents=self.max_documents,
            text_sample_by=self.text_sample_by,
            shuffle=self.shuffle,
            window=self.shuffle_buffer,
            world_size=world,
            rank=rank,
        )

    def _streaming_loader(self, train: bool) -> DataLoader:
        self.prepare_data()
        world, rank = world_info(self.trainer)
        lockstep = world > 1 and torch.distributed.is_initialized()
        source = self._source("train" if train else "val", world, rank)
        if not train:
            bs = self.val_batch_size
            return StreamingLoader(
                source,
                self.num_workers,
                lambda: BlockPacker(self.seq_len, bs, StreamCursor(), lockstep=lockstep),
            )
        self._global_batch_size = self.batch_size * world

        def prepare() -> BlockPacker:
            pos = self.position
            pos.global_batch_size = self._global_batch_size
            start, skip = self._start_cursor(world, rank)
            source.epoch, source.start = pos.epoch, start
            k = pos.batches_consumed
            return BlockPacker(self.seq_len, self.batch_size, start, k - skip, skip, lockstep)

        loader = StreamingLoader(source, self.num_workers, prepare)
        loader._position = self.position
        self._stream_loader = loader
        return loader

    def _start_cursor(self, world: int, rank: int) -> tuple[StreamCursor, int]:
        """This rank's cursor for the current position, and the batches still to skip
        (0 with a cursor; ``batches_consumed`` when re-reading from the epoch start)."""
        pos = self.position
        if pos.batches_consumed == 0:
            return StreamCursor(), 0
        restored = self._restored
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
        loader = self._stream_loader
        packer = loader.packer if loader is not None else None
        if packer is None or self._stream_epoch(loader) != epoch:
            return None
        return packer.cursors.get(k)

    @staticmethod
    def _stream_epoch(loader: StreamingLoader) -> int:
        source = loader.dataset
        assert isinstance(source, ChunkSource)
        return source.epoch

    def state_dict(self) -> dict[str, Any]:
        """The position, plus (streaming) every rank's stream cursor at that position
        (``cursors[r]``; gathered from all ranks, so call it on every rank as Lightning does)."""
        state = super().state_dict()
        if not self.streaming:
            return state
        cursor = self._cursor_at(self.position.epoch, self.position.batches_consumed)
        mine = cursor.to_dict() if cursor is not None else None
        world, _ = world_info(self.trainer)
        dist = torch.distributed
        if world > 1 and dist.is_available() and dist.is_initialized():
            cursors: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(cursors, mine)
        else:
            cursors = [mine]
        if all(c is not None for c in cursors):
            state["cursors"] = cursors
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position (and stream cursors); the next loader continues after it."""
        super().load_state_dict(state_dict)
        cursors = state_dict.get("cursors")
        self._restored = None
        if self.streaming and cursors:
            self._restored = {
                "epoch": self.position.epoch,
                "batches_consumed": self.position.batches_consumed,
                "cursors": list(cursors),
            }
