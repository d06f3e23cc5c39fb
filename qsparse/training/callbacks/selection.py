"""Checkpoint choice and early stopping that only look at the model at its target sparsity.

During a sparsity warm-up (:class:`~qsparse.training.sparsity_warmup.SparsityWarmup`) the
model validates at a fraction of its target ratio, so its validation losses are lower than any
the finished model can reach: Lightning's ``ModelCheckpoint(monitor=...)`` would keep such a
checkpoint as the best one (and the run would export weights trained for a lower sparsity,
set to the full one), and ``EarlyStopping`` would see the loss rise through the ramp and stop.
Measured on SmolLM2-135M at S = 0.5 with a 100-step ramp and validation every 50 steps: the
plain ``ModelCheckpoint`` chose step 49 (ramp at 49%, ``val_ood/loss`` 1.51; 1.75 at step
199, at the full ratio), and the export (step 49's weights at S = 0.5: ``val_ood/loss``
1.85) measured 1.240x dense held-out perplexity against 1.155x for the same recipe with the
usual 20-step ramp (docs/recovery.md).

Both classes take Lightning's own arguments and skip every validation that ran while a
``SparsityWarmup`` callback of the same trainer had not reached its target (fraction < 1);
without such a callback they are the Lightning classes unchanged.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from ..sparsity_warmup import SparsityWarmup

__all__ = ["WarmedUpCheckpoint", "WarmedUpEarlyStopping", "warmup_fraction_of"]


def warmup_fraction_of(trainer: L.Trainer) -> float:
    """The fraction of the target sparsity the trainer's ``SparsityWarmup`` has the model at
    (1.0 when the trainer has none): the value its last ``on_validation_start`` or
    ``on_train_batch_start`` set."""
    fractions = [cb.fraction for cb in trainer.callbacks if isinstance(cb, SparsityWarmup)]
    return min(fractions, default=1.0)


def _during_warmup(trainer: L.Trainer, what: str, monitor: str | None) -> bool:
    fraction = warmup_fraction_of(trainer)
    if fraction >= 1.0 or trainer.sanity_checking:
        return False
    rank_zero_info(
        f"{what}: the validation at step {trainer.global_step} ran inside the sparsity warm-up "
        f"({100 * fraction:.0f}% of the target ratio); {monitor} is not ranked"
    )
    return True


class WarmedUpCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``monitor`` ranks only validations at the target sparsity
    (module docstring); all arguments are Lightning's."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.monitor is not None and _during_warmup(trainer, "checkpoint", self.monitor):
            return
        super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.monitor is not None and warmup_fraction_of(trainer) < 1.0:
            return
        super().on_train_epoch_end(trainer, pl_module)


class WarmedUpEarlyStopping(EarlyStopping):
    """``EarlyStopping`` that starts counting (best score, patience) at the first validation
    at the target sparsity (module docstring); all arguments are Lightning's."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if _during_warmup(trainer, "early stopping", self.monitor):
            return
        super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if warmup_fraction_of(trainer) < 1.0:
            return
        super().on_train_epoch_end(trainer, pl_module)
