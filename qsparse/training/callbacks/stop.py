"""Stopping a run at a given step, gracefully or as a simulated crash (resume tests)."""

from __future__ import annotations

from typing import Any

import lightning as L


class SimulatedCrash(RuntimeError):
    """Raised by :class:`StopAtStep` in ``crash`` mode."""


class StopAtStep(L.Callback):
    """Stop training once ``step`` optimizer steps are done.

    ``mode="graceful"`` ends the fit normally (final checkpoint written, as for a time limit);
    ``mode="crash"`` raises :class:`SimulatedCrash` instead, like a killed job: only the
    periodic checkpoints exist afterwards. Used to test exact resumption.
    """

    def __init__(self, step: int, mode: str = "graceful") -> None:
        if step < 1:
            raise ValueError(f"callbacks.stop.step={step} must be >= 1")
        if mode not in ("graceful", "crash"):
            raise ValueError(f"callbacks.stop.mode={mode!r} must be 'graceful' or 'crash'")
        self.step = step
        self.mode = mode

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        if trainer.global_step >= self.step:
            if self.mode == "crash":
                raise SimulatedCrash(f"simulated crash after step {trainer.global_step}")
            trainer.should_stop = True
