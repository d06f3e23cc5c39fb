"""The residual add formed by a site's first kernel (``residual=`` of ``sparse_gemv`` and
``ternary_gemv``; the decode view's deferred adds): under the Triton interpreter the fused
sum, the site output and the written residual stream equal the add done first in PyTorch."""

from __future__ import annotations

import pytest
import torch

from qsparse.kernels import HAS_TRITON
from qsparse.kernels import gemv as G

KERNEL_SCRIPT = """
import torch
from qsparse.kernels import gemv as G

gen = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    k_in, n, k = 96, 64, 40
    x = torch.randn(1, k_in, generator=gen).to(dtype)
    d = torch.randn(1, k_in, generator=gen).to(dtype)
    norm = G.Producer("rmsnorm", (torch.rand(k_in, generator=gen) + 0.5).to(dtype), 1e-6)
    # top-k sparse site, batch 1: the selection kernel forms x + d
    wt = G.prepare_dense(torch.randn(n, k_in, generator=gen).to(dtype))
    y, h = G.sparse_gemv(x, wt, k, hint=G.new_hint(1), producer=norm, residual=d)
    want = G.sparse_gemv(x + d, wt, k, hint=G.new_hint(1), producer=norm)
    assert torch.equal(h, x + d), dtype
    assert torch.equal(y, want), dtype
    # ternary site, batches 1 and 3, with and without top-k, with a SubLN after the norm
    codes = torch.randint(-1, 2, (n, k_in), generator=gen, dtype=torch.int8)
    packed = G.pack_ternary(codes)
    subln = G.SubLN((torch.rand(k_in, generator=gen) + 0.5).to(dtype), 1e-5)
    for b in (1, 3):
        xb = torch.randn(b, k_in, generator=gen).to(dtype)
        db = torch.randn(b, k_in, generator=gen).to(dtype)
        for kk in (None, k):
            kw = dict(hint=G.new_hint(b), producer=norm, subln=subln)
            y, h = G.ternary_gemv(xb, packed, 0.7, kk, 8, residual=db, **kw)
            kw["hint"] = G.new_hint(b)
            want = G.ternary_gemv(xb + db, packed, 0.7, kk, 8, **kw)
            assert torch.equal(h, xb + db), (dtype, b, kk)
            assert torch.equal(y, want), (dtype, b, kk)
# no producer (nothing for the kernel to fold the add into) and top-k at batch 2: the add
# runs in PyTorch first, and the call still returns (y, x + d)
x, d = torch.randn(2, 32, generator=gen), torch.randn(2, 32, generator=gen)
wt = G.prepare_dense(torch.randn(16, 32, generator=gen))
for xx, dd in ((x[:1], d[:1]), (x, d)):
    y, h = G.sparse_gemv(xx, wt, 12, residual=dd)
    assert torch.equal(h, xx + dd) and torch.equal(y, G.sparse_gemv(xx + dd, wt, 12))
print("RESIDUAL SUM OK")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_kernels_form_the_residual_sum_under_the_interpreter():
    from conftest import run_interpreted

    assert "RESIDUAL SUM OK" in run_interpreted(KERNEL_SCRIPT)


def test_a_residual_of_another_shape_or_dtype_is_refused():
    x = torch.randn(1, 32)
    wt = G.prepare_dense(torch.randn(16, 32))
    with pytest.raises(ValueError, match="residual must match x"):
        G.sparse_gemv(x, wt, 12, residual=torch.randn(1, 31))
    with pytest.raises(ValueError, match="residual must match x"):
        G.ternary_gemv(x, G.pack_ternary(torch.zeros(16, 32, dtype=torch.int8)), 1.0,
                       residual=x.double())  # fmt: skip
