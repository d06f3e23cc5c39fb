"""Exact-resume machinery shared by the pretraining and SFT DataModules.

The position in the training stream is a :class:`DataPosition`: the epoch and how many
batches of it the *training loop has processed*. It is counted in the DataModule's
``on_before_batch_transfer`` hook, which Lightning calls once per batch right before the
training step (the one-batch prefetch of Lightning's data fetcher happens earlier and is not
counted), and only while the trainer is training (not during validation or the sanity check).
Lightning stores ``DataModule.state_dict()`` in every checkpoint and calls
``load_state_dict`` before it asks for ``train_dataloader()``, so the next epoch iterator
starts exactly after the last processed batch.

Order of samples: :class:`ResumableSampler` draws a permutation of all samples from
``torch.Generator().manual_seed(seed + epoch)`` (or the identity without shuffle), keeps the
first ``floor(N / (B*W)) * B*W`` of them (``B`` per-rank batch size, ``W`` world size), and
gives rank ``r`` the positions ``r, r+W, r+2W, ...`` of what remains after the
``samples_consumed`` already used. A global batch ``g`` is therefore always the same ``B*W``
samples, whichever process order or restart produced it. It subclasses
``DistributedSampler`` so Lightning's automatic sampler replacement (``use_distributed_sampler``)
leaves it alone; ``use_distributed_sampler=False`` is not required but is harmless.

Streaming (iterable) loaders have no sampler: the dataset is positioned when the loader's
``__iter__`` starts an epoch (:mod:`qsparse.data.streaming`), and the position moves to
``(epoch + 1, 0)`` when Lightning flags the last batch of an epoch, so a checkpoint taken on
that batch resumes at the start of the next epoch.

Sample identity: every map-style training batch carries ``sample_index`` LongTensor[B], the
dataset index of each row (:class:`IndexedSamples`). It names the sample whatever the epoch,
rank, accumulation step or restart that drew it (the teacher logits stored on disk for
distillation are keyed by it: :mod:`qsparse.training.teacher_store`). Streaming loaders
have no such index.

Outside Lightning (a hand-written loop), call :meth:`ResumableDataModule.advance` after each
training batch instead (and the sampler's ``set_epoch``, or ``PretrainDataModule.set_epoch``
when streaming, at each new epoch).

Constraint for the training stack: the LightningModule must not override
``on_before_batch_transfer`` (Lightning would call the module's hook instead of the
DataModule's, and batches would not be counted).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from torch.utils.data.distributed import DistributedSampler

from .checks import check_loader_args, check_positive_or_none, check_seeds

__all__ = [
    "DataPosition",
    "IndexedSamples",
    "ResumableDataLoader",
    "ResumableDataModule",
    "ResumableSampler",
    "world_info",
]


@dataclass
class DataPosition:
    """Where the training stream stands.

    Attributes:
        epoch: epoch of the batches being consumed.
        batches_consumed: training batches processed by this rank in ``epoch``.
        samples_consumed: samples of ``epoch`` processed by all ranks together
            (``batches_consumed * global_batch_size`` when the layout did not change).
        global_batch_size: per-rank batch size times world size when last counted.
    """

    epoch: int = 0
    batches_consumed: int = 0
    samples_consumed: int = 0
    global_batch_size: int = 0


class ResumableSampler(DistributedSampler):
    """Deterministic, rank-sharded, resumable sample order (see the module docstring).

    Args:
        num_samples_total: dataset length ``N``.
        batch_size: per-rank batch size ``B``.
        position: shared :class:`DataPosition`; read when an epoch iterator starts, and
            reset to ``(epoch, 0)`` when a new epoch begins. ``None`` for evaluation loaders.
        shuffle: permute per epoch with seed ``seed + epoch``.
        seed: base seed.
        num_replicas, rank: world size and this process's rank.
        drop_last: training mode: keep only whole global batches (every rank gets the same
            number of batches). ``False`` (evaluation): pad by wrapping around to a multiple
            of ``num_replicas`` as ``DistributedSampler`` does, so ranks stay in step.

    ``len(sampler)`` is the number of samples this rank yields in a *full* epoch, even when
    resuming mid-epoch (Lightning adds its restored batch count to what it fetches).
    """

    def __init__(
        self,
        num_samples_total: int,
        batch_size: int,
        position: DataPosition | None = None,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = True,
    ) -> None:
        # DistributedSampler.__init__ insists on an initialised process group when
        # num_replicas/rank are None; set its public attributes ourselves instead.
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid rank {rank} for num_replicas={num_replicas}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = None
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.n = int(num_samples_total)
        self.batch_size = batch_size
        self.position = position
        self.global_batch_size = batch_size * num_replicas
        if drop_last:
            self.total_size = (self.n // self.global_batch_size) * self.global_batch_size
        else:
            self.total_size = math.ceil(self.n / num_replicas) * num_replicas if self.n else 0
        self.num_samples = self.total_size // num_replicas
        self.epoch = 0
        if position is not None:
            self.epoch = position.epoch
            if self.total_size and position.samples_consumed >= self.total_size:
                self.epoch = position.epoch + 1

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every training epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """All ``total_size`` global sample indices of ``epoch`` in consumption order."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        if self.drop_last:
            return order[: self.total_size]
        pad = self.total_size - self.n
        if pad > 0:
            order = torch.cat([order, order[:pad].repeat(math.ceil(pad / max(self.n, 1)))[:pad]])
        return order

    def __iter__(self) -> Iterator[int]:
        start = 0
        pos = self.position
        if pos is not None:
            if pos.epoch != self.epoch:
                pos.epoch = self.epoch
                pos.batches_consumed = 0
                pos.samples_consumed = 0
            start = min(pos.samples_consumed, self.total_size)
            pos.global_batch_size = self.global_batch_size
        order = self.epoch_order(self.epoch)[start:]
        return iter(order[self.rank :: self.num_replicas].tolist())


class IndexedSamples(Dataset):
    """``dataset`` whose item ``i`` is ``(i, dataset[i])``; batched by :class:`IndexedCollate`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return int(i), self.dataset[i]


class IndexedCollate:
    """Collate ``(i, item)`` pairs: ``collate_fn`` (default: torch's) of the items, plus
    ``sample_index`` LongTensor[B] of the ``i``."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None = None) -> None:
        self.collate_fn = collate_fn or default_collate

    def __call__(self, pairs: list[tuple[int, Any]]) -> dict[str, Any]:
        batch = self.collate_fn([item for _, item in pairs])
        batch["sample_index"] = torch.tensor([i for i, _ in pairs], dtype=torch.long)
        return batch


class ResumableDataLoader(DataLoader):
    """DataLoader that reports the DataModule's training position as its own state.

    Lightning treats loaders with ``state_dict``/``load_state_dict`` as resumable (and then
    does not warn about mid-epoch checkpoints). The authoritative state is the DataModule's
    (restored before ``train_dataloader()`` builds this loader and its sampler), so
    ``load_state_dict`` has nothing left to do.
    """

    _position: DataPosition | None = None

    def state_dict(self) -> dict[str, Any]:
        """A copy of the DataModule position (``{}`` for evaluation loaders)."""
        return asdict(self._position) if self._position is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """No-op: the DataModule's ``load_state_dict`` already positioned the sampler."""


def _is_last_batch(trainer: pl.Trainer) -> bool:
    """Lightning's flag (set before ``on_before_batch_transfer``) that this batch ends the epoch."""
    progress = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "batch_progress", None)
    return bool(getattr(progress, "is_last_batch", False))


def world_info(trainer: pl.Trainer | None) -> tuple[int, int]:
    """``(world_size, global_rank)`` from the attached trainer, else torch.distributed, else (1, 0)."""
    if trainer is not None:
        return int(trainer.world_size), int(trainer.global_rank)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class ResumableDataModule(pl.LightningDataModule):
    """Base class: exact-resume state, counting hook and loader construction.

    Subclasses build ``self._train_dataset`` / ``self._val_dataset`` (map-style) in ``setup``
    (:meth:`_train_set` runs it when something asks for the data first) and build their
    loaders with :meth:`_loader`.
    ``batch_size``/``val_batch_size`` (default ``batch_size``): per-rank training/evaluation
    batch sizes; ``seed``: the data's own seed (subclasses key their train/validation split
    on it); ``shuffle_seed``: base of the per-epoch shuffle (``None``: ``seed``; the configs
    pass the run's top-level ``seed``, so ``seed=N`` changes the order and never the split);
    ``num_workers``: DataLoader workers.
    """

    def __init__(
        self,
        batch_size: int,
        seed: int,
        num_workers: int,
        shuffle: bool = True,
        val_batch_size: int | None = None,
        shuffle_seed: int | None = None,
    ) -> None:
        super().__init__()
        check_loader_args(batch_size, num_workers)
        check_positive_or_none("val_batch_size", val_batch_size)
        check_seeds(seed, shuffle_seed)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.seed = int(seed)
        self.shuffle_seed = self.seed if shuffle_seed is None else int(shuffle_seed)
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.position = DataPosition()
        self._global_batch_size = batch_size

    # A subclass's ``setup`` sets it (and whatever else it builds with it).
    _train_dataset: Any = None

    def _train_set(self) -> Any:
        """The training dataset, running ``setup("fit")`` first when it is not built yet (a
        loader or a size asked before Lightning called ``setup``)."""
        if self._train_dataset is None:
            self.setup("fit")
        assert self._train_dataset is not None
        return self._train_dataset

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "batches_consumed", "samples_consumed", "global_batch_size"}``."""
        return asdict(self.position)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position; the next ``train_dataloader()`` continues right after it."""
        missing = [k for k in ("epoch", "batches_consumed") if k not in state_dict]
        if missing:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: missing keys {missing}; expected the "
                "dict returned by state_dict()"
            )
        pos = self.position  # updated in place: loaders already built keep seeing it
        pos.epoch = int(state_dict["epoch"])
        pos.batches_consumed = int(state_dict["batches_consumed"])
        pos.global_batch_size = int(state_dict.get("global_batch_size", 0))
        pos.samples_consumed = int(
            state_dict.get(
                "samples_consumed",
                pos.batches_consumed * (pos.global_batch_size or self.batch_size),
            )
        )

    def advance(self, num_batches: int = 1) -> None:
        """Record ``num_batches`` processed training batches (for loops without Lightning)."""
        self.position.batches_consumed += num_batches
        self.position.samples_consumed += num_batches * self._global_batch_size
        self.position.global_batch_size = self._global_batch_size

    # Iterable (streaming) loaders have no sampler for Lightning to call set_epoch on; their
    # epoch is the position's, moved on when Lightning flags the last batch of an epoch.
    _epoch_from_last_batch = False

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count training batches as Lightning hands them to the training step."""
        trainer = self.trainer
        if trainer is not None and trainer.training and not trainer.sanity_checking:
            self.advance(1)
            if self._epoch_from_last_batch and _is_last_batch(trainer):
                pos = self.position
                pos.epoch, pos.batches_consumed, pos.samples_consumed = pos.epoch + 1, 0, 0
        return batch

    # ---------------------------------------------------------------- loaders
    def _make_sampler(self, n: int, train: bool, batch_size: int) -> ResumableSampler:
        world, rank = world_info(self.trainer)
        if train:
            gbs = batch_size * world
            pos = self.position
            if pos.global_batch_size and pos.global_batch_size != gbs:
                warnings.warn(
                    f"resuming with global batch size {gbs} (saved: {pos.global_batch_size}); "
                    "the data continues after the same number of samples, but Lightning's "
                    "per-epoch batch count was recorded in the old layout",
                    stacklevel=2,
                )
            if n < gbs:
                raise ValueError(
                    f"the training split has {n} samples, fewer than one global batch "
                    f"({batch_size} x {world} ranks); lower batch_size or seq_len, or use more data"
                )
            self._global_batch_size = gbs
            return ResumableSampler(
                n,
                batch_size,
                self.position,
                shuffle=self.shuffle,
                seed=self.shuffle_seed,
                num_replicas=world,
                rank=rank,
                drop_last=True,
            )
        return ResumableSampler(
            n, batch_size, None, shuffle=False, num_replicas=world, rank=rank, drop_last=False
        )

    def _loader(
        self,
        dataset: Dataset,
        train: bool,
        batch_size: int,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> DataLoader:
        sampler = self._make_sampler(len(dataset), train, batch_size)  # type: ignore[arg-type]
        if train:  # batches name their samples (the module docstring)
            dataset, collate_fn = IndexedSamples(dataset), IndexedCollate(collate_fn)
        loader = ResumableDataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_fn,
            pin_memory=torch.cuda.is_available(),
        )
        if train:
            loader._position = self.position
        return loader
