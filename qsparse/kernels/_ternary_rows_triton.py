"""Triton kernels of the batch-1 sparse-input ternary GEMV on input-major packed weights.

Weights (:func:`qsparse.kernels.ternary_rows.pack_ternary_rows`): ``P[i, w]`` (int32, [K, W])
holds the codes ``c = t + 1`` in {0, 1, 2} of outputs ``16w .. 16w + 15`` of input ``i``,
output ``16w + j`` in bits ``2j .. 2j + 1``. A kept input reads its ``W`` words, contiguous;
a dropped one reads nothing.

1. :func:`_ternary_list_kernel` (one program): the site input v[K] (x, or its producer's output
   computed from what the producer reads), its int8 absmax codes ``q = round(v * Q / gamma)``,
   the top-k of |v| (radix select from the carried threshold), and the list of kept inputs
   (``idx[p]`` ascending, ``qv[p] = q[idx[p]]``) with the scale ``gamma / Q``.
2. :func:`_ternary_rows_gemv_kernel` streams only the listed rows: tiles of ``BK`` kept rows x
   ``BN / 16`` words, ``y[n] = scale * alpha_n * sum_p qv[p] (c[idx[p], n] - 1)``, summed
   exactly in int32, two outputs per int32 multiply: ``(P >> 2s) & 0x00030003`` holds the
   codes of outputs ``16w + s`` (bits 0..15) and ``16w + 8 + s`` (bits 16..31), so ``qv *
   that`` adds both products at once; each of the ``BK`` row slots keeps its own packed sum,
   which is decoded (centred by ``65537 * sum qv``, low half sign-extended) into two int32
   sums at least every ``FLUSH`` tiles, while each half is still below 2^15 in magnitude
   (``FLUSH * 128 < 32768``).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ._gemv_triton import _list_one_row, _store_out


@triton.jit
def _ternary_list_kernel(
    x_ptr,
    idx_ptr,
    qv_ptr,
    scale_ptr,
    hint_ptr,
    w_ptr,
    eps,
    K,
    k,
    BLOCK: tl.constexpr,
    QMAX: tl.constexpr,
    LOW: tl.constexpr,
    NDIG: tl.constexpr,
    DBITS: tl.constexpr,
    HINT: tl.constexpr,
    PROD: tl.constexpr = 0,
    BF16: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    """Batch 1: v = the site input (:func:`_produce`), ``q = clamp(round(v * Q / gamma))``
    with ``gamma = max(max |v|, 1e-5)`` (the arithmetic of the dense ternary activation
    kernel), the top-k of |v| (ties to the lower index), and for the k kept inputs in
    ascending order ``idx[p]``, ``qv[p]`` (int32); ``scale[0] = gamma / Q``
    (:func:`._gemv_triton._list_one_row`). PDL: let the GEMV launched next start (it waits
    for these writes)."""
    if PDL:
        gdc_launch_dependents()
    _list_one_row(  # K <= 32767 (packed scan)
        x_ptr, idx_ptr, qv_ptr, hint_ptr, K, k, BLOCK, LOW, NDIG, DBITS, HINT,
        w_ptr, eps, PROD, BF16, QMAX, scale_ptr,
    )  # fmt: skip


@triton.jit
def _cat16(v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15):
    """Sixteen [BW] tensors as one [16 BW] (a fixed interleaving: the same call on the
    values and on their column indices pairs them up)."""
    a = tl.join(tl.join(v0, v1), tl.join(v2, v3))
    b = tl.join(tl.join(v4, v5), tl.join(v6, v7))
    c = tl.join(tl.join(v8, v9), tl.join(v10, v11))
    d = tl.join(tl.join(v12, v13), tl.join(v14, v15))
    out = tl.join(tl.join(a, b), tl.join(c, d))
    return tl.reshape(out, [16 * v0.shape[0]])


@triton.jit
def _halves(acc, qacc):
    """([BW] low, [BW] high): the packed per-slot sums ``acc`` [BK, BW] of ``qv * fields``,
    centred (``- 65537 * qacc``: codes c - 1), low half sign-extended, summed over the slots."""
    t = acc - (qacc * 65537)[:, None]
    t_lo = (t << 16) >> 16
    return tl.sum(t_lo, axis=0), tl.sum((t - t_lo) >> 16, axis=0)


@triton.jit
def _ternary_rows_gemv_kernel(
    idx_ptr,
    qv_ptr,
    scale_ptr,
    p_ptr,
    y_ptr,
    alpha_ptr,
    alpha,
    part_ptr,
    sem_ptr,
    n_kept,
    W,
    BK: tl.constexpr,
    BN: tl.constexpr,
    SPLIT: tl.constexpr,
    STAGES: tl.constexpr,
    FLUSH: tl.constexpr,
    ALPHA_VEC: tl.constexpr,
    CMASK: tl.constexpr = True,
    PDL: tl.constexpr = False,
    NEXT: tl.constexpr = False,
    ASM: tl.constexpr = True,
):
    """y[n] = scale * alpha_n * sum_{p < n_kept} qv[p] * (c[idx[p], n] - 1), N = 16 W outputs.

    Per tile: the words [BK, BN / 16] of BK listed rows, and for each shift s = 0..7 one int32
    multiply-add per word, ``acc_s += qv * ((P >> 2s) & 0x00030003)`` (outputs 16w + s and
    16w + 8 + s, one per 16-bit half; eight [BK, BN / 16] accumulators, so a thread unpacks
    the words it loaded). At least every ``FLUSH`` tiles the halves are decoded
    (:func:`_halves`) into the int32 sums ``acc`` [BN].
    Grid (cdiv(W, BN / 16), SPLIT): program (j, s) owns the words ``j * BN / 16 ..`` (outputs
    ``j * BN ..``) and the s-th slice of the list; SPLIT > 1 sums the programs' scaled fp32
    partials in order in the last one per column block (:func:`_store_out`). PDL: launched as
    a programmatic dependent of :func:`_ternary_list_kernel`; waits for it here (the rows it
    reads are not known before)."""
    BW: tl.constexpr = BN // 16
    M: tl.constexpr = 0x00030003
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    words = pid_n * BW + tl.arange(0, BW)
    wmask = words < W
    if PDL:
        gdc_wait()
    if NEXT:  # the next site's selection / activation kernel may launch
        gdc_launch_dependents()
    per = tl.cdiv(tl.cdiv(n_kept, SPLIT), BK) * BK
    lo = pid_s * per
    hi = tl.minimum(lo + per, n_kept)
    acc = tl.zeros([BN], dtype=tl.int32)
    for c0 in range(lo, hi, BK * FLUSH):
        c1 = tl.minimum(c0 + BK * FLUSH, hi)
        a0 = tl.zeros([BK, BW], dtype=tl.int32)
        a1 = tl.zeros([BK, BW], dtype=tl.int32)
        a2 = tl.zeros([BK, BW], dtype=tl.int32)
        a3 = tl.zeros([BK, BW], dtype=tl.int32)
        a4 = tl.zeros([BK, BW], dtype=tl.int32)
        a5 = tl.zeros([BK, BW], dtype=tl.int32)
        a6 = tl.zeros([BK, BW], dtype=tl.int32)
        a7 = tl.zeros([BK, BW], dtype=tl.int32)
        qacc = tl.zeros([BK], dtype=tl.int32)
        for p0 in tl.range(c0, c1, BK, num_stages=STAGES):
            p = p0 + tl.arange(0, BK)
            pm = p < c1
            r = tl.load(idx_ptr + p, mask=pm, other=0)
            qv = tl.load(qv_ptr + p, mask=pm, other=0)
            if CMASK:
                m = pm[:, None] & wmask[None, :]
            else:  # W is a multiple of BW: row masks only (keeps the loads vectorized)
                m = pm[:, None]
            w = tl.load(p_ptr + r.to(tl.int64)[:, None] * W + words[None, :], mask=m, other=0)
            q2 = qv[:, None]
            a0 += (w & M) * q2
            a1 += ((w >> 2) & M) * q2
            a2 += ((w >> 4) & M) * q2
            a3 += ((w >> 6) & M) * q2
            a4 += ((w >> 8) & M) * q2
            a5 += ((w >> 10) & M) * q2
            a6 += ((w >> 12) & M) * q2
            a7 += ((w >> 14) & M) * q2
            qacc += qv
        # two's complement: the packed sums may wrap, the centred halves do not
        l0, h0 = _halves(a0, qacc)
        l1, h1 = _halves(a1, qacc)
        l2, h2 = _halves(a2, qacc)
        l3, h3 = _halves(a3, qacc)
        l4, h4 = _halves(a4, qacc)
        l5, h5 = _halves(a5, qacc)
        l6, h6 = _halves(a6, qacc)
        l7, h7 = _halves(a7, qacc)
        acc += _cat16(l0, l1, l2, l3, l4, l5, l6, l7, h0, h1, h2, h3, h4, h5, h6, h7)
    c = 16 * words
    cols = _cat16(
        c, c + 1, c + 2, c + 3, c + 4, c + 5, c + 6, c + 7,
        c + 8, c + 9, c + 10, c + 11, c + 12, c + 13, c + 14, c + 15,
    )  # fmt: skip
    n_out = 16 * W
    cmask = cols < n_out
    out = acc.to(tl.float32) * tl.load(scale_ptr)
    if ALPHA_VEC:
        out = out * tl.load(alpha_ptr + cols, mask=cmask, other=0.0)
    else:
        out = out * alpha
    rb = tl.arange(0, 1)
    _store_out(
        out[None, :],
        y_ptr,
        part_ptr,
        sem_ptr,
        pid_n,
        pid_s,
        1,
        n_out,
        rb,
        cols,
        cmask[None, :],
        SPLIT,
        1,
        BN,
        ASM,
    )
