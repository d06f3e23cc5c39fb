"""Measured activation sparsity per site and overall, and activated parameters.

Keys: ``sparsity/<site>`` and ``sparsity/overall`` (fraction of zeros counted on all the
micro-batches of one optimizer step; overall = ``1 - activated / total`` parameters),
``params/activated`` and ``params/total``; over a validation epoch ``val/sparsity``
(overall) and ``val/activated_params``. The counting itself is :mod:`qsparse.stats`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch

from qsparse.nn.sites import sparsifiers
from qsparse.stats import (
    activated_parameters,
    measured_sparsity,
    total_parameters,
    track_sparsity,
)

from ._model import inner_model


class SparsityMonitor(L.Callback):
    """Every ``every_n_steps`` optimizer steps, count zeros at every sparsity site over the
    whole step (each of its ``accumulate_grad_batches`` micro-batches, also when a validation
    runs between two of them) and log the result once; during validation count over the
    whole epoch and log ``val/sparsity``. Counting
    adds a few reductions per site and is off otherwise. A model without sparsity sites
    (dense) logs nothing here.

    ``last`` / ``last_val`` hold the latest training / validation measurement.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        if every_n_steps < 1:
            raise ValueError(f"callbacks.sparsity.every_n_steps={every_n_steps} must be >= 1")
        self.every_n_steps = every_n_steps
        self._measuring_step: int | None = None  # the optimizer step being counted
        self._paused: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.last: dict[str, float] = {}
        self.last_val: dict[str, float] = {}

    @staticmethod
    def _has_sites(model: torch.nn.Module) -> bool:
        return bool(sparsifiers(model))

    def _collect(self, model: torch.nn.Module) -> dict[str, float]:
        out = {f"sparsity/{k}": v for k, v in measured_sparsity(model).items()}
        out["params/activated"] = float(activated_parameters(model, measured=True))
        out["params/total"] = float(total_parameters(model))
        return out

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._measuring_step is not None:  # a later micro-batch of the step being counted
            return
        model = inner_model(pl_module)
        if trainer.global_step % self.every_n_steps == 0 and self._has_sites(model):
            track_sparsity(model, True, reset=True)
            self._measuring_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, *_: Any
    ) -> None:
        # the optimizer step has run when global_step moved past the counted step; before
        # that, Lightning is still accumulating that step's micro-batches
        if self._measuring_step is None or trainer.global_step == self._measuring_step:
            return
        model = inner_model(pl_module)
        track_sparsity(model, False, reset=False)
        self._measuring_step = None
        metrics = self._collect(model)
        self.last = metrics
        bs = batch["input_ids"].shape[0] if isinstance(batch, Mapping) else 1
        for key, value in metrics.items():
            pl_module.log(key, value, on_step=True, on_epoch=False, batch_size=bs)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._measuring_step is not None:  # stopped inside a counted step
            track_sparsity(inner_model(pl_module), False, reset=False)
            self._measuring_step = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = inner_model(pl_module)
        if self._measuring_step is not None:
            # Lightning counts val_check_interval in batches, so validation can run between
            # two micro-batches of the step being counted: keep that step's counts aside
            self._paused = {
                name: (sp.zeros_seen.clone(), sp.values_seen.clone())
                for name, sp in sparsifiers(model).items()
            }
        if self._has_sites(model):
            track_sparsity(model, True, reset=True)

    def _resume_training_count(self, model: torch.nn.Module) -> None:
        if self._paused is None:
            return
        for name, sp in sparsifiers(model).items():
            zeros, values = self._paused[name]
            sp.zeros_seen.copy_(zeros)
            sp.values_seen.copy_(values)
        track_sparsity(model, True, reset=False)
        self._paused = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = inner_model(pl_module)
        if not self._has_sites(model):
            return
        track_sparsity(model, False, reset=False)
        if not trainer.sanity_checking:
            measured = measured_sparsity(model)
            self.last_val = {
                "val/sparsity": measured["overall"],
                "val/activated_params": float(activated_parameters(model, measured=True)),
                **{f"val_sparsity/{k}": v for k, v in measured.items() if k != "overall"},
            }
            pl_module.log("val/sparsity", measured["overall"], sync_dist=True)
            activated = self.last_val["val/activated_params"]
            pl_module.log("val/activated_params", activated, sync_dist=True)
        self._resume_training_count(model)
