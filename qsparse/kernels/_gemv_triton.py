"""Triton kernels for decode-time (batch 1-16) sparse-input and ternary GEMV.

``y[b, n] = sum_i xs[b, i] * W[i, n]`` with the weight stored input-major (``Wt``: [K, N], i.e.
``nn.Linear.weight`` transposed) so each kept input reads one contiguous weight row. Weight
tiles are loaded with a row mask = "some batch row keeps input i": a masked-off row issues no
memory transaction, so only the kept rows are read (the union over the batch).

The selection is computed once per row by :func:`_select_kernel` into three numbers
(``thr``, ``cut``, ``gamma``): entry i is kept iff ``key_i > thr`` or (``key_i == thr`` and
``i <= cut``), key = fp32 bits of |x| (same rule as the training kernels and
:func:`qsparse.nn.topk.topk_mask`: k largest, lower index on ties).

Ternary weights are 2-bit codes ``c = w + 1`` in {0, 1, 2}, 16 output columns per int32
(column ``16 q + j`` of input row i in bits ``2j..2j+1`` of ``P[i, q]``); since
``sum x (c - 1) = sum x c - sum x`` the kernels accumulate ``x * c`` and subtract the row sum.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import round_half_even


@triton.jit
def _select_kernel(
    x_ptr,
    thr_ptr,
    cut_ptr,
    gamma_ptr,
    K,
    k,
    BLOCK: tl.constexpr,
    KEY_BITS: tl.constexpr,
    SELECT: tl.constexpr,
):
    """Per row b of x[B, K]: thr = k-th largest key, cut = index of the last tie kept,
    gamma = max|x| (for absmax quantization)."""
    b = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    valid = i < K
    xf = tl.load(x_ptr + b * K + i, mask=valid, other=0.0).to(tl.float32)
    tl.store(gamma_ptr + b, tl.max(tl.abs(xf), axis=0))
    if SELECT:
        key = xf.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        key = tl.where(valid, key, -1)
        thr = tl.zeros([], dtype=tl.int32)
        for t in tl.static_range(KEY_BITS):
            cand = thr | (1 << (30 - t))
            cnt = tl.sum((key >= cand).to(tl.int32), axis=0)
            thr = tl.where(cnt >= k, cand, thr)
        need = k - tl.sum((key > thr).to(tl.int32), axis=0)
        eq = key == thr
        rank = tl.cumsum(eq.to(tl.int32), axis=0)
        cut = tl.max(tl.where(eq & (rank <= need), i, -1), axis=0)
        tl.store(thr_ptr + b, thr)
        tl.store(cut_ptr + b, cut)


@triton.jit
def _load_x_tile(
    x_ptr,
    thr_ptr,
    cut_ptr,
    gamma_ptr,
    B,
    K,
    kk,
    BB: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPARSE: tl.constexpr,
    QMAX: tl.constexpr,
):
    """x[BB, BLOCK_K] at columns kk (fp32, zero where not kept; integer codes when QMAX),
    and the per-input 'kept by some row' flag [BLOCK_K]."""
    rb = tl.arange(0, BB)
    rvalid = rb < B
    valid = rvalid[:, None] & (kk < K)[None, :]
    xf = tl.load(x_ptr + rb[:, None] * K + kk[None, :], mask=valid, other=0.0).to(tl.float32)
    if SPARSE:
        thr = tl.load(thr_ptr + rb, mask=rvalid, other=0x7FFFFFFF)
        cut = tl.load(cut_ptr + rb, mask=rvalid, other=-1)
        key = xf.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        keep = (key > thr[:, None]) | ((key == thr[:, None]) & (kk[None, :] <= cut[:, None]))
        keep = keep & valid
    else:
        keep = valid
    if QMAX > 0:
        gamma = tl.load(gamma_ptr + rb, mask=rvalid, other=1.0)
        s = tl.div_rn(tl.full([BB], 1.0, tl.float32), tl.maximum(gamma, 1e-5)) * QMAX
        q = round_half_even(xf * s[:, None])
        xf = tl.minimum(tl.maximum(q, -QMAX - 1.0), QMAX * 1.0)
    xv = tl.where(keep, xf, 0.0)
    row_any = tl.max(keep.to(tl.int32), axis=0) > 0
    return xv, row_any


@triton.jit
def _sparse_gemv_kernel(
    x_ptr,
    w_ptr,
    part_ptr,
    thr_ptr,
    cut_ptr,
    gamma_ptr,
    B,
    K,
    N,
    k_per_split,
    BB: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPARSE: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """part[split, b, n] = sum over the split's inputs i of xs[b, i] * Wt[i, n] (fp32)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    k_lo = pid_s * k_per_split
    if USE_DOT:
        acc = tl.zeros([BB, BLOCK_N], dtype=tl.float32)
    else:
        acc2 = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_lo + k_per_split, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        xv, row_any = _load_x_tile(
            x_ptr, thr_ptr, cut_ptr, gamma_ptr, B, K, kk, BB, BLOCK_K, SPARSE, 0
        )
        w = tl.load(
            w_ptr + kk.to(tl.int64)[:, None] * N + cols[None, :],
            mask=row_any[:, None] & cmask[None, :],
            other=0.0,
        )
        if USE_DOT:
            if DOT_F32:  # Triton's CPU interpreter mis-evaluates bf16 dots
                acc = tl.dot(xv, w.to(tl.float32), acc)
            else:
                acc = tl.dot(xv.to(w.dtype), w, acc)
        else:
            acc2 += tl.sum(xv, axis=0)[:, None] * w.to(tl.float32)
    if not USE_DOT:
        acc = tl.sum(acc2, axis=0)[None, :]
    rb = tl.arange(0, BB)
    out = part_ptr + (pid_s * B + rb[:, None]) * N + cols[None, :]
    tl.store(out, acc, mask=(rb < B)[:, None] & cmask[None, :])


@triton.jit
def _ternary_gemv_kernel(
    x_ptr,
    p_ptr,
    part_ptr,
    thr_ptr,
    cut_ptr,
    gamma_ptr,
    alpha_ptr,
    alpha,
    B,
    K,
    NQ,
    k_per_split,
    BB: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BQ: tl.constexpr,
    ALPHA_VEC: tl.constexpr,
    SPARSE: tl.constexpr,
    QMAX: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """part[split, b, n] = r_b * alpha_n * sum_i xs[b, i] * (c[i, n] - 1), c from packed
    P[K, NQ] (n = 16 q + j); xs are integer codes and r_b = max(gamma_b, eps) / QMAX when
    QMAX > 0 (else r_b = 1); alpha_n from alpha_ptr (ALPHA_VEC) or the scalar ``alpha``.

    Both paths unpack a [BLOCK_K, BQ, 16] code tile; USE_DOT feeds it to a tensor-core dot
    (batch padded to BB >= 16), otherwise (batch 1) it is accumulated elementwise and reduced
    once at the end. (A variant loading each shared word once per lane and converting codes
    with the 2^23 magic number measured slower on H100: 37 vs 32 us at 4096x11008.)
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    q = pid_n * BQ + tl.arange(0, BQ)
    qmask = q < NQ
    shifts = 2 * tl.arange(0, 16)
    cols = pid_n * BQ * 16 + tl.arange(0, BQ * 16)
    k_lo = pid_s * k_per_split
    xsum = tl.zeros([BB], dtype=tl.float32)
    if USE_DOT:
        acc = tl.zeros([BB, BQ * 16], dtype=tl.float32)
    else:
        acc3 = tl.zeros([BLOCK_K, BQ, 16], dtype=tl.float32)
    for k0 in range(k_lo, k_lo + k_per_split, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        xv, row_any = _load_x_tile(
            x_ptr, thr_ptr, cut_ptr, gamma_ptr, B, K, kk, BB, BLOCK_K, SPARSE, QMAX
        )
        xsum += tl.sum(xv, axis=1)
        p = tl.load(
            p_ptr + kk.to(tl.int64)[:, None] * NQ + q[None, :],
            mask=row_any[:, None] & qmask[None, :],
            other=0,
        )
        c = (p[:, :, None] >> shifts[None, None, :]) & 3  # [BLOCK_K, BQ, 16]
        if USE_DOT:
            if DOT_F32:
                cw = tl.reshape(c.to(tl.float32), [BLOCK_K, BQ * 16])
                acc = tl.dot(xv, cw, acc)
            else:  # codes and int8 activations are exact in bf16
                cw = tl.reshape(c.to(tl.bfloat16), [BLOCK_K, BQ * 16])
                acc = tl.dot(xv.to(tl.bfloat16), cw, acc)
        else:
            acc3 += tl.sum(xv, axis=0)[:, None, None] * c.to(tl.float32)
    if not USE_DOT:
        acc = tl.reshape(tl.sum(acc3, axis=0), [1, BQ * 16])
    acc = acc - xsum[:, None]
    rb = tl.arange(0, BB)
    if QMAX > 0:
        gamma = tl.load(gamma_ptr + rb, mask=rb < B, other=1.0)
        acc = acc * (tl.maximum(gamma, 1e-5) / QMAX)[:, None]
    if ALPHA_VEC:
        a = tl.load(alpha_ptr + cols, mask=cols < NQ * 16, other=0.0)
        acc = acc * a[None, :]
    else:
        acc = acc * alpha
    out = part_ptr + (pid_s * B + rb[:, None]) * (NQ * 16) + cols[None, :]
    tl.store(out, acc, mask=(rb < B)[:, None] & (cols < NQ * 16)[None, :])
