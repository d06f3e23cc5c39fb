"""Checkpoint choice and early stopping skip the validations inside the sparsity warm-up.

A probe module logs ``val_ood/loss = global_step`` (rising), so the lowest value is the
earliest validation: with validation every 2 steps and a 4-step warm-up, Lightning's plain
callbacks pick (or stop at) step 2, inside the warm-up; the qsparse ones only start at step
4, the first validation at the target ratio. (Every 2, not every step: with
``val_check_interval=1`` Lightning's callbacks act at the end of the training epoch.)
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from qsparse.nn.linear import ActivationSparsifier
from qsparse.training.callbacks import (
    WarmedUpCheckpoint,
    WarmedUpEarlyStopping,
    warmup_fraction_of,
)
from qsparse.training.sparsity_warmup import SparsityWarmup


class _Probe(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.proj.act = ActivationSparsifier(8, ratio=0.5)
        self.fractions: list[tuple[int, float]] = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.proj(self.proj.act(x)).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.fractions.append((self.global_step, warmup_fraction_of(self.trainer)))
        self.log("val_ood/loss", float(self.global_step))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(tmp_path: Path, callback: L.Callback, warmup: int = 4) -> tuple[L.Trainer, _Probe]:
    data = TensorDataset(torch.randn(16, 8))
    module = _Probe()
    trainer = L.Trainer(
        max_steps=10,
        val_check_interval=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[SparsityWarmup(steps=warmup), callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=True,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    trainer.fit(module, DataLoader(data, batch_size=2), DataLoader(data, batch_size=2))
    return trainer, module


def _checkpoint(cls: type[ModelCheckpoint], tmp_path: Path) -> ModelCheckpoint:
    return cls(
        dirpath=tmp_path / cls.__name__,
        monitor="val_ood/loss",
        mode="min",
        save_top_k=1,
        filename="best-{step}",
    )


def test_best_checkpoint_is_taken_at_the_target_sparsity(tmp_path: Path) -> None:
    trainer, module = _fit(tmp_path, _checkpoint(ModelCheckpoint, tmp_path))
    assert Path(trainer.checkpoint_callback.best_model_path).name == "best-step=2.ckpt"
    trainer, module = _fit(tmp_path, _checkpoint(WarmedUpCheckpoint, tmp_path))
    # the validation at step 2 ran at half the ratio
    assert module.fractions[:3] == [(2, 0.5), (4, 1.0), (6, 1.0)]
    assert Path(trainer.checkpoint_callback.best_model_path).name == "best-step=4.ckpt"


def test_without_a_warmup_the_checkpoint_is_lightnings(tmp_path: Path) -> None:
    trainer, _ = _fit(tmp_path, _checkpoint(WarmedUpCheckpoint, tmp_path), warmup=0)
    assert Path(trainer.checkpoint_callback.best_model_path).name == "best-step=2.ckpt"


def test_early_stopping_counts_from_the_target_sparsity(tmp_path: Path) -> None:
    plain = EarlyStopping(monitor="val_ood/loss", mode="min", patience=1)
    trainer, _ = _fit(tmp_path, plain)
    assert trainer.global_step == 4  # step 4 (full ratio) did not beat step 2 (half of it)
    warmed = WarmedUpEarlyStopping(monitor="val_ood/loss", mode="min", patience=1)
    trainer, _ = _fit(tmp_path, warmed)
    assert trainer.global_step == 6  # best at step 4 (first at the target), no gain at 6
    assert warmed.best_score.item() == 4.0


def test_recovery_recipes_choose_their_checkpoint_after_the_warmup() -> None:
    from conftest import compose_train

    for recipe in ("continue/recovery_smollm2", "continue/recovery_tiny"):
        cfg = compose_train([f"recipe={recipe}"])
        assert cfg.callbacks.best._target_ == "qsparse.training.callbacks.WarmedUpCheckpoint"
