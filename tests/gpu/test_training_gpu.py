"""Training on one GPU reports throughput, MFU and peak memory (run with `pytest -m gpu`)."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

import qsparse.training.config  # noqa: F401  (registers the schema and resolvers)
from qsparse.training.run import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_gpu_run_reports_peak_memory(tmp_path: Path) -> None:
    with initialize_config_module("qsparse.conf", version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "recipe=from_scratch/qsparse_tiny",
                "trainer=gpu",
                "data=random",
                "data.vocab_size=4096",
                "data.seq_len=128",
                "data.batch_size=8",
                "trainer.max_steps=6",
                "trainer.limit_val_batches=1",
                "callbacks.throughput.every_n_steps=2",
                "callbacks.throughput.warmup_steps=1",
                "logger=csv",
                "export=false",
                f"run_dir={tmp_path}",
            ],
        )
        summary = train(cfg)
    assert summary["step"] == 6
    assert 0 < summary["peak_memory_gib"] < torch.cuda.get_device_properties(0).total_memory / 2**30
    assert summary["tokens_per_s"] > 0 and 0 < summary["mfu"] < 1
