"""qsparse.kernels.threshold_gemv: a fixed-threshold site's decode GEMV (TEAL), checked against
the hand computation and the PyTorch reference; the Triton list kernel and the GEMV that reads
its count run under the interpreter on CPU."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from qsparse.kernels.gemv import prepare_dense
from qsparse.kernels.threshold_gemv import threshold_gemv, threshold_gemv_reference

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="Triton is not installed"
)


def test_reference_by_hand() -> None:
    x = torch.tensor([[0.5, -2.0, 0.1, 1.5]])
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 2.0, -1.0]])
    # |x| > 0.4 keeps 0.5, -2.0, 1.5: row 0 sums them (0.0), row 1 = 0.5 - 1.5 = -1.0
    assert threshold_gemv_reference(x, w, 0.4).tolist() == [[0.0, -1.0]]


def test_cpu_fallback_matches_the_reference_at_every_batch() -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    wt = prepare_dense(w)
    for batch in (1, 3):
        x = torch.randn(batch, 64)
        t = torch.tensor(0.7)
        got = threshold_gemv(x, wt, t, n_out=48)
        torch.testing.assert_close(got, threshold_gemv_reference(x, w, t), rtol=1e-5, atol=1e-5)


def test_threshold_must_be_one_value() -> None:
    with pytest.raises(ValueError, match="one value"):
        threshold_gemv(torch.randn(1, 8), prepare_dense(torch.randn(4, 8)), torch.ones(2))


@needs_triton
def test_kernels_match_the_reference_under_the_interpreter() -> None:
    """The list by hand, then fresh random inputs: row-major and panel layouts, thresholds that
    keep none, some and all inputs, a count that is not a multiple of the tile, bf16 inputs."""
    from conftest import run_interpreted

    script = """
import torch
from qsparse.kernels.gemv import GemvConfig, prepare_dense, sparse_config_for
from qsparse.kernels.threshold_gemv import threshold_gemv, threshold_gemv_reference, threshold_rows

x = torch.tensor([[0.5, -2.0, 0.1, 1.5, -0.3]])
idx, val, cnt = threshold_rows(x, torch.tensor([0.4]))
assert int(cnt[0]) == 3 and idx[:3].tolist() == [0, 1, 3], (cnt, idx)
assert val[0, :3].tolist() == [0.5, -2.0, 1.5], val
torch.manual_seed(0)
checked = 0
for kin, n, block_n in ((96, 40, None), (200, 64, 32)):
    w = torch.randn(n, kin) * 0.1
    wt = prepare_dense(w, block_n=block_n)
    for t in (10.0, 0.8, 0.25, -1.0):
        for _ in range(2):
            x = torch.randn(1, kin).to(torch.bfloat16)
            got = threshold_gemv(x, wt, torch.tensor([t]), n_out=n, out_dtype=torch.float32)
            ref = threshold_gemv_reference(x, w.to(torch.bfloat16), t)
            assert torch.allclose(got.float(), ref, rtol=2e-2, atol=2e-2), (kin, t, got, ref)
            checked += 1
print("threshold_gemv ok", checked)
"""
    out = run_interpreted(script, timeout=600)
    assert "threshold_gemv ok 16" in out
