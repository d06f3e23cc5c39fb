"""The top-k selection rule of the Triton kernels: one implementation, used by the training
top-k (:mod:`._topk_triton`, [ROWS, D] and [R, NBLK, BS] tiles) and the decode GEMVs
(:mod:`._gemv_triton`, one row at a time). Imported only where Triton is installed.

Rule (same as :mod:`qsparse.nn.topk`): keep the ``k`` largest ``|x|`` along the last axis,
compared in fp32; among equal magnitudes the lower index wins; exactly ``k`` kept. The fp32
bit pattern of ``|x|`` read as an int32 ``key`` (:func:`abs_key`) is monotonic in ``|x|``
(NaN above +inf, as in ``torch.topk``); padding gets ``key = -1``, below every real key. The
threshold ``T`` = the k-th largest key is found by bisection on the bits
(:func:`topk_threshold`): starting from ``T = 0``, for each bit ``b`` from 30 down, set it if
``count(key >= T | 2^b) >= k``. bf16/fp16 inputs widen to fp32 with their low 16/13 mantissa
bits zero, so only the top 15 (bf16) or 18 (fp16) bits need a pass (``KEY_BITS``; 31 for
fp32). Then ``keep = key > T  or  (key == T and rank_among_equals <= need)``,
``need = k - count(key > T)`` (:func:`topk_keep`). The decode kernels that find ``T`` by radix
select instead (:func:`._gemv_triton._threshold_radix`) share the same tie rule.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def abs_key(xf):
    """The int32 key of fp32 ``xf``: the bits of ``|x|``, ordered as ``|x|``."""
    return xf.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def topk_threshold(key, k, KEY_BITS: tl.constexpr, BPP: tl.constexpr = 1):
    """``T``, the k-th largest int32 ``key`` along the last axis (shape ``key.shape[:-1]``: a
    scalar for one row), by bisection on the top ``KEY_BITS`` bits from bit 30 down.

    ``BPP == 1`` (any tile: a row [D], rows [R, D], blocks [R, NBLK, BS]): one candidate per
    pass, ``KEY_BITS`` passes (the first starts from ``T = 0``). ``BPP > 1`` (one row [D]):
    ``BPP`` bits per pass, the 2^BPP candidates counted at once (one [D, 2^BPP] reduction),
    so 15 bf16 bits take 8 passes at BPP = 2; needs ``BPP * ceil(KEY_BITS / BPP) <= 31``.
    """
    if BPP == 1:
        thr = tl.where(tl.sum((key >= (1 << 30)).to(tl.int32), axis=-1) >= k, 1 << 30, 0)
        for i in tl.static_range(1, KEY_BITS):
            cand = thr | (1 << (30 - i))
            cnt = tl.sum((key >= tl.expand_dims(cand, -1)).to(tl.int32), axis=-1)
            thr = tl.where(cnt >= k, cand, thr)
    else:
        tl.static_assert(len(key.shape) == 1, "BPP > 1 selects along one row")
        thr = tl.zeros([], dtype=tl.int32)
        j = tl.arange(0, 1 << BPP)
        for t in tl.static_range((KEY_BITS + BPP - 1) // BPP):
            sh = 31 - BPP * (t + 1)
            cand = thr | (j << sh)
            cnt = tl.sum((key[:, None] >= cand[None, :]).to(tl.int32), axis=0)
            thr = thr | (tl.max(tl.where(cnt >= k, j, 0), axis=0) << sh)
    return thr


@triton.jit
def ties_needed(key, thr, k):
    """``need = k - count(key > thr)`` along the last axis: how many keys equal to the
    threshold ``thr`` (shape ``key.shape[:-1]``) are kept."""
    return k - tl.sum((key > tl.expand_dims(thr, -1)).to(tl.int32), axis=-1)


@triton.jit
def ties_kept(key, thr, need):
    """The keys equal to ``thr`` that are kept: the first ``need`` of them along the last
    axis (``thr``, ``need``: shape ``key.shape[:-1]``)."""
    eq = key == tl.expand_dims(thr, -1)
    return eq & (tl.cumsum(eq.to(tl.int32), axis=-1) <= tl.expand_dims(need, -1))


@triton.jit
def topk_keep(key, thr, need):
    """The rule's keep mask from ``(thr, need)``: every key above ``thr`` and the first
    ``need`` keys equal to it along the last axis."""
    return (key > tl.expand_dims(thr, -1)) | ties_kept(key, thr, need)


@triton.jit
def topk_mask(key, k, KEY_BITS: tl.constexpr, BPP: tl.constexpr = 1):
    """True for the ``k`` largest ``key`` along the last axis, ties to the lower index."""
    thr = topk_threshold(key, k, KEY_BITS, BPP)
    return topk_keep(key, thr, ties_needed(key, thr, k))
