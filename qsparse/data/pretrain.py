"""Pretraining data: documents -> tokens (+EOS) -> one stream -> fixed blocks of ``seq_len``.

Pipeline (map-style, the default):

1. Documents come from a named corpus or local files (:mod:`qsparse.data.corpora`), read with
   ``datasets.load_dataset`` (its arrow cache under ``<cache>/hf_datasets``); empty documents
   are dropped, documents of plain ``.txt`` files are stripped of surrounding whitespace, and
   ``max_documents`` keeps the first N (file order).
2. Train/validation split by document hash: document ``d`` goes to validation when
   ``u(d) = blake2b(f"{seed}\\0{text}") / 2**64 < val_fraction``. It depends on the text only
   (not on order or ``max_documents``); identical documents land on the same side. If no
   document falls below the threshold (tiny runs) the one with the smallest ``u`` is used.
3. The tokenizer is a local folder or a byte-level BPE trained on the training split
   (:mod:`qsparse.data.tokenizer`).
4. ``datasets.map(batched=True)`` tokenizes, EOS is appended to every document, and the ids are
   concatenated into one ``uint16``/``int32`` array per split, saved (atomically) as
   ``<cache>/packed/<corpus>-<hash>/{train,val}.npy``; the hash covers the corpus files,
   split settings and tokenizer, so a second run memory-maps them and skips tokenization.
   ``seq_len`` is applied at load time (a view), so every block length reuses one cache.
5. Block ``i`` is ``tokens[i*T:(i+1)*T]`` (the tail shorter than ``T`` is dropped); the batch
   is ``{"input_ids": LongTensor[B, T], "labels": LongTensor[B, T]}`` with
   ``labels == input_ids`` (the model shifts them).

With ``streaming=True`` the files are read lazily (``load_dataset(..., streaming=True)``),
documents are tokenized and packed on the fly, and nothing is cached except the tokenizer;
see :class:`StreamingPackedDataset`.

Exact resume: see :mod:`qsparse.data.resumable` (``state_dict`` = position in the stream).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from .cache import (
    CACHE_FORMAT_VERSION,
    atomic_save_npy,
    atomic_write_text,
    resolve_cache_dir,
    stable_hash,
)
from .corpora import CorpusSpec, load_local_dataset, resolve_corpus
from .resumable import ResumableDataLoader, ResumableDataModule, check_source, world_info
from .tokenizer import resolve_tokenizer, tokenizer_fingerprint

__all__ = [
    "PackedTokenBlocks",
    "PretrainDataModule",
    "StreamingPackedDataset",
    "split_fraction",
    "unigram_entropy_from_counts",
]


def split_fraction(text: str, seed: int) -> float:
    """Deterministic pseudo-uniform number in [0, 1) for a document (train/val split key)."""
    digest = hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def unigram_entropy_from_counts(counts: np.ndarray) -> float:
    """``H = -sum_v p_v ln p_v`` (nats) with ``p_v = counts[v] / counts.sum()``."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError("unigram entropy of an empty token stream is undefined")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def load_documents(
    spec: CorpusSpec,
    cache_dir: Path,
    streaming: bool = False,
    text_sample_by: str = "paragraph",
) -> Any:
    """``datasets`` Dataset (or IterableDataset when streaming) of the corpus files.

    Raises:
        ValueError: ``spec.text_field`` is not a column of the files.
    """
    kwargs: dict[str, Any] = {}
    if spec.builder == "text":
        if text_sample_by not in ("line", "paragraph", "document"):
            raise ValueError(
                f"text_sample_by must be 'line', 'paragraph' or 'document', got {text_sample_by!r}"
            )
        kwargs["sample_by"] = text_sample_by
    ds = load_local_dataset(spec.builder, spec.data_files, cache_dir, streaming=streaming, **kwargs)
    columns = ds.column_names
    if columns is None and streaming:
        columns = list(next(iter(ds)).keys())
    if spec.text_field not in columns:
        raise ValueError(
            f"text_field={spec.text_field!r} is not a column of {list(spec.data_files)}; "
            f"available columns: {sorted(columns)}; set text_field to one of them"
        )
    return ds


class PackedTokenBlocks(Dataset):
    """Fixed-length blocks over a flat token array stored as ``.npy`` (memory-mapped lazily).

    Item ``i``: ``{"input_ids": LongTensor[T], "labels": LongTensor[T]}`` with
    ``input_ids = labels = tokens[i*T:(i+1)*T]``.
    """

    def __init__(self, path: str | os.PathLike[str], seq_len: int) -> None:
        self.path = str(path)
        self.seq_len = seq_len
        self._tokens: np.ndarray | None = None
        n_tokens = int(np.load(self.path, mmap_mode="r").shape[0])
        self.num_blocks = n_tokens // seq_len

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.load(self.path, mmap_mode="r")
        return self._tokens

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_blocks:
            raise IndexError(i)
        block = np.asarray(self.tokens[i * self.seq_len : (i + 1) * self.seq_len], dtype=np.int64)
        ids = torch.from_numpy(block)
        return {"input_ids": ids, "labels": ids.clone()}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tokens"] = None  # workers re-open the memory map
        return state


class StreamingPackedDataset(IterableDataset):
    """On-the-fly tokenization and packing of a streamed corpus.

    The stream of blocks (``seq_len`` tokens each, EOS after every document) is cut into
    global groups of ``batch_size * world_size`` blocks; only whole groups are used so every
    rank yields the same number of batches. Within a group, block ``j`` goes to rank
    ``j % world_size``; the rank's ``k``-th batch goes to DataLoader worker ``k % num_workers``
    (the DataLoader reads workers round-robin, so the batch order is preserved). Documents are
    shuffled with ``datasets``' buffer shuffle seeded by ``seed + epoch`` when ``shuffle``.
    ``skip_batches`` batches of this rank are skipped (resume).
    """

    def __init__(
        self,
        spec: CorpusSpec,
        tokenizer: PreTrainedTokenizerBase,
        seq_len: int,
        batch_size: int,
        *,
        split: str,
        val_fraction: float,
        seed: int,
        cache_dir: Path,
        max_documents: int | None,
        text_sample_by: str,
        shuffle: bool,
        shuffle_buffer: int,
        world_size: int = 1,
        rank: int = 0,
        epoch: int = 0,
        skip_batches: int = 0,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.split = split
        self.val_fraction = val_fraction
        self.seed = seed
        self.cache_dir = cache_dir
        self.max_documents = max_documents
        self.text_sample_by = text_sample_by
        self.shuffle = shuffle and split == "train"
        self.shuffle_buffer = shuffle_buffer
        self.world_size = world_size
        self.rank = rank
        self.epoch = epoch
        self.skip_batches = skip_batches

    def documents(self) -> Iterator[str]:
        """Texts of this split, in stream order."""
        ds = load_documents(self.spec, self.cache_dir, True, self.text_sample_by)
        if self.max_documents is not None:
            ds = ds.take(self.max_documents)
        if self.shuffle:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            ds.set_epoch(self.epoch)
        want_val = self.split == "val"
        for row in ds:
            text = row[self.spec.text_field]
            if not text or not text.strip():
                continue
            if self.spec.builder == "text":
                text = text.strip()
            if (split_fraction(text, self.seed) < self.val_fraction) == want_val:
                yield text

    def blocks(self) -> Iterator[np.ndarray]:
        """All ``seq_len`` blocks of the split (before rank/worker assignment)."""
        eos = self.tokenizer.eos_token_id
        buf: list[int] = []
        batch: list[str] = []

        def flush(texts: list[str]) -> Iterator[np.ndarray]:
            enc = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            for ids in enc:
                buf.extend(ids)
                buf.append(eos)
            while len(buf) >= self.seq_len:
                yield np.asarray(buf[: self.seq_len], dtype=np.int64)
                del buf[: self.seq_len]

        for text in self.documents():
            batch.append(text)
            if len(batch) == 256:
                yield from flush(batch)
                batch = []
        if batch:
            yield from flush(batch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        group = self.batch_size * self.world_size
        pending: list[np.ndarray] = []
        k = 0  # index of this rank's batch
        for block in self.blocks():
            pending.append(block)
            if len(pending) < group:
                continue
            mine = pending[self.rank :: self.world_size]
            pending = []
            if k >= self.skip_batches and k % n_workers == worker:
                for b in mine:
                    ids = torch.from_numpy(b)
                    yield {"input_ids": ids, "labels": ids.clone()}
            k += 1


class PretrainDataModule(ResumableDataModule):
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
        num_workers: DataLoader workers.
        seed: split key, shuffle seed (``seed + epoch``).
        cache_dir: cache root (default ``$QSPARSE_CACHE`` or ``./.cache/qsparse``).
        max_documents: keep only the first N documents (tiny runs, tests).
        streaming: read files lazily and pack on the fly (large inputs; no token cache).
        text_sample_by: for ``.txt`` files: a document is a ``"line"``, ``"paragraph"``
            (blank-line separated; default) or the whole ``"document"``.
        shuffle: shuffle training blocks every epoch.
        shuffle_buffer: document buffer for streaming shuffle.
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
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers, shuffle=shuffle)
        corpus = check_source(corpus, data_files, "wiki_en", seq_len, val_fraction, "train")
        if max_documents is not None and max_documents < 1:
            raise ValueError(f"max_documents must be >= 1 or null, got {max_documents!r}")
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(f"val_batch_size must be >= 1 or null, got {val_batch_size!r}")
        self.corpus = corpus
        self.data_files = data_files
        self.text_field = text_field
        self.tokenizer_spec = tokenizer
        self.bpe_vocab_size = vocab_size
        self.seq_len = seq_len
        self.val_fraction = float(val_fraction)
        self.cache_dir = resolve_cache_dir(cache_dir)
        self.max_documents = max_documents
        self.streaming = streaming
        self.text_sample_by = text_sample_by
        self.shuffle_buffer = shuffle_buffer
        self.val_batch_size = val_batch_size or batch_size
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.spec: CorpusSpec | None = None
        self.cache_path: Path | None = None
        self.num_train_tokens: int | None = None
        self.num_val_tokens: int | None = None
        self._train_dataset: PackedTokenBlocks | None = None
        self._val_dataset: PackedTokenBlocks | None = None
        self._meta: dict[str, Any] = {}
        self._epoch_from_last_batch = streaming

    # ----------------------------------------------------------------- build
    @property
    def vocab_size(self) -> int:
        """Number of token ids the model must embed (``len(tokenizer)``)."""
        return len(self._require_tokenizer())

    def _require_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            self.prepare_data()
        assert self.tokenizer is not None
        return self.tokenizer

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

    def _documents(self) -> Any:
        """Non-streaming dataset with columns ``text`` and ``_u`` (split key)."""
        assert self.spec is not None
        ds = load_documents(self.spec, self.cache_dir, False, self.text_sample_by)
        field = self.spec.text_field
        ds = ds.select_columns([field])
        if field != "text":
            ds = ds.rename_column(field, "text")
        fp = stable_hash("docs", self._split_key())
        if self.spec.builder == "text":
            # paragraphs of plain text files keep stray newlines at their edges
            ds = ds.map(
                lambda t: {"text": [x.strip() for x in t]},
                input_columns="text",
                batched=True,
                keep_in_memory=True,
                new_fingerprint=fp + "-strip",
            )
        ds = ds.filter(
            lambda t: [bool(x and x.strip()) for x in t],
            input_columns="text",
            batched=True,
            keep_in_memory=True,
            new_fingerprint=fp + "-nonempty",
        )
        if self.max_documents is not None:
            ds = ds.select(range(min(self.max_documents, len(ds))), keep_in_memory=True)
        seed = self.seed
        return ds.map(
            lambda t: {"_u": [split_fraction(x, seed) for x in t]},
            input_columns="text",
            batched=True,
            keep_in_memory=True,
            new_fingerprint=fp + "-u",
        )

    def _split(self, docs: Any) -> tuple[Any, Any]:
        f = self.val_fraction
        u = np.asarray(docs["_u"])
        is_val = u < f
        if f > 0 and not is_val.any():
            is_val[int(np.argmin(u))] = True
        if is_val.all():
            raise ValueError(
                f"val_fraction={f} leaves no training documents ({len(u)} documents); lower it "
                "or raise max_documents"
            )
        train_idx = np.flatnonzero(~is_val)
        val_idx = np.flatnonzero(is_val)
        return (
            docs.select(train_idx, keep_in_memory=True),
            docs.select(val_idx, keep_in_memory=True),
        )

    def prepare_data(self) -> None:
        """Resolve the corpus, get the tokenizer and build the token cache (idempotent)."""
        if self.spec is None:
            self.spec = resolve_corpus(
                self.corpus, self.data_files, self.text_field, self.cache_dir
            )
        if self.streaming:
            self._prepare_streaming()
            return
        if self.cache_path is not None and (self.cache_path / "meta.json").is_file():
            return
        docs_cache: dict[str, Any] = {}

        def split_docs() -> tuple[Any, Any]:
            if "split" not in docs_cache:
                docs_cache["split"] = self._split(self._documents())
            return docs_cache["split"]

        def train_texts() -> Iterable[str]:
            train, _ = split_docs()
            for batch in train.iter(batch_size=1000):
                yield from batch["text"]

        if self.tokenizer is None:
            self.tokenizer = resolve_tokenizer(
                self.tokenizer_spec,
                texts=train_texts,
                corpus_name=self.spec.name,
                key_parts=self._split_key(),
                vocab_size=self.bpe_vocab_size,
                cache_dir=self.cache_dir,
            )
        tok = self.tokenizer
        if tok.eos_token_id is None:
            raise ValueError(
                "tokenizer has no eos_token; documents are separated by EOS. Set "
                "tokenizer.eos_token (e.g. in tokenizer_config.json) or use the trained BPE"
            )
        key = stable_hash(
            CACHE_FORMAT_VERSION, "packed", self._split_key(), tokenizer_fingerprint(tok)
        )
        self.cache_path = self.cache_dir / "packed" / f"{self.spec.name}-{key}"
        if not (self.cache_path / "meta.json").is_file():
            train, val = split_docs()
            self._tokenize_to_cache(train, val, tok, self.cache_path)

    def _tokenize_to_cache(
        self, train: Any, val: Any, tok: PreTrainedTokenizerBase, out: Path
    ) -> None:
        out.mkdir(parents=True, exist_ok=True)
        dtype = np.uint16 if len(tok) <= np.iinfo(np.uint16).max + 1 else np.int32
        meta: dict[str, Any] = {"dtype": np.dtype(dtype).name, "vocab_size": len(tok)}
        for name, ds in (("train", train), ("val", val)):
            tokens = tokenize_and_concatenate(ds, tok, dtype, fingerprint=out.name + name)
            atomic_save_npy(out / f"{name}.npy", tokens)
            meta[f"{name}_documents"] = len(ds)
            meta[f"{name}_tokens"] = int(tokens.shape[0])
            if name == "train":
                counts = np.bincount(tokens, minlength=len(tok))
                meta["unigram_entropy"] = unigram_entropy_from_counts(counts)
        atomic_write_text(out / "meta.json", json.dumps(meta, indent=1))

    def _prepare_streaming(self) -> None:
        assert self.spec is not None
        if self.tokenizer is not None:
            return

        def train_texts() -> Iterable[str]:
            yield from self._streaming_dataset("train", 1, 0, 0, 0).documents()

        self.tokenizer = resolve_tokenizer(
            self.tokenizer_spec,
            texts=train_texts,
            corpus_name=self.spec.name,
            key_parts=self._split_key() + ["streaming"],
            vocab_size=self.bpe_vocab_size,
            cache_dir=self.cache_dir,
        )
        if self.tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos_token; documents are separated by EOS")

    def _streaming_dataset(
        self, split: str, world: int, rank: int, epoch: int, skip: int
    ) -> StreamingPackedDataset:
        assert self.spec is not None
        return StreamingPackedDataset(
            self.spec,
            self.tokenizer,  # type: ignore[arg-type]
            self.seq_len,
            self.batch_size if split == "train" else self.val_batch_size,
            split=split,
            val_fraction=self.val_fraction,
            seed=self.seed,
            cache_dir=self.cache_dir,
            max_documents=self.max_documents,
            text_sample_by=self.text_sample_by,
            shuffle=self.shuffle,
            shuffle_buffer=self.shuffle_buffer,
            world_size=world,
            rank=rank,
            epoch=epoch,
            skip_batches=skip,
        )

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
        """Training blocks per epoch (all ranks together)."""
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
        seen = 0
        ds = self._streaming_dataset("train", 1, 0, 0, 0)
        ds.shuffle = False
        for block in ds.blocks():
            counts += np.bincount(block, minlength=len(counts))
            seen += len(block)
            if seen >= max_tokens:
                break
        return unigram_entropy_from_counts(counts)

    # --------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        """Training batches ``{"input_ids", "labels"}: LongTensor[B, T]``, resumable."""
        if self.streaming:
            return self._streaming_loader(train=True)
        if self._train_dataset is None:
            self.setup("fit")
        assert self._train_dataset is not None
        return self._loader(self._train_dataset, True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in fixed order (sharded across ranks)."""
        if self.streaming:
            return self._streaming_loader(train=False)
        if self._val_dataset is None:
            self.setup("fit")
        assert self._val_dataset is not None
        return self._loader(self._val_dataset, False, self.val_batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Streaming mode without Lightning: start ``epoch`` on the next iteration.

        Under a Trainer the streaming epoch advances by itself after the last batch of an
        epoch; map-style loaders use their sampler's ``set_epoch`` (called by Lightning).
        """
        pos = self.position
        if pos.epoch != int(epoch):
            pos.epoch, pos.batches_consumed, pos.samples_consumed = int(epoch), 0, 0

    def _position_stream(self, ds: StreamingPackedDataset) -> None:
        """Point the streaming dataset at the current epoch and skip the consumed batches."""
        pos = self.position
        pos.global_batch_size = self._global_batch_size
        ds.epoch = pos.epoch
        ds.skip_batches = pos.batches_consumed

    def _streaming_loader(self, train: bool) -> DataLoader:
        self.prepare_data()
        world, rank = world_info(self.trainer)
        if train:
            self._global_batch_size = self.batch_size * world
            ds = self._streaming_dataset("train", world, rank, 0, 0)
            bs = self.batch_size
        else:
            ds = self._streaming_dataset("val", world, rank, 0, 0)
            bs = self.val_batch_size
        loader = ResumableDataLoader(ds, batch_size=bs, num_workers=self.num_workers)
        if train:
            loader._position = self.position
            loader._before_iter = lambda: self._position_stream(ds)
        return loader


def tokenize_and_concatenate(
    docs: Any, tokenizer: PreTrainedTokenizerBase, dtype: Any, fingerprint: str
) -> np.ndarray:
    """Tokenize a ``datasets`` split (column ``text``) with ``map(batched=True)``.

    Returns the flat array ``concat(ids(d_1) + [eos], ids(d_2) + [eos], ...)`` of ``dtype``.
    """
    eos = tokenizer.eos_token_id

    def encode(texts: list[str]) -> dict[str, Any]:
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for x in ids:
            x.append(eos)
        return {"input_ids": ids, "length": [len(x) for x in ids]}

    if len(docs) == 0:
        return np.zeros(0, dtype=dtype)
    tok_ds = docs.map(
        encode,
        input_columns="text",
        batched=True,
        batch_size=1000,
        remove_columns=docs.column_names,
        keep_in_memory=True,
        new_fingerprint=fingerprint,
    )
    total = int(np.sum(tok_ds["length"]))
    out = np.empty(total, dtype=dtype)
    pos = 0
    for batch in tok_ds.iter(batch_size=2048):
        for ids in batch["input_ids"]:
            out[pos : pos + len(ids)] = ids
            pos += len(ids)
    assert pos == total
    return out
