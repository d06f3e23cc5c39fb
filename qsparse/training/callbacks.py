"""Training callbacks: throughput/MFU, measured sparsity + activated parameters, run summary.

Metric keys: ``perf/tokens_per_s`` (all ranks together), ``perf/step_time_s``, ``perf/mfu``
(``tokens_per_s * flops_per_token / (peak * world_size)``; omitted where the peak is unknown,
e.g. on CPU), ``sparsity/<site>`` and ``sparsity/overall`` (fraction of zeros measured on the
training batches of one step; overall = ``1 - activated / total`` parameters),
``params/activated`` and ``params/total``, ``val/sparsity`` over a validation epoch, and
``perf/peak_memory_gib`` (peak GPU memory allocated, CUDA only; also in the run summary),
``grad_norm/layer_<i>`` (:class:`LayerGradNorm`, off by default).
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from qsparse.data.cache import atomic_write_text

from .flops import model_flops_per_token, peak_flops, precision_dtype


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak GPU memory allocated by tensors on ``device`` since the start (GiB); ``None`` off
    CUDA. (``torch.cuda.max_memory_allocated``: what activations, weights and optimizer state
    need, without the allocator's cache.)"""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def _inner_model(pl_module: L.LightningModule) -> torch.nn.Module:
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, torch.nn.Module) else pl_module


class ThroughputMonitor(L.Callback):
    """Tokens per second and model FLOPs utilisation, logged every ``every_n_steps``.

    Time is measured over whole windows of ``every_n_steps`` optimizer steps (one device
    synchronisation per window, none in between), skipping the first ``warmup_steps`` steps
    (compilation, allocator warm-up). Tokens are ``input_ids.numel()`` of each micro-batch
    times the world size.
    """

    def __init__(self, every_n_steps: int = 10, warmup_steps: int = 2) -> None:
        if every_n_steps < 1:
            raise ValueError(f"callbacks.throughput.every_n_steps={every_n_steps} must be >= 1")
        if warmup_steps < 0:
            raise ValueError(f"callbacks.throughput.warmup_steps={warmup_steps} must be >= 0")
        self.every_n_steps = every_n_steps
        self.warmup_steps = warmup_steps
        self._t0: float | None = None
        self._tokens = 0
        self._start_step = 0
        self._seq_len: int | None = None
        self._flops_per_token: float | None = None
        self._peak: float | None = None
        self.last: dict[str, float] = {}

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._peak = peak_flops(pl_module.device, precision_dtype(trainer.precision))
        self._t0 = None

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        ids = batch["input_ids"] if isinstance(batch, Mapping) else batch[0]
        if self._seq_len is None:
            self._seq_len = int(ids.shape[-1])
            self._flops_per_token = model_flops_per_token(_inner_model(pl_module), self._seq_len)
        step = trainer.global_step
        if step < self.warmup_steps:
            return
        if self._t0 is None:
            self._sync(pl_module)
            self._t0, self._tokens, self._start_step = time.perf_counter(), 0, step
            return
        self._tokens += ids.numel() * trainer.world_size
        steps = step - self._start_step
        if steps < self.every_n_steps:
            return
        self._sync(pl_module)
        now = time.perf_counter()
        elapsed = now - self._t0
        metrics = {
            "perf/tokens_per_s": self._tokens / elapsed,
            "perf/step_time_s": elapsed / steps,
        }
        if self._peak and self._flops_per_token:
            achieved = metrics["perf/tokens_per_s"] * self._flops_per_token
            metrics["perf/mfu"] = achieved / (self._peak * trainer.world_size)
        memory = peak_memory_gib(pl_module.device)
        if memory is not None:
            metrics["perf/peak_memory_gib"] = memory
        self.last = metrics
        for key, value in metrics.items():
            pl_module.log(key, value, on_step=True, on_epoch=False, batch_size=ids.shape[0])
        self._t0, self._tokens, self._start_step = now, 0, step


class SparsityMonitor(L.Callback):
    """Measured activation sparsity per site and overall, and activated parameters.

    Every ``every_n_steps`` training steps, zero counting (``qsparse.stats``) is switched on
    for one batch and the result logged; during validation it is on for the whole epoch and
    ``val/sparsity`` (overall) is logged. Counting adds a few reductions per site; it is off
    otherwise. Nothing is logged for a model without sparsity sites (dense), except the
    parameter counts.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        if every_n_steps < 1:
            raise ValueError(f"callbacks.sparsity.every_n_steps={every_n_steps} must be >= 1")
        self.every_n_steps = every_n_steps
        self._active = False
        self.last: dict[str, float] = {}
        self.last_val: dict[str, float] = {}

    @staticmethod
    def _has_sites(model: torch.nn.Module) -> bool:
        from qsparse.convert import sparsifiers

        return bool(sparsifiers(model))

    def _collect(self, model: torch.nn.Module) -> dict[str, float]:
        from qsparse.stats import activated_parameters, measured_sparsity, total_parameters

        out = {f"sparsity/{k}": v for k, v in measured_sparsity(model).items()}
        out["params/activated"] = float(activated_parameters(model, measured=True))
        out["params/total"] = float(total_parameters(model))
        return out

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        from qsparse.stats import track_sparsity

        model = _inner_model(pl_module)
        if trainer.global_step % self.every_n_steps == 0 and self._has_sites(model):
            track_sparsity(model, True, reset=True)
            self._active = True

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        from qsparse.stats import track_sparsity

        if not self._active:
            return
        model = _inner_model(pl_module)
        track_sparsity(model, False, reset=False)
        self._active = False
        metrics = self._collect(model)
        self.last = metrics
        bs = batch["input_ids"].shape[0] if isinstance(batch, Mapping) else 1
        for key, value in metrics.items():
            pl_module.log(key, value, on_step=True, on_epoch=False, batch_size=bs)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from qsparse.stats import track_sparsity

        model = _inner_model(pl_module)
        if self._has_sites(model):
            track_sparsity(model, True, reset=True)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from qsparse.stats import activated_parameters, measured_sparsity, track_sparsity

        model = _inner_model(pl_module)
        if not self._has_sites(model):
            return
        track_sparsity(model, False, reset=False)
        if trainer.sanity_checking:
            return
        measured = measured_sparsity(model)
        self.last_val = {
            "val/sparsity": measured["overall"],
            "val/activated_params": float(activated_parameters(model, measured=True)),
            **{f"val_sparsity/{k}": v for k, v in measured.items() if k != "overall"},
        }
        pl_module.log("val/sparsity", measured["overall"], sync_dist=True)
        pl_module.log("val/activated_params", self.last_val["val/activated_params"], sync_dist=True)


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class LayerGradNorm(L.Callback):
    """Gradient L2 norm of each decoder layer, ``grad_norm/layer_<i>`` =
    ``sqrt(sum_{p in layers.i} ||dL/dp||^2)``, before clipping, every ``every_n_steps`` steps.

    Q-Sparse Fig. 2 shows that without the straight-through estimator (``sparsity.ste=false``)
    these norms collapse in the lower layers; ``recipe=figures/ste_tiny`` runs that comparison.
    """

    def __init__(self, every_n_steps: int = 10) -> None:
        if every_n_steps < 1:
            raise ValueError(f"callbacks.grad_norm.every_n_steps={every_n_steps} must be >= 1")
        self.every_n_steps = every_n_steps

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        squares: dict[int, torch.Tensor] = {}
        for name, p in _inner_model(pl_module).named_parameters():
            match = _LAYER.search(name)
            if p.grad is None or match is None:
                continue
            i = int(match.group(1))
            sq = p.grad.detach().float().pow(2).sum()
            squares[i] = squares[i] + sq if i in squares else sq
        if squares:
            pl_module.log_dict(
                {f"grad_norm/layer_{i:02d}": v.sqrt() for i, v in sorted(squares.items())},
                on_step=True,
                on_epoch=False,
            )


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

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step >= self.step:
            if self.mode == "crash":
                raise SimulatedCrash(f"simulated crash after step {trainer.global_step}")
            trainer.should_stop = True


class SimulatedCrash(RuntimeError):
    """Raised by :class:`StopAtStep` in ``crash`` mode."""


def read_metrics(csv_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Read Lightning CSV logs (``metrics.csv`` files under ``csv_dir``) into
    ``{metric: [(step, value), ...]}`` sorted by step; a step logged twice (a resumed run
    repeating steps after its last checkpoint) keeps the later value."""
    series: dict[str, dict[int, float]] = {}
    for path in sorted(Path(csv_dir).rglob("metrics.csv")):
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                try:
                    step = int(float(row.get("step", "") or "nan"))
                except ValueError:
                    continue
                for key, value in row.items():
                    if key in ("step", "epoch") or value in ("", None):
                        continue
                    try:
                        series.setdefault(key, {})[step] = float(value)
                    except ValueError:
                        continue
    return {k: sorted(v.items()) for k, v in series.items()}


def plot_loss_curve(
    csv_dir: str | Path,
    out_path: str | Path,
    title: str = "",
    reference: float | None = None,
) -> Path | None:
    """Write a PNG of ``train/loss`` and ``val/loss`` against the step (log-scale loss) from
    the CSV logs, with an optional horizontal ``reference`` line (e.g. the corpus unigram
    entropy); returns the path, or ``None`` when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    series = read_metrics(csv_dir)
    if not series.get("train/loss") and not series.get("val/loss"):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for key, style in (("train/loss", "-"), ("val/loss", "o-"), ("val_ood/loss", "s-")):
        points = series.get(key)
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, style, label=key, markersize=3, linewidth=1.2)
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", linewidth=1, label="unigram entropy")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


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
        from qsparse.stats import activated_parameters, total_parameters

        model = _inner_model(pl_module)
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
        tp = next((c for c in trainer.callbacks if isinstance(c, ThroughputMonitor)), None)
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
            png = plot_loss_curve(
                run_dir,
                run_dir / "loss_curve.png",
                title=run_dir.name,
                reference=self.unigram_entropy,
            )
            if png is not None:
                summary["loss_curve"] = str(png)
        self.summary = summary
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
        _print_summary(summary, run_dir)


def best_checkpoint(callbacks: Sequence[Callback]) -> tuple[str, str] | None:
    """``(path, monitor)`` of the first ``ModelCheckpoint`` with a ``monitor`` that saved a
    best checkpoint (e.g. ``callbacks.best`` on ``val_ood/loss``), else ``None``."""
    for cb in callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor and cb.best_model_path:
            return cb.best_model_path, cb.monitor
    return None


def _print_summary(summary: Mapping[str, Any], run_dir: Path) -> None:
    rows: list[tuple[str, str]] = [("run dir", str(run_dir)), ("steps", str(summary["step"]))]
    if "val_loss" in summary:
        rows.append(("val loss (nats/token)", f"{summary['val_loss']:.4f}"))
        rows.append(("val perplexity", f"{summary['val_ppl']:.2f}"))
    if "val_ood_loss" in summary:
        rows.append(("out-of-domain val loss", f"{summary['val_ood_loss']:.4f}"))
        rows.append(("out-of-domain val perplexity", f"{summary['val_ood_ppl']:.2f}"))
    if "unigram_entropy" in summary:
        rows.append(("corpus unigram entropy", f"{summary['unigram_entropy']:.4f}"))
    if summary.get("sparsity_overall") is not None:
        rows.append(("measured sparsity (overall)", f"{100 * summary['sparsity_overall']:.2f}%"))
    rows.append(("parameters", f"{summary['params_total']:,}"))
    rows.append(
        (
            "activated parameters",
            f"{summary['params_activated']:,} "
            f"({100 * summary['params_activated'] / max(summary['params_total'], 1):.1f}%)",
        )
    )
    if summary.get("tokens_per_s"):
        rows.append(("tokens/s", f"{summary['tokens_per_s']:,.0f}"))
    if summary.get("mfu") is not None:
        rows.append(("MFU", f"{100 * summary['mfu']:.1f}%"))
    if summary.get("peak_memory_gib") is not None:
        rows.append(("peak GPU memory", f"{summary['peak_memory_gib']:.2f} GiB"))
    if summary.get("train_time_s") is not None:
        rows.append(("training time", f"{summary['train_time_s']:.1f} s"))
    if "loss_curve" in summary:
        rows.append(("loss curve", summary["loss_curve"]))
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="qsparse run summary", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        for k, v in rows:
            table.add_row(k, v)
        Console().print(table)
    except ImportError:  # pragma: no cover - rich is a dependency
        for k, v in rows:
            print(f"{k:>28}: {v}")
