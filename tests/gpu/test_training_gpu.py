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


def test_tracked_threshold_quantile_on_cuda_equals_the_cpu_one() -> None:
    """The |x| quantile a threshold site tracks (``sparsity=threshold``): a sort on CUDA (not
    ``torch.kthvalue``, one thread block per slice there), the same value as the CPU's
    ``kthvalue``, on tensors below and above the sampling limit and with ties."""
    from qsparse.nn.linear import QUANTILE_SAMPLE, _abs_quantile

    gen = torch.Generator().manual_seed(0)
    for shape in ((4, 33, 96), (8, 512, 1536)):
        x = torch.randn(shape, generator=gen).to(torch.bfloat16)  # bf16: many equal |x|
        assert x.numel() < QUANTILE_SAMPLE or shape[1] == 512
        for ratio in (0.05, 0.5, 0.6, 0.99):
            assert _abs_quantile(x.cuda(), ratio).item() == _abs_quantile(x, ratio).item()
