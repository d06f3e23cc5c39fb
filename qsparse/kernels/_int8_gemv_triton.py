"""Triton kernel of :func:`qsparse.kernels.int8_gemv.int8_gemv`: weight-only int8 GEMV.

``y[b, v] = scale[v] * sum_d x[b, d] * q[v, d]`` for ``x`` [B, D] (bf16/fp16/fp32), ``q``
[V, D] int8 row-major (one output row's D codes contiguous, so a tile of ``BV`` rows x ``BD``
inputs is ``BV`` runs of ``BD`` bytes: 16-byte vector loads at ``BD >= 16``) and ``scale`` [V]
fp32. One program per block of ``BV`` outputs walks the whole of D. Batch 1: the products are
summed into a ``[BV, BD]`` fp32 tile and reduced over D once at the end. Batch 2-16: one
``tl.dot`` per tile, the batch padded to 16 rows, the codes converted to the activation dtype
(exact: |q| <= 127), fp32 accumulation (``DOT_F32``: both operands in fp32, for the
interpreter and for fp32 activations, ``input_precision="ieee"``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _int8_gemv_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    y_ptr,
    B,
    V,
    D,
    BB: tl.constexpr,
    BV: tl.constexpr,
    BD: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Program j: outputs ``j * BV ..`` of every row of x, written in y's dtype."""
    pid = tl.program_id(0)
    rows = pid * BV + tl.arange(0, BV)
    rmask = rows < V
    dd = tl.arange(0, BD)
    q_row = q_ptr + rows.to(tl.int64)[:, None] * D
    if BB == 1:
        acc1 = tl.zeros([BV, BD], dtype=tl.float32)
        for d0 in range(0, D, BD):
            d = d0 + dd
            dm = d < D
            q = tl.load(q_row + d[None, :], mask=rmask[:, None] & dm[None, :], other=0)
            xv = tl.load(x_ptr + d, mask=dm, other=0.0).to(tl.float32)
            acc1 += q.to(tl.float32) * xv[None, :]
        out = tl.sum(acc1, axis=1) * tl.load(s_ptr + rows, mask=rmask, other=0.0)
        tl.store(y_ptr + rows, out.to(y_ptr.dtype.element_ty), mask=rmask)
    else:
        rb = tl.arange(0, BB)
        bmask = rb < B
        acc = tl.zeros([BB, BV], dtype=tl.float32)
        for d0 in range(0, D, BD):
            d = d0 + dd
            dm = d < D
            q = tl.load(q_row + d[None, :], mask=rmask[:, None] & dm[None, :], other=0)
            xv = tl.load(
                x_ptr + rb[:, None] * D + d[None, :], mask=bmask[:, None] & dm[None, :], other=0.0
            )
            if DOT_F32:
                acc += tl.dot(xv.to(tl.float32), tl.trans(q.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(xv, tl.trans(q.to(xv.dtype)))
        out = acc * tl.load(s_ptr + rows, mask=rmask, other=0.0)[None, :]
        tl.store(
            y_ptr + rb[:, None] * V + rows[None, :],
            out.to(y_ptr.dtype.element_ty),
            mask=bmask[:, None] & rmask[None, :],
        )
