"""Triton kernels of :mod:`qsparse.kernels.decode_attention` (imported only with Triton)."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from ._gemv_triton import _round_to


@triton.jit
def _halves(ptr, row_offs, half, HALF: tl.constexpr):
    """Rows ``ptr + row_offs[:, None] + [0, D)`` (a negative offset: a row of zeros) as two
    fp32 halves [R, HALF]."""
    d = tl.arange(0, HALF)
    m = (row_offs[:, None] >= 0) & (d < half)[None, :]
    x1 = tl.load(ptr + row_offs[:, None] + d[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + row_offs[:, None] + half + d[None, :], mask=m, other=0.0).to(tl.float32)
    return x1, x2


@triton.jit
def _rotate(x1, x2, cos_ptr, sin_ptr, half, HALF: tl.constexpr, BF16: tl.constexpr):
    """RoPE of rows given as halves (HF ``rotate_half``): ``[x1, x2] -> [x1 c1 - x2 s1, x2 c2
    + x1 s2]`` with the tables' row at ``cos_ptr``/``sin_ptr``, fp32 [R, HALF] each, with the
    rounding of :func:`qsparse.models.rope.apply_rotary_pos_emb` in bf16 when ``BF16`` (so the
    cached keys are bit for bit the model's)."""
    d = tl.arange(0, HALF)
    dm = d < half
    c1 = tl.load(cos_ptr + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + half + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + half + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    # each product and sum rounded to the activation dtype, as the PyTorch ops round them
    r1 = _round_to(_round_to(x1 * c1, BF16) - _round_to(x2 * s1, BF16), BF16)
    r2 = _round_to(_round_to(x2 * c2, BF16) + _round_to(x1 * s2, BF16), BF16)
    return r1, r2


@triton.jit
def _attend_block(q1, q2, kb1, kb2, vb1, vb2, km, m_i, l_i, acc1, acc2):
    """One block of cached keys in the online softmax: scores ``q . k`` of the rows where
    ``km`` (the others -inf; their values must be 0), [REP_P, BLOCK_N]; returns the updated
    (running max, denominator, the two halves of the weighted value sum)."""
    sc = tl.sum(q1[:, None, :] * kb1[None, :, :], axis=2)
    sc += tl.sum(q2[:, None, :] * kb2[None, :, :], axis=2)  # [REP_P, BLOCK_N]
    sc = tl.where(km[None, :], sc, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(sc - m_new[:, None])
    acc1 = acc1 * alpha[:, None] + tl.sum(p[:, :, None] * vb1[None, :, :], axis=1)
    acc2 = acc2 * alpha[:, None] + tl.sum(p[:, :, None] * vb2[None, :, :], axis=1)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return m_new, l_i, acc1, acc2


@triton.jit
def _decode_attention_kernel(
    q_ptr,  # [B, H * D]
    k_ptr,  # [B, H_kv * D] this step's keys (before RoPE)
    v_ptr,  # [B, H_kv * D]
    cos_ptr,  # [P >= L, D] RoPE tables, row = position
    sin_ptr,
    kc_ptr,  # [B, H_kv, L, D] caches (contiguous)
    vc_ptr,
    pos_ptr,  # [1] int64: the position this step writes
    out_ptr,  # [B, H * D] (SPLITS == 1) or fp32 partials [B, H, SPLITS, D]
    m_ptr,  # fp32 [B, H, SPLITS] running max (SPLITS > 1)
    l_ptr,  # fp32 [B, H, SPLITS] softmax denominators (SPLITS > 1)
    H_KV,
    REP,
    L,
    CHUNK,
    half,
    scale,
    SPLITS: tl.constexpr,
    REP_P: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BF16: tl.constexpr,
    NEXT: tl.constexpr = False,
    PRELOAD: tl.constexpr = True,
):
    """Program (b * H_kv + g, s): the REP query heads of kv head g, keys of split s. NEXT:
    let the kernel launched after it (the o site's selection, a programmatic dependent that
    waits for this output) launch at once. PRELOAD: the split's first ``BLOCK_N`` cached keys
    and values are loaded first, before the step's position (which bounds them) is read, so
    their latency overlaps the position's load and the RoPE of q and k; rows at or past the
    position are masked afterwards. The same sums in the same order either way."""
    if NEXT:
        gdc_launch_dependents()
    bg = tl.program_id(0)
    s = tl.program_id(1)
    b = bg // H_KV
    g = bg % H_KV
    D = 2 * half
    h_q = H_KV * REP
    d = tl.arange(0, HALF)
    dm = d < half
    cache_head = (b * H_KV + g).to(tl.int64) * L * D
    lo = s * CHUNK
    n = tl.arange(0, BLOCK_N)
    if PRELOAD:  # the split's first block of cached keys and values: no wait on ``pos``
        n0 = lo + n
        offs0 = cache_head + n0.to(tl.int64)[:, None] * D + d[None, :]
        m0 = (n0 < tl.minimum(lo + CHUNK, L))[:, None] & dm[None, :]
        kb1 = tl.load(kc_ptr + offs0, mask=m0, other=0.0).to(tl.float32)
        kb2 = tl.load(kc_ptr + offs0 + half, mask=m0, other=0.0).to(tl.float32)
        vb1 = tl.load(vc_ptr + offs0, mask=m0, other=0.0).to(tl.float32)
        vb2 = tl.load(vc_ptr + offs0 + half, mask=m0, other=0.0).to(tl.float32)
    # this step's q, k, v: nothing here depends on ``pos``, so all loads are in flight at once
    kv_row = tl.full([1], 0, tl.int32) + (b * H_KV + g) * D
    k1, k2 = _halves(k_ptr, kv_row, half, HALF)
    v1, v2 = _halves(v_ptr, kv_row, half, HALF)
    r = tl.arange(0, REP_P)
    heads = g * REP + r
    q1, q2 = _halves(q_ptr, tl.where(r < REP, b * h_q * D + heads * D, -1), half, HALF)
    pos = tl.load(pos_ptr).to(tl.int32)
    cos_row = cos_ptr + pos * D  # the tables' row of this step's position
    sin_row = sin_ptr + pos * D
    # rotate k, write k and v at ``pos`` (split 0 only)
    k1, k2 = _rotate(k1, k2, cos_row, sin_row, half, HALF, BF16)
    if s == 0:
        dst = cache_head + pos * D
        ty = kc_ptr.dtype.element_ty
        tl.store(kc_ptr + dst + d[None, :], k1.to(ty), mask=dm[None, :])
        tl.store(kc_ptr + dst + half + d[None, :], k2.to(ty), mask=dm[None, :])
        tl.store(vc_ptr + dst + d[None, :], v1.to(ty), mask=dm[None, :])
        tl.store(vc_ptr + dst + half + d[None, :], v2.to(ty), mask=dm[None, :])
    # the REP query heads, rotated, scaled: [REP_P, HALF] halves
    q1, q2 = _rotate(q1, q2, cos_row, sin_row, half, HALF, BF16)
    q1 = q1 * scale
    q2 = q2 * scale
    # keys of this split before ``pos`` come from the cache; ``pos`` itself from registers
    hi = tl.minimum(lo + CHUNK, pos)
    m_i = tl.full([REP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([REP_P], tl.float32)
    acc1 = tl.zeros([REP_P, HALF], tl.float32)
    acc2 = tl.zeros([REP_P, HALF], tl.float32)
    start0 = lo
    if PRELOAD:  # the first block, loaded above before ``pos`` was known
        if hi > lo:
            km = n0 < hi
            vb1 = tl.where(km[:, None], vb1, 0.0)  # rows at or past pos: whatever the cache held
            vb2 = tl.where(km[:, None], vb2, 0.0)
            m_i, l_i, acc1, acc2 = _attend_block(
                q1, q2, kb1, kb2, vb1, vb2, km, m_i, l_i, acc1, acc2
            )
        start0 = lo + BLOCK_N
    for start in range(start0, hi, BLOCK_N):
        keys = start + n
        km = keys < hi
        offs = cache_head + keys.to(tl.int64)[:, None] * D + d[None, :]
        mm = km[:, None] & dm[None, :]
        kb1 = tl.load(kc_ptr + offs, mask=mm, other=0.0).to(tl.float32)
        kb2 = tl.load(kc_ptr + offs + half, mask=mm, other=0.0).to(tl.float32)
        vb1 = tl.load(vc_ptr + offs, mask=mm, other=0.0).to(tl.float32)
        vb2 = tl.load(vc_ptr + offs + half, mask=mm, other=0.0).to(tl.float32)
        m_i, l_i, acc1, acc2 = _attend_block(q1, q2, kb1, kb2, vb1, vb2, km, m_i, l_i, acc1, acc2)
    if (pos >= lo) & (pos < lo + CHUNK):  # the new key lies in this split
        sc_new = tl.sum(q1 * k1, axis=1) + tl.sum(q2 * k2, axis=1)  # [REP_P]
        m_new = tl.maximum(m_i, sc_new)
        alpha = tl.exp(m_i - m_new)
        p_new = tl.exp(sc_new - m_new)
        acc1 = acc1 * alpha[:, None] + p_new[:, None] * v1
        acc2 = acc2 * alpha[:, None] + p_new[:, None] * v2
        l_i = l_i * alpha + p_new
        m_i = m_new
    rm = (r < REP)[:, None] & dm[None, :]
    if SPLITS == 1:
        inv = 1.0 / l_i
        o_rows = (b * h_q + heads) * D
        ty = out_ptr.dtype.element_ty
        tl.store(out_ptr + o_rows[:, None] + d[None, :], (acc1 * inv[:, None]).to(ty), mask=rm)
        tl.store(
            out_ptr + o_rows[:, None] + half + d[None, :], (acc2 * inv[:, None]).to(ty), mask=rm
        )
    else:
        part = (b * h_q + heads) * SPLITS + s  # [REP_P]
        tl.store(out_ptr + part[:, None] * D + d[None, :], acc1, mask=rm)
        tl.store(out_ptr + part[:, None] * D + half + d[None, :], acc2, mask=rm)
        tl.store(m_ptr + part, m_i, mask=r < REP)
        tl.store(l_ptr + part, l_i, mask=r < REP)


@triton.jit
def _combine_splits_kernel(
    part_ptr,  # fp32 [B * H, SPLITS, D]
    m_ptr,  # fp32 [B * H, SPLITS]
    l_ptr,
    out_ptr,  # [B * H, D]
    D,
    SPLITS: tl.constexpr,
    D_P: tl.constexpr,
    NEXT: tl.constexpr = False,
):
    """Program per (b, h): ``out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s``. NEXT:
    as :func:`_decode_attention_kernel`'s."""
    if NEXT:
        gdc_launch_dependents()
    row = tl.program_id(0)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, D_P)
    m = tl.load(m_ptr + row * SPLITS + s)
    l_s = tl.load(l_ptr + row * SPLITS + s)
    w = tl.exp(m - tl.max(m, axis=0))  # splits without keys: m = -inf, weight 0
    acc = tl.load(part_ptr + (row * SPLITS + s)[:, None] * D + d[None, :], mask=d[None, :] < D)
    o = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l_s, axis=0)
    tl.store(out_ptr + row * D + d, o.to(out_ptr.dtype.element_ty), mask=d < D)
