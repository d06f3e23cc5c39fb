"""The end-of-run report: ``summary.json``, ``loss_curve.png`` and the printed table.

``summary.json`` keys: ``step``, ``world_size``, ``val_loss``/``val_ppl`` (``ppl =
exp(loss)``), ``val_ood_loss``/``val_ood_ppl``, ``selected_checkpoint``/``selected_by``,
``unigram_entropy``, ``sparsity_overall``/``sparsity_per_site``, ``params_total``,
``params_activated``, ``tokens_per_s``, ``mfu``, ``peak_memory_gib``, ``train_time_s``,
``loss_curve`` (each only where known).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from qsparse.extras import MissingExtraError
from qsparse.io import atomic_write_text
from qsparse.stats import activated_parameters, total_parameters

from ..console import say
from ..plots import plot_loss_curve
from ..summary_table import print_summary
from ._model import inner_model
from .sparsity import SparsityMonitor
from .throughput import TokenThroughputMonitor, peak_memory_gib


def best_checkpoint(callbacks: Sequence[Callback]) -> tuple[str, str] | None:
    """``(path, monitor)`` of the first ``ModelCheckpoint`` with a ``monitor`` that saved a
    best checkpoint (e.g. ``callbacks.best`` on ``val_ood/loss``), else ``None``."""
    for cb in callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor and cb.best_model_path:
            return cb.best_model_path, cb.monitor
    return None


class RunSummary(L.Callback):
    """At the end of training, print a table (val loss/ppl, measured sparsity, activated and
    total parameters, tokens, throughput), write ``summary.json`` and ``loss_curve.png``
    into ``run_dir`` (default: the trainer's ``default_root_dir``).

    When validation did not run at the final step, the report waits for the next
    ``trainer.validate`` (the training script runs one).
    """

    def __init__(
        self, run_dir: str | None = None, plot: bool = True, unigram_entropy: float | None = None
    ) -> None:
        self.run_dir = run_dir
        self.plot = plot
        self.unigram_entropy = unigram_entropy
        self._pending = False
        self._t_start: float | None = None
        self._t_end: float | None = None
        self.summary: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t_start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t_end = time.perf_counter()
        best = best_checkpoint(trainer.callbacks)
        if getattr(pl_module, "last_val_step", -1) == trainer.global_step and best is None:
            self.report(trainer, pl_module)
        else:
            self._pending = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending and trainer.state.fn == "validate":
            self.flush(trainer, pl_module)

    def flush(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Report now if the report still waits for a validation (e.g. an empty validation
        set, where Lightning runs none)."""
        if self._pending:
            self._pending = False
            self.report(trainer, pl_module)

    def _collect(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        model = inner_model(pl_module)
        out: dict[str, Any] = {
            "step": int(trainer.global_step),
            "world_size": int(trainer.world_size),
        }
        val = getattr(pl_module, "last_val_loss", None)
        if val is not None:
            out["val_loss"] = float(val)
            out["val_ppl"] = math.exp(min(float(val), 80.0))
        ood = getattr(pl_module, "last_val_losses", {}).get("val_ood")
        if ood is not None:
            out["val_ood_loss"] = float(ood)
            out["val_ood_ppl"] = math.exp(min(float(ood), 80.0))
        best = best_checkpoint(trainer.callbacks)
        if best is not None:  # the weights validated and exported (see run.train)
            out["selected_checkpoint"], out["selected_by"] = best
        if self.unigram_entropy is not None:
            out["unigram_entropy"] = float(self.unigram_entropy)
        sp = next((c for c in trainer.callbacks if isinstance(c, SparsityMonitor)), None)
        measured = None
        if sp is not None and sp.last_val:
            measured = sp.last_val
            out["sparsity_overall"] = measured["val/sparsity"]
            out["sparsity_per_site"] = {
                k.split("/", 1)[1]: v for k, v in measured.items() if k.startswith("val_sparsity/")
            }
        elif sp is not None and sp.last:
            out["sparsity_overall"] = sp.last.get("sparsity/overall")
        total = total_parameters(model)
        activated = (
            int(measured["val/activated_params"]) if measured else activated_parameters(model)
        )
        out["params_total"] = int(total)
        out["params_activated"] = int(activated)
        tp = next((c for c in trainer.callbacks if isinstance(c, TokenThroughputMonitor)), None)
        if tp is not None and tp.last:
            out["tokens_per_s"] = tp.last.get("perf/tokens_per_s")
            if "perf/mfu" in tp.last:
                out["mfu"] = tp.last["perf/mfu"]
        memory = peak_memory_gib(pl_module.device)
        if memory is not None:
            out["peak_memory_gib"] = memory
        if self._t_start is not None and self._t_end is not None:
            out["train_time_s"] = self._t_end - self._t_start
        return out

    def _run_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.run_dir or trainer.default_root_dir)

    @rank_zero_only
    def report(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Print the summary table and write ``summary.json`` and ``loss_curve.png``."""
        run_dir = self._run_dir(trainer)
        run_dir.mkdir(parents=True, exist_ok=True)
        summary = self._collect(trainer, pl_module)
        for logger in trainer.loggers:
            logger.save()  # flush CSV rows before plotting them
        if self.plot:
            try:
                png = plot_loss_curve(
                    run_dir,
                    run_dir / "loss_curve.png",
                    title=run_dir.name,
                    reference=self.unigram_entropy,
                )
            except MissingExtraError as exc:  # the plot is an extra; the run still reports
                say(f"loss curve not drawn: {exc}")
                png = None
            if png is not None:
                summary["loss_curve"] = str(png)
        self.summary = summary
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
        print_summary(summary, run_dir)
