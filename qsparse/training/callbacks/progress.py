"""Training progress counted in optimizer steps of the whole run.

Lightning's bar counts the batches of the current epoch and is titled by it: a ``max_steps``
run over an endless or resumed stream shows ``Epoch 0`` (``Epoch 0/-2`` with
``max_epochs=-1`` in the rich bar) and, after a resume at step 120 of a 59-batch epoch,
``120/59``. :class:`StepProgressBar` shows one bar for the run instead, ``train steps
120/200``: the step the run is at (restored from the checkpoint) out of
``trainer.max_steps``, created with that total so no other title is ever printed, with
the logged metrics after it (not the logger's version number). The training driver puts it
first among the callbacks, so that it closes before the run summary prints.
"""

from __future__ import annotations

import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class StepProgressBar(TQDMProgressBar):
    """A ``TQDMProgressBar`` whose training bar is ``global_step / max_steps`` over the whole
    run, across epochs (Lightning's per-epoch bar when ``max_steps`` is not set)."""

    DESCRIPTION = "train steps"

    @staticmethod
    def _by_steps(trainer: L.Trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        if self._by_steps(self.trainer):
            return self.trainer.max_steps
        return super().total_train_batches

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The logged progress-bar metrics, without Lightning's logger version (``v_num``)."""
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def init_train_tqdm(self) -> Tqdm:
        if not self._by_steps(self.trainer):
            return super().init_train_tqdm()
        step = self.trainer.global_step  # a resumed run starts where it stopped
        return Tqdm(
            desc=self.DESCRIPTION,
            total=self.trainer.max_steps,
            initial=step,
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if not self._by_steps(trainer):  # by steps: the bar made at train start runs on
            super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if not self._by_steps(trainer):
            super().on_train_batch_end(trainer, module, *args)
            return
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is not None and not bar.disable and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, module))
            bar.refresh()
