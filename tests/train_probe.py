"""A Lightning callback tests add with ``+callbacks.probe``: each rank writes what it trained
on, the parameters it started and ended with and the sparsity ratio of every site at the last
validation, so a test can check that training changed the weights, that DDP ranks read
different data and stayed synchronised (parameters equal on every rank), and that the measured
sparsity matches the ratio the sites ran at."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from qsparse.nn.sites import sparsifiers


def _digest(module: torch.nn.Module) -> dict[str, str]:
    """sha1 of every parameter's bytes, by name (bitwise comparison across processes)."""
    return {
        name: hashlib.sha1(p.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()
        for name, p in module.named_parameters()
    }


class RankProbe(pl.Callback):
    """Writes ``<out_dir>/rank<r>.json``: ``batches`` (each training batch's ``input_ids`` as
    lists), ``initial`` and ``final`` (parameter digests before the first and after the last
    optimizer step), ``ratios`` (site -> [ratio, target_ratio] at the last validation) and
    ``sites`` (the module's per-site table, ``hparams["sparsity"]["sites"]``: filled at build
    by ``sparsity.allocation=greedy``)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.batches: list[list[list[int]]] = []
        self.initial: dict[str, str] = {}
        self.ratios: dict[str, list[float]] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.initial = _digest(pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.batches.append(batch["input_ids"].tolist())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = getattr(pl_module, "model", pl_module)
        self.ratios = {n: [sp.ratio, sp.target_ratio] for n, sp in sparsifiers(model).items()}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "batches": self.batches,
            "initial": self.initial,
            "final": _digest(pl_module),
            "ratios": self.ratios,
            "sites": dict(pl_module.hparams.get("sparsity", {}).get("sites") or {}),
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class GroupProbe(pl.Callback):
    """Writes ``<out_dir>/groups<r>.json``: the parameter names of every optimizer group and
    the logical shape of each parameter, read once training starts (after any wrapping)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names = {id(p): (n, list(p.shape)) for n, p in pl_module.named_parameters()}
        groups = {
            g["name"]: [names[id(p)] for p in g["params"]]
            for g in trainer.optimizers[0].param_groups
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"groups{trainer.global_rank}.json"
        path.write_text(
            json.dumps(
                {
                    "groups": groups,
                    "wd": [g["weight_decay"] for g in trainer.optimizers[0].param_groups],
                }
            )
        )
