"""``GemvConfig(fused=True)``: the batch-1 ternary GEMV without top-k as one kernel whose
programs each quantize the row (layer norm, residual sum, SubLN, GLU producers included),
checked under the Triton interpreter against the activation kernel + dp4a GEMV path."""

from __future__ import annotations

import pytest

from qsparse.kernels import HAS_TRITON

KERNEL_SCRIPT = """
from dataclasses import replace
import torch
from qsparse.kernels import gemv as G

gen = torch.Generator().manual_seed(0)
fused = replace(G.TERNARY_CONFIG, block_k=16, block_n=16, fused=True)
plain = replace(fused, fused=False)
for dtype in (torch.float32, torch.bfloat16):
    # widths: one pass chunk, several chunks with a ragged end, not a multiple of 16
    for k_in, n in ((256, 96), (2100, 48), (1000, 40)):
        codes = torch.randint(-1, 2, (n, k_in), generator=gen, dtype=torch.int8)
        packed = G.pack_ternary(codes)
        alpha = torch.rand(n, generator=gen) + 0.1
        x = torch.randn(1, k_in, generator=gen).to(dtype) * 3
        d = torch.randn(1, k_in, generator=gen).to(dtype)
        norm = G.Producer("rmsnorm", (torch.rand(k_in, generator=gen) + 0.5).to(dtype), 1e-6)
        sub = G.SubLN((torch.rand(k_in, generator=gen) + 0.5).to(dtype), 1e-5)
        glu = torch.randn(1, 2 * k_in, generator=gen).to(dtype)
        cases = [
            (x, {}),
            (x, {"producer": norm}),
            (x, {"subln": sub}),
            (x, {"producer": norm, "subln": sub, "residual": d}),
            (glu, {"producer": G.Producer("relu2_glu"), "subln": sub}),
            (glu, {"producer": G.Producer("silu_glu")}),
        ]
        for xi, kw in cases:
            want = G.ternary_gemv(xi, packed, alpha, None, 8, plain, **kw)
            got = G.ternary_gemv(xi, packed, alpha, None, 8, fused, **kw)
            if "residual" in kw:
                assert torch.equal(got[1], want[1]), (dtype, k_in)
                got, want = got[0], want[0]
            assert torch.equal(got, want), (dtype, k_in, list(kw))
        ref = G.ternary_gemv_reference(x, packed, alpha, None, 8)
        got = G.ternary_gemv(x, packed, alpha, None, 8, fused)
        assert (got.float() - ref.float()).norm() <= 1e-2 * ref.float().norm(), (dtype, k_in)
        # top-k or batch > 1: fused is ignored, the activation kernel runs
        for xb, k in ((x, k_in // 3), (torch.randn(3, k_in, generator=gen).to(dtype), None)):
            got = G.ternary_gemv(xb, packed, alpha, k, 8, fused, hint=G.new_hint(3))
            assert torch.equal(got, G.ternary_gemv(xb, packed, alpha, k, 8, plain, hint=G.new_hint(3)))
print("FUSED OK")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_fused_ternary_gemv_equals_the_activation_kernel_path():
    from conftest import run_interpreted

    assert "FUSED OK" in run_interpreted(KERNEL_SCRIPT)
