"""Pretraining on a weighted mixture of corpora, validated in and out of domain.

:class:`MixtureDataModule` packs every source with :class:`~qsparse.data.pretrain.
PretrainDataModule` (its own token cache, document-hash train/val split, one shared
tokenizer) and mixes the training blocks by weight:

* With ``n_i`` training blocks in source ``i`` and weights normalised to ``p_i``, an epoch has
  ``N = sum_i n_i`` blocks, of which ``c_i = round(p_i N)`` (largest remainders, so
  ``sum c_i = N``) come from source ``i``: its blocks in an order drawn from
  ``numpy.random.default_rng([shuffle_seed, i])``, repeated when ``c_i > n_i`` (up-sampling) and cut
  when ``c_i < n_i``. The list is fixed, so the resumable sampler's exact resume holds.
* ``val`` (logged ``val/loss``, ``val/ppl``): every source's validation split, concatenated.
* ``ood`` (logged ``val_ood/loss``, ``val_ood/ppl``): sources never trained on, read whole
  (``val_fraction = 0``), their first ``ood_val_tokens`` tokens each. A source in both lists
  is refused: out-of-domain text must be a whole held-out source, not a slice of a training
  corpus.

Sources are registered corpus names (:func:`qsparse.data.corpora.available_corpora`) or local
file paths, as for ``data=wiki``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from transformers import PreTrainedTokenizerBase

from .packed import PackedTokenBlocks
from .pretrain import PretrainDataModule
from .resumable import ResumableDataModule

__all__ = ["MixedBlocks", "MixtureDataModule", "mixture_counts"]


def mixture_counts(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Blocks per source in one epoch: ``round(p_i * sum(sizes))`` by largest remainders.

    Args:
        sizes: training blocks of each source (``n_i >= 1``).
        weights: non-negative weights, not all zero (normalised here).
    """
    w = np.asarray(weights, dtype=np.float64)
    total = int(sum(sizes))
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:short]] += 1
    return [int(c) for c in counts]


class MixedBlocks(Dataset):
    """Map-style dataset over several block datasets with fixed per-source counts.

    Item ``j`` is block ``index[j]`` of source ``source[j]``; see the module docstring for
    how the counts and orders are drawn.
    """

    def __init__(self, parts: Sequence[Dataset], weights: Sequence[float], seed: int) -> None:
        self.parts = list(parts)
        sizes = [len(p) for p in self.parts]  # type: ignore[arg-type]
        counts = mixture_counts(sizes, weights)
        sources, indices = [], []
        for i, (n, c) in enumerate(zip(sizes, counts, strict=True)):
            if c == 0:
                continue
            order = np.random.default_rng([seed, i]).permutation(n)
            reps = -(-c // n)
            indices.append(np.tile(order, reps)[:c])
            sources.append(np.full(c, i, dtype=np.int64))
        self.source = np.concatenate(sources)
        self.index = np.concatenate(indices)
        self.counts = counts

    def __len__(self) -> int:
        return int(self.source.shape[0])

    def __getitem__(self, j: int) -> Any:
        return self.parts[int(self.source[j])][int(self.index[j])]


class MixtureDataModule(ResumableDataModule):
    """Weighted mixture of corpora for training; in-domain and out-of-domain validation.

    Args:
        sources: ``{corpus name or file path: weight}`` (weights >= 0, not all 0).
        ood_val: corpus names or files evaluated as a whole, never trained on (may be empty).
        ood_val_tokens: tokens read from each ``ood_val`` source (a multiple of ``seq_len``
            is used).
        tokenizer: local tokenizer folder (or object); ``None`` trains a BPE on the first
            source and uses it for all.
        text_field, vocab_size, seq_len, batch_size, val_fraction, num_workers, seed,
            cache_dir, max_documents, text_sample_by, shuffle, val_batch_size: as for
            :class:`~qsparse.data.pretrain.PretrainDataModule`, applied to every source.
        shuffle_seed: the blocks drawn from each source and the shuffle (``None``: ``seed``,
            which keys every source's split).

    Attributes: ``val_set_names`` = ``["val"]`` or ``["val", "val_ood"]``: the metric prefix
    of each validation loader, read by :class:`~qsparse.training.LMModule`.
    """

    def __init__(
        self,
        sources: Mapping[str, float],
        ood_val: Sequence[str] = (),
        ood_val_tokens: int = 65_536,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        text_field: str | None = None,
        vocab_size: int = 4096,
        seq_len: int = 256,
        batch_size: int = 8,
        val_fraction: float = 0.01,
        num_workers: int = 0,
        seed: int = 1234,
        cache_dir: str | None = None,
        max_documents: int | None = None,
        text_sample_by: str = "paragraph",
        shuffle: bool = True,
        val_batch_size: int | None = None,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__(batch_size, seed, num_workers, shuffle, val_batch_size, shuffle_seed)
        if not isinstance(sources, Mapping) or not sources:
            raise ValueError(
                "data.sources must map corpus names or files to weights, e.g. "
                "data.sources='{wiki_en: 0.7, kjv: 0.3}'"
            )
        for name, w in sources.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
                raise ValueError(f"data.sources.{name}={w!r}: a weight must be a number >= 0")
        if sum(sources.values()) <= 0:
            raise ValueError("data.sources: the weights sum to 0; give one weight > 0")
        ood_val = [ood_val] if isinstance(ood_val, str) else list(ood_val or [])
        both = sorted(set(ood_val) & set(sources))
        if both:
            raise ValueError(
                f"data.ood_val {both} is also in data.sources: out-of-domain validation needs "
                "a source the run never trains on; remove it from one of the two"
            )
        if not isinstance(ood_val_tokens, int) or ood_val_tokens < seq_len:
            raise ValueError(
                f"data.ood_val_tokens={ood_val_tokens!r} must be an int >= seq_len={seq_len}"
            )
        self.sources = {str(k): float(v) for k, v in sources.items()}
        self.ood_val = ood_val
        self.ood_val_tokens = ood_val_tokens
        self.seq_len = seq_len
        common = dict(
            text_field=text_field,
            vocab_size=vocab_size,
            seq_len=seq_len,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            cache_dir=cache_dir,
            max_documents=max_documents,
            text_sample_by=text_sample_by,
            shuffle=shuffle,
            val_batch_size=val_batch_size,
        )
        names = list(self.sources)
        self._parts = [
            PretrainDataModule(
                **_source_arg(s),
                tokenizer=tokenizer if i == 0 else None,
                val_fraction=val_fraction,
                **common,
            )
            for i, s in enumerate(names)
        ]
        self._ood = [
            PretrainDataModule(**_source_arg(s), val_fraction=0.0, **common) for s in ood_val
        ]
        self.val_set_names = ["val", "val_ood"] if self._ood else ["val"]
        self._train_dataset: MixedBlocks | None = None
        self._val_datasets: list[Dataset] | None = None

    # ----------------------------------------------------------------- build
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self._parts[0].tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model must embed (``len(tokenizer)``)."""
        return self._parts[0].vocab_size

    def prepare_data(self) -> None:
        """Build every source's token cache with one tokenizer (idempotent)."""
        first = self._parts[0]
        first.prepare_data()
        for dm in self._parts[1:] + self._ood:
            if dm.tokenizer is None:
                dm.tokenizer = first.tokenizer
            dm.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()
        if self._train_dataset is not None:
            return
        for dm in self._parts + self._ood:
            dm.setup(stage)
        self._train_dataset = MixedBlocks(
            [dm._train_dataset for dm in self._parts],
            list(self.sources.values()),
            self.shuffle_seed,
        )
        vals: list[Dataset] = [ConcatDataset([dm._val_dataset for dm in self._parts])]
        if self._ood:
            blocks = max(1, self.ood_val_tokens // self.seq_len)
            ood: list[PackedTokenBlocks] = [dm._train_dataset for dm in self._ood]
            vals.append(ConcatDataset([Subset(d, range(min(blocks, len(d)))) for d in ood]))
        self._val_datasets = vals

    @property
    def num_train_blocks(self) -> int:
        return len(self._train_set())

    def unigram_entropy(self) -> float:
        """Unigram entropy (nats) of the first source's training tokens."""
        return self._parts[0].unigram_entropy()

    def mixture_table(self) -> list[dict[str, Any]]:
        """Per source: weight, training blocks available and blocks drawn per epoch."""
        counts = self._train_set().counts
        return [
            {"source": s, "weight": w, "blocks": len(dm._train_dataset), "per_epoch": c}
            for (s, w), dm, c in zip(self.sources.items(), self._parts, counts, strict=True)
        ]

    # --------------------------------------------------------------- loaders
    def train_dataloader(self) -> DataLoader:
        return self._loader(self._train_set(), True, self.batch_size)

    def val_dataloader(self) -> list[DataLoader]:
        """``[in-domain, out-of-domain]`` (the second only with ``ood_val``)."""
        self._train_set()  # setup builds the validation sets with it
        assert self._val_datasets is not None
        return [self._loader(d, False, self.val_batch_size) for d in self._val_datasets]


def _source_arg(source: str) -> dict[str, Any]:
    """``corpus=`` for a registered name, ``data_files=`` for anything else (a path)."""
    from .corpora import available_corpora

    if source in available_corpora():
        return {"corpus": source, "data_files": None}
    return {"corpus": None, "data_files": source}
