"""Sparsity warm-up: ramp every site's ratio from 0 to its target over the first N steps.

Continued training of a dense checkpoint (Q-Sparse §4.3) can switch the top-k on at once or
ease it in. With ``steps = N`` and ``g`` = optimizer steps done (``trainer.global_step``)::

    fraction(g) = min(1, g / N)                              (linear)
    fraction(g) = 0.5 * (1 - cos(pi * min(1, g / N)))        (cosine)
    S_site(g)   = fraction(g) * S_site_target

The value is recomputed from ``global_step`` before every training batch (and before
validation), so a resumed run continues exactly where it stopped: nothing about the ramp is
stored besides the step counter Lightning already checkpoints.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from ..nn.sites import set_sparsity_ratio, sparsifiers

SCHEDULES = ("linear", "cosine")


def warmup_fraction(step: int, steps: int, schedule: str = "linear") -> float:
    """Fraction in [0, 1] of the target sparsity after ``step`` optimizer steps (module doc)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"sparsity_warmup.schedule={schedule!r} must be one of {SCHEDULES}")
    if steps <= 0:
        return 1.0
    progress = min(1.0, max(0.0, step / steps))
    if schedule == "linear":
        return progress
    return 0.5 * (1.0 - math.cos(math.pi * progress))


class SparsityWarmup(L.Callback):
    """Lightning callback ramping the top-k sparsity ratio 0 -> target over ``steps`` steps.

    Args:
        steps: N, optimizer steps of the ramp (0 disables it: the target from step 0).
        schedule: ``"linear"`` or ``"cosine"`` (see the module docstring).
        log: log ``sparsity/warmup_fraction`` and ``sparsity/ratio`` (mean ratio over sites)
            every training step.

    The targets are the ratios :func:`qsparse.sparsify` configured (each sparsifier's
    ``target_ratio``), so per-site overrides ramp proportionally.
    """

    def __init__(self, steps: int = 0, schedule: str = "linear", log: bool = True) -> None:
        super().__init__()
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(
                f"sparsity_warmup.steps={steps!r} must be an integer >= 0 (0 = no warm-up)"
            )
        if schedule not in SCHEDULES:
            raise ValueError(f"sparsity_warmup.schedule={schedule!r} must be one of {SCHEDULES}")
        self.steps = steps
        self.schedule = schedule
        self.log = log
        self.fraction = 1.0 if steps == 0 else 0.0

    # -- helpers ---------------------------------------------------------------------------

    def _apply(self, trainer: L.Trainer, pl_module: nn.Module) -> float:
        self.fraction = warmup_fraction(trainer.global_step, self.steps, self.schedule)
        set_sparsity_ratio(pl_module, fraction=self.fraction)
        return self.fraction

    @staticmethod
    def _mean_ratio(pl_module: nn.Module) -> float:
        sites = list(sparsifiers(pl_module).values())
        return sum(sp.ratio for sp in sites) / len(sites) if sites else 0.0

    # -- Lightning hooks -------------------------------------------------------------------

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not sparsifiers(pl_module):
            raise ValueError(
                "callbacks.sparsity_warmup is set but the model has no sparsity sites; "
                "apply qsparse.sparsify (sparsity.ratio > 0) or remove the callback"
            )
        self._apply(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._apply(trainer, pl_module)
        if self.log:
            pl_module.log("sparsity/warmup_fraction", self.fraction, on_step=True, on_epoch=False)
            pl_module.log(
                "sparsity/ratio", self._mean_ratio(pl_module), on_step=True, on_epoch=False
            )

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # inside fit, validate at the ratio training is at; a later trainer.validate() uses
        # the target the model was left at by on_train_end
        if trainer.state.fn == TrainerFn.FITTING:
            self._apply(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the trained model (and what gets exported) runs at the target sparsity, which is
        # what its qsparse settings record; say so if the ramp had not finished
        if self.fraction < 1.0:
            warnings.warn(
                f"training ended at step {trainer.global_step}, inside the sparsity warm-up "
                f"({self.steps} steps, {100 * self.fraction:.0f}% of the target reached); the "
                "model is set to its full target sparsity now, as its settings record",
                stacklevel=2,
            )
        set_sparsity_ratio(pl_module, fraction=1.0)
        self.fraction = 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "schedule": self.schedule}
