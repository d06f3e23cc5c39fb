"""GPU tier: calibration statistics counted on the GPU equal the CPU count."""

from __future__ import annotations

import pytest
import torch

from qsparse.methods.calibration import MagnitudeHistogram

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_histogram_counts_on_the_gpu_equal_the_cpu_counts() -> None:
    g = torch.Generator().manual_seed(0)
    chunks = [(torch.randn(4, 512, 576, generator=g) * 3.0).bfloat16() for _ in range(3)]
    chunks.append(torch.zeros(2, 576, dtype=torch.bfloat16))  # exact zeros: the first bin
    on_cpu, on_gpu = MagnitudeHistogram(), MagnitudeHistogram()
    for x in chunks:
        on_cpu.add(x)
        on_gpu.add(x.to("cuda"))
    assert on_gpu.counts.device.type == "cpu"
    assert torch.equal(on_gpu.counts, on_cpu.counts)
    for s in (0.1, 0.5, 0.9):
        assert on_gpu.icdf(s) == on_cpu.icdf(s)
