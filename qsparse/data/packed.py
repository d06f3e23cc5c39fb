"""The cached pretraining pipeline: documents -> one token array per split on disk -> blocks.

1. Documents (:mod:`qsparse.data.documents`) as a ``datasets`` Dataset (its Arrow cache under
   ``<cache>/hf_datasets``); ``max_documents`` keeps the first N (file order).
2. Train/validation split by document hash; if no document falls below ``val_fraction``
   (tiny runs) the one with the smallest key is used for validation.
3. ``datasets.map(batched=True)`` tokenizes, EOS is appended to every document, and the ids are
   concatenated into one ``uint16``/``int32`` array per split, saved (atomically) as
   ``<cache>/packed/<corpus>-<hash>/{train,val}.npy`` with a ``meta.json``; the hash covers
   the corpus files, split settings and tokenizer, so a second run memory-maps them and skips
   tokenization. ``seq_len`` is applied at load time (a view), so every block length reuses
   one cache. The concatenation is not the ``group_texts`` map of the ``datasets`` recipes,
   which stores one row per block of a fixed length: one flat array serves every ``seq_len``
   and is memory-mapped without Arrow.
4. Block ``i`` is ``tokens[i*T:(i+1)*T]`` (the tail shorter than ``T`` is dropped); items are
   ``{"input_ids": LongTensor[T], "labels": LongTensor[T]}`` with ``labels == input_ids``
   (the model shifts them). Order, sharding and resume: :mod:`qsparse.data.resumable`.

:class:`CachedPipeline` runs these steps for ``PretrainDataModule(streaming=False)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from ..cache import CACHE_FORMAT_VERSION, stable_hash
from ..io import atomic_save_npy, atomic_write_text
from .documents import load_documents, split_fraction
from .local_files import CorpusSpec
from .pretrain_pipeline import PretrainPipeline
from .tokenizer import tokenizer_fingerprint

if TYPE_CHECKING:
    from .pretrain import PretrainDataModule

__all__ = [
    "CachedPipeline",
    "PackedTokenBlocks",
    "build_token_cache",
    "documents_with_split_key",
    "split_documents",
    "tokenize_and_concatenate",
    "unigram_entropy_from_counts",
]


def unigram_entropy_from_counts(counts: np.ndarray) -> float:
    """``H = -sum_v p_v ln p_v`` (nats) with ``p_v = counts[v] / counts.sum()``."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError("unigram entropy of an empty token stream is undefined")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


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


def documents_with_split_key(
    spec: CorpusSpec,
    cache_dir: Path,
    text_sample_by: str,
    max_documents: int | None,
    seed: int,
    key: list[Any],
) -> Any:
    """Non-streaming dataset with columns ``text`` and ``_u`` (the split key of each document);
    ``key`` (the split settings) names the ``datasets`` fingerprints."""
    ds = load_documents(spec, cache_dir, False, text_sample_by, max_documents)
    fp = stable_hash("docs", key)
    return ds.map(
        lambda t: {"_u": [split_fraction(x, seed) for x in t]},
        input_columns="text",
        batched=True,
        keep_in_memory=True,
        new_fingerprint=fp + "-u",
    )


def split_documents(docs: Any, val_fraction: float) -> tuple[Any, Any]:
    """``(train, val)`` by the ``_u`` column (see the module docstring)."""
    f = val_fraction
    u = np.asarray(docs["_u"])
    is_val = u < f
    if f > 0 and not is_val.any():
        is_val[int(np.argmin(u))] = True
    if is_val.all():
        raise ValueError(
            f"val_fraction={f} leaves no training documents ({len(u)} documents); lower it "
            "or raise max_documents"
        )
    return (
        docs.select(np.flatnonzero(~is_val), keep_in_memory=True),
        docs.select(np.flatnonzero(is_val), keep_in_memory=True),
    )


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


def build_token_cache(
    train: Any, val: Any, tok: PreTrainedTokenizerBase, out: Path, tokenize: Any = None
) -> None:
    """Write ``out/{train,val}.npy`` and ``out/meta.json`` (token counts, dtype, the training
    stream's unigram entropy); ``meta.json`` last, so its presence marks a complete cache."""
    tokenize = tokenize or tokenize_and_concatenate
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if len(tok) <= np.iinfo(np.uint16).max + 1 else np.int32
    meta: dict[str, Any] = {"dtype": np.dtype(dtype).name, "vocab_size": len(tok)}
    for name, ds in (("train", train), ("val", val)):
        tokens = tokenize(ds, tok, dtype, fingerprint=out.name + name)
        atomic_save_npy(out / f"{name}.npy", tokens)
        meta[f"{name}_documents"] = len(ds)
        meta[f"{name}_tokens"] = int(tokens.shape[0])
        if name == "train":
            counts = np.bincount(tokens, minlength=len(tok))
            meta["unigram_entropy"] = unigram_entropy_from_counts(counts)
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=1))


class CachedPipeline(PretrainPipeline):
    """The cached pipeline (the module docstring) of a
    :class:`~qsparse.data.pretrain.PretrainDataModule` ``dm``.

    ``prepare`` trains or loads the tokenizer on the training split and writes the token cache
    (``dm.cache_path``, skipped when it exists); ``setup`` memory-maps it as
    ``dm._train_dataset`` / ``dm._val_dataset`` (:class:`PackedTokenBlocks`) and sets
    ``dm.num_train_tokens`` / ``dm.num_val_tokens``; the loaders are the DataModule's map-style
    resumable ones (training batches also carry ``sample_index``). ``meta``: the cache's
    ``meta.json`` (token and document counts, unigram entropy).
    """

    def __init__(self, dm: PretrainDataModule) -> None:
        super().__init__(dm)
        self.meta: dict[str, Any] = {}

    def prepare(self) -> None:
        dm = self.dm
        if dm.cache_path is not None and (dm.cache_path / "meta.json").is_file():
            return
        docs_cache: dict[str, Any] = {}

        def split_docs() -> tuple[Any, Any]:
            if "split" not in docs_cache:
                docs = documents_with_split_key(
                    dm.spec, dm.cache_dir, dm.text_sample_by, dm.max_documents, dm.seed,
                    self.split_key(),
                )  # fmt: skip
                docs_cache["split"] = split_documents(docs, dm.val_fraction)
            return docs_cache["split"]

        def train_texts() -> Iterable[str]:
            for batch in split_docs()[0].iter(batch_size=1000):
                yield from batch["text"]

        if dm.tokenizer is None:
            dm.tokenizer = self.resolve_tokenizer(train_texts)
        key = stable_hash(
            CACHE_FORMAT_VERSION, "packed", self.split_key(), tokenizer_fingerprint(dm.tokenizer)
        )
        dm.cache_path = dm.cache_dir / "packed" / f"{dm.spec.name}-{key}"
        if not (dm.cache_path / "meta.json").is_file():
            build_token_cache(*split_docs(), dm.tokenizer, dm.cache_path)

    def setup(self) -> None:
        dm = self.dm
        if dm._train_dataset is not None:
            return
        assert dm.cache_path is not None
        self.meta = json.loads((dm.cache_path / "meta.json").read_text())
        train = PackedTokenBlocks(dm.cache_path / "train.npy", dm.seq_len)
        val = PackedTokenBlocks(dm.cache_path / "val.npy", dm.seq_len)
        if len(train) == 0:
            raise ValueError(
                f"the training split has {self.meta['train_tokens']} tokens, fewer than "
                f"seq_len={dm.seq_len}; lower seq_len or raise max_documents"
            )
        if dm.val_fraction > 0 and len(val) == 0:
            raise ValueError(
                f"the validation split has {self.meta['val_tokens']} tokens, fewer than "
                f"seq_len={dm.seq_len}; raise val_fraction or max_documents, or lower seq_len"
            )
        dm._train_dataset, dm._val_dataset = train, val
        dm.num_train_tokens = len(train) * dm.seq_len
        dm.num_val_tokens = len(val) * dm.seq_len

    def train_loader(self) -> DataLoader:
        return self.dm._split_loader(train=True)

    def val_loader(self) -> DataLoader:
        return self.dm._split_loader(train=False)

    def num_train_blocks(self) -> int:
        return len(self.dm._train_set())

    def unigram_entropy(self, max_tokens: int) -> float:
        """Exact, over the whole training stream (stored in ``meta.json``; ``max_tokens`` is
        not needed)."""
        self.dm._train_set()  # setup reads meta.json
        return float(self.meta["unigram_entropy"])

    def state_dict(self) -> dict[str, Any]:
        """Nothing: the position alone says where the sampler resumes."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to read back (the DataModule restored the position)."""
