"""Training progress counted in optimizer steps of the whole run.

Lightning's bars count batches of the current epoch: a ``max_steps`` run over an endless or
resumed stream shows ``Epoch 0/-2`` (``max_epochs=-1``) and, after a resume at step 120 of a
59-batch epoch, ``120/59``. :class:`StepProgressBar` shows ``train steps 120/200`` instead:
the step the run is at (restored from the checkpoint) out of ``trainer.max_steps``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """A ``TQDMProgressBar`` whose training bar is ``global_step / max_steps`` (it falls back
    to Lightning's per-epoch batches when ``max_steps`` is not set)."""

    DESCRIPTION = "train steps"

    @staticmethod
    def _by_steps(trainer: L.Trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        if self._by_steps(self.trainer):
            return self.trainer.max_steps
        return super().total_train_batches

    def _show_step(self, trainer: L.Trainer) -> None:
        bar = self.train_progress_bar
        bar.set_description(self.DESCRIPTION, refresh=False)
        bar.total = trainer.max_steps
        bar.initial = trainer.global_step  # a resumed run starts where it stopped
        bar.n = trainer.global_step
        bar.refresh()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a run resumed mid-epoch gets no on_train_epoch_start: set the bar up here too
        super().on_train_start(trainer, pl_module)
        if self._by_steps(trainer):
            self._show_step(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        if self._by_steps(trainer):
            self._show_step(trainer)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._by_steps(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is not None and not bar.disable and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()
