"""Random-token data for throughput benchmarks and plumbing tests (``data=random``).

Every sample is ``seq_len`` tokens drawn uniformly from ``[0, vocab_size)`` by a generator
seeded with ``(seed, split, index)``, so sample ``i`` is the same on every run, rank and
resume. Batches follow the training contract: ``input_ids`` LongTensor[B, T] and ``labels``
(a copy: the model shifts). A model that learned nothing has loss ``ln(vocab_size)``.
Resumption (order, position) is :class:`qsparse.data.resumable.ResumableDataModule`'s.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from qsparse.data.resumable import ResumableDataModule


class RandomTokens(Dataset):
    """``num_samples`` deterministic random sequences of ``seq_len`` tokens."""

    def __init__(self, num_samples: int, seq_len: int, vocab_size: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        ids = torch.randint(0, self.vocab_size, (self.seq_len,), generator=g)
        return {"input_ids": ids, "labels": ids.clone()}


class RandomTokenDataModule(ResumableDataModule):
    """Uniform random tokens with an exactly resumable, rank-sharded order.

    Args:
        vocab_size: V, token ids are in [0, V).
        seq_len: T, tokens per sample.
        batch_size: B, samples per micro-batch (per rank).
        num_train: training samples per epoch; ``num_val``: validation samples.
        seed: data seed (independent of the model seed).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        vocab_size: int = 32000,
        seq_len: int = 2048,
        batch_size: int = 8,
        num_train: int = 4096,
        num_val: int = 64,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        for name, value in (
            ("vocab_size", vocab_size),
            ("seq_len", seq_len),
            ("batch_size", batch_size),
            ("num_train", num_train),
            ("num_val", num_val),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name}={value!r} must be an int >= 1")
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers)
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.num_train = num_train
        self.num_val = num_val
        self.tokenizer = None

    def train_dataloader(self) -> DataLoader:
        ds = RandomTokens(self.num_train, self.seq_len, self.vocab_size, self.seed)
        return self._loader(ds, True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        ds = RandomTokens(self.num_val, self.seq_len, self.vocab_size, self.seed + 1)
        return self._loader(ds, False, self.batch_size)
