"""Triton passes of the absmean ternarization (see :mod:`qsparse.kernels.quant`)."""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import round_half_even


@triton.jit
def _absmean_partial_kernel(w_ptr, partial_ptr, n, BLOCK: tl.constexpr):
    """partial[p] = sum |w[p*BLOCK : (p+1)*BLOCK]| in fp32."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(partial_ptr + pid, tl.sum(tl.abs(w), axis=0))


@triton.jit
def _ternary_kernel(w_ptr, out_ptr, total_ptr, n, eps, BLOCK: tl.constexpr):
    """out = clamp(rint(w / a), -1, 1) * a, a = max(total / n, eps), total = sum |w|."""
    total = tl.load(total_ptr)
    a = tl.maximum(tl.div_rn(total, n.to(tl.float32)), eps)
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    q = round_half_even(tl.div_rn(w, tl.full(w.shape, 1.0, tl.float32) * a))
    q = tl.minimum(tl.maximum(q, -1.0), 1.0) * a
    tl.store(out_ptr + offs, q.to(out_ptr.dtype.element_ty), mask=m)
