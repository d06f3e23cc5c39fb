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
    keep none, some and all inputs, a count that is not a multiple of the tile, bf16 inputs;
    packed list words; the site input computed by the list kernel from its producer (RMSNorm,
    SiLU and ReLU^2 GLUs), equal to PyTorch's (SiLU in fp32: to the last bit)."""
    from conftest import run_interpreted

    script = """
import torch
from qsparse.kernels.gemv import Producer, prepare_dense
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
# packed list words (bf16): value bits << 16 | index, the same list as the two-list form
xb = torch.tensor([[0.5, -2.0, 0.1, 1.5, -0.3]], dtype=torch.bfloat16)
words, empty, cnt = threshold_rows(xb, 0.4, packed=True)
assert int(cnt[0]) == 3 and empty.numel() == 0, (cnt, empty)
w3 = words[:3]
assert (w3 & 65535).tolist() == [0, 1, 3], w3
vals = (w3 & -65536).view(torch.float32)
assert vals.tolist() == [0.5, -2.0, 1.5], vals
# producers computed by the list kernel: the RMSNorm in front of the site, act(g) * u of a GLU
for kind in ("rmsnorm", "silu_glu", "relu2_glu"):
    for dtype in (torch.float32, torch.bfloat16):
        kin, n = 96, 40
        w = torch.randn(n, kin) * 0.1
        wt = prepare_dense(w.to(dtype))
        norm_w = (torch.rand(kin) + 0.5).to(dtype) if kind == "rmsnorm" else None
        prod = Producer(kind, norm_w, 1e-5)
        x = torch.randn(1, prod.width(kin)).to(dtype)
        v = prod.reference(x)
        mags = v.float().abs().sort().values[0]
        t = float(mags[kin // 2 - 1] + mags[kin // 2]) / 2  # between two inputs: no ulp ties
        got = threshold_gemv(x, wt, t, n_out=n, out_dtype=torch.float32, producer=prod)
        ref = threshold_gemv_reference(v, w.to(dtype), t)
        assert torch.allclose(got, ref, rtol=1e-2, atol=1e-2), (kind, dtype, got, ref)
        idx, val, cnt = threshold_rows(x, t, producer=prod)
        keep = (v.float().abs() > t)[0].nonzero().flatten()
        assert idx[: int(cnt[0])].tolist() == keep.tolist(), (kind, dtype)
        # the kernel's SiLU in fp32 may differ from torch's in the last bit
        torch.testing.assert_close(val[0, : int(cnt[0])], v.float()[0, keep], rtol=1e-6, atol=0)
        checked += 1
print("threshold_gemv ok", checked)
"""
    out = run_interpreted(script, timeout=600)
    assert "threshold_gemv ok 22" in out
