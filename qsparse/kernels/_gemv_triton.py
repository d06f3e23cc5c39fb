"""Triton kernels for decode-time (batch 1-16) sparse-input and ternary GEMV.

Sparse input, float weights (``y[b, n] = sum_i xs[b, i] * Wt[i, n]``, ``Wt`` = [K, N], i.e.
``nn.Linear.weight`` transposed, so a kept input reads one contiguous weight row):

1. :func:`_compact_kernel` (one program) selects the top-k of every row and writes the *union*
   of kept inputs as a compact list: ``idx[p]`` (input index, ascending), ``val[b, p]`` (row b's
   value there, 0 where row b dropped it) and the list length ``cnt``. Batch 1: ``cnt = k``,
   and with bf16 values (``PACKED``) one word per kept input instead, ``idx[p] = bf16 bits of
   the value << 16 | index`` (:func:`_list_kept`, :func:`_unpack_kept`).
2. :func:`_compact_gemv_kernel` streams only the listed weight rows: full tiles of ``BK`` kept
   rows x ``BN`` columns, no masked-off lanes, so the read is ``cnt * N`` weights. On Hopper it
   is launched as a programmatic dependent of (1) (PDL): its programs are already resident
   when the list is written and only then wait (``gdc_wait``).
3. The next site's one-program kernel (its selection, or the ternary activation kernel) is in
   turn a programmatic dependent of the GEMV (``PDL_CHAIN`` in :mod:`.gemv`): the GEMV lets
   it launch once the list is there (``NEXT``), and it waits for the GEMV's output before
   reading anything (``WAIT``), so its launch overlaps the GEMV's stream.

Selection rule: :mod:`._topk_rule` (shared with the training kernels; same as
:func:`qsparse.nn.topk.topk_mask`): key = fp32 bits of |x| as int32; ``thr`` = k-th largest
key (radix select on ``DBITS``-bit digits, or the rule's bisection on the bits); entry i kept
iff ``key_i > thr`` or (``key_i == thr`` and ``i <= cut``), ``cut`` = index of the last tie
kept.

Ternary weights (BitNet b1.58 inference, int8 activations): codes ``c = w + 1`` in {0, 1, 2}
packed 16 inputs per int32 word ``P[g, n]`` (input group g = inputs 16g..16g+15, output n):
byte ``j`` of the word holds inputs ``16g + 4s + j`` at bits ``8j + 2s`` (s = 0..3), so
``(P >> 2s) & 0x03030303`` is four int8 codes of consecutive inputs, and one ``dp4a`` (4-way
int8 dot product) with the int32 word holding the four matching int8 activations (stored
contiguously) accumulates them exactly in int32. Since ``sum q (c - 1) = sum q c - sum q``,
the row sum of the quantized activations is subtracted at the end, then the scale
``gamma / Q * alpha_n`` is applied. The activation kernel lets the GEMV start (PDL), which
requests its first weight tiles before waiting for the activations.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ._common import _HW_RINT, libdevice, round_half_even
from ._topk_rule import abs_key, ties_kept, ties_needed, topk_keep, topk_threshold


@triton.jit
def _threshold(key, idx, k, KEY_BITS: tl.constexpr, BPP: tl.constexpr = 1):
    """(thr, cut) of the top-k rule for one row of int32 keys (invalid entries: key = -1),
    ``thr`` by bisection, ``BPP`` bits per pass (:func:`._topk_rule.topk_threshold`)."""
    thr = topk_threshold(key, k, KEY_BITS, BPP)
    return thr, _tie_cut(key, idx, thr, ties_needed(key, thr, k))


@triton.jit
def _tie_cut(key, idx, thr, need):
    """Index of the last entry equal to ``thr`` that is kept (the first ``need`` ties)."""
    return tl.max(tl.where(ties_kept(key, thr, need), idx, -1), axis=0)


@triton.jit
def _kept(key, idx, thr, cut):
    """The top-k rule from (thr, cut): key above thr, or equal to it at an index <= cut."""
    return (key > thr) | ((key == thr) & (idx <= cut))


@triton.jit
def _threshold_radix(
    key,
    valid,
    n_valid,
    k,
    BLOCK: tl.constexpr,
    LOW: tl.constexpr,
    NDIG: tl.constexpr,
    DBITS: tl.constexpr = 8,
):
    """(thr, need) of the top-k rule by radix select: ``DBITS``-bit digits of ``key >> LOW``
    from the top, one 2^DBITS-bin histogram per digit over the entries that still match the
    prefix (5-bit digits: 32 bins, one per lane, so the per-digit scans stay inside a warp).
    ``n_valid``: the number of valid entries (those with ``valid`` set).

    thr = the k-th largest key; need = how many entries equal to thr are kept (>= 1).
    """
    NB: tl.constexpr = 1 << DBITS
    kp = key >> LOW
    bins = tl.arange(0, NB)
    match = valid
    n_match = n_valid + tl.zeros([], dtype=tl.int32)  # entries matching the prefix so far
    pref = tl.zeros([], dtype=tl.int32)
    need = k + tl.zeros([], dtype=tl.int32)
    for d in tl.static_range(NDIG):
        dig = (kp >> (DBITS * (NDIG - 1 - d))) & (NB - 1)
        # masked: entries off the prefix are left out (not piled into one bin, which newer
        # Triton lowers to same-address shared-memory atomics)
        h = tl.histogram(dig, NB, mask=match)
        suf = n_match - tl.cumsum(h, axis=0) + h  # matching entries with digit >= j
        best = tl.max(tl.where(suf >= need, bins, 0), axis=0)
        # one reduction gives both: entries above the chosen bin (<< 16) and in it
        if BLOCK <= 32768:
            both = tl.sum(tl.where(bins == best, (suf - h) * 65536 + h, 0), axis=0)
            need = need - (both >> 16)
            n_match = both & 65535
        else:
            need = need - tl.sum(tl.where(bins == best, suf - h, 0), axis=0)
            n_match = tl.sum(tl.where(bins == best, h, 0), axis=0)
        pref = (pref << DBITS) | best
        match = match & (dig == best)
    return pref << LOW, need


@triton.jit
def _band_pass(kp, valid, n_valid, k, base, e, NB: tl.constexpr):
    """One histogram of the keys ``kp`` (``key >> LOW``) in ``NB`` bins: bin 0 below ``base``,
    bins 1..NB-2 of ``2^e`` key values each from ``base`` up, bin NB-1 everything above.
    Returns (best, above): the highest bin holding the k-th largest key (0 or NB-1: outside
    the band) and how many valid entries lie in bins above it."""
    dig = tl.minimum(tl.maximum(((kp - base) >> e) + 1, 0), NB - 1)
    bins = tl.arange(0, NB)
    h = tl.histogram(dig, NB, mask=valid)
    suf = n_valid - tl.cumsum(h, axis=0) + h  # entries with bin >= j
    best = tl.max(tl.where(suf >= k, bins, 0), axis=0)
    return best, tl.sum(tl.where(bins == best, suf - h, 0), axis=0)


@triton.jit
def _band_fits(d, e, HALF: tl.constexpr):
    """1 when a threshold key ``d`` away from the carried one lies inside the band of bin
    width ``2^e`` (``-HALF 2^e <= d < HALF 2^e``), else 0 (int32)."""
    return ((d >= -(HALF << e)) & (d < (HALF << e))).to(tl.int32)


@triton.jit
def _threshold_hinted(
    key,
    valid,
    n_valid,
    k,
    hint_ptr,
    BLOCK: tl.constexpr,
    LOW: tl.constexpr,
    NDIG: tl.constexpr,
    DBITS: tl.constexpr,
    HINT: tl.constexpr,
    STORE: tl.constexpr = True,
):
    """:func:`_threshold_radix`, first trying the threshold carried over from the previous
    call at this site (``HINT``: ``hint_ptr`` holds it, and receives the new one unless
    ``STORE`` is off: then whoever reads the hint concurrently updates it).

    The hint word: bits 0..23 the old threshold key ``h = thr >> LOW``; for 16-bit inputs
    (``LOW >= 8``) also a band width ``2^e`` in bits 28..29 and a counter in bits 24..26
    (:func:`qsparse.kernels.gemv.hint_fields`); fp32 keys fill the word, e = 0. One
    ``2^DBITS``-bin histogram around h: bins 1..NB-2 hold ``2^e`` key values each, from
    ``h - HALF 2^e`` to ``h + HALF 2^e - 1`` (HALF = NB/2 - 1; bf16 at e = 0: about +-8% of
    |x| around the old threshold), bin 0 everything below, bin NB-1 everything above. When the
    k-th largest key falls in an inner bin, a second pass of single-value bins inside it (e >
    0) gives the exact threshold: one or two passes instead of NDIG. Otherwise (the first
    call, a moved distribution) the full radix select runs. Same (thr, need) either way.

    The width follows the site: e rises at once to the smallest e in 0..3 whose band would
    have held the new threshold, and falls by one after 8 calls in a row that a band half as
    wide would have held (``benchmarks/hint_band.py``: on a random-weight preset the down
    projection's input moves by up to about +-90 bf16 key values from token to token, the
    other sites' by +-15; on SmolLM2 every site by up to about +-100).
    """
    if HINT:
        NB: tl.constexpr = 1 << DBITS
        HALF: tl.constexpr = NB // 2 - 1
        ADAPT: tl.constexpr = (LOW >= 8) and (DBITS >= 4)  # room in the word; a bin of 8 fits
        word = tl.load(hint_ptr)
        if ADAPT:
            h = word & 0xFFFFFF
            e = (word >> 28) & 3
            cnt = (word >> 24) & 7
        else:
            h = word
            e = word * 0
            cnt = e
        kp = key >> LOW
        base = h - (HALF << e)  # first key value of bin 1
        best, above = _band_pass(kp, valid, n_valid, k, base, e, NB)
        if (best > 0) & (best < NB - 1):
            lo = base + ((best - 1) << e)  # first key value of the bin holding the k-th
            if e > 0:  # that bin's single key values, starting at its first
                best2, above = _band_pass(kp, valid, n_valid, k, lo, e * 0, NB)
                lo = lo + best2 - 1
            thr = lo << LOW
            need = k - above
        else:
            thr, need = _threshold_radix(key, valid, n_valid, k, BLOCK, LOW, NDIG, DBITS)
        if STORE:
            t = thr >> LOW
            if ADAPT:
                d = t - h
                fit_lower = _band_fits(d, tl.maximum(e - 1, 0), HALF)
                # smallest e' in 0..3 whose band around h held t
                e_need = (
                    3 - _band_fits(d, 0, HALF) - _band_fits(d, 1, HALF) - _band_fits(d, 2, HALF)
                )
                grow = (e_need > e) & (h > 0)
                calm = (e > 0) & (fit_lower > 0) & (h > 0)
                cnt = tl.where(calm & ~grow, cnt + 1, 0)
                e = tl.where(grow, e_need, tl.where(cnt >= 8, e - 1, e))
                cnt = tl.where(cnt >= 8, 0, cnt)
                t = t | (e << 28) | (cnt << 24)
            tl.store(hint_ptr, t)
    else:
        thr, need = _threshold_radix(key, valid, n_valid, k, BLOCK, LOW, NDIG, DBITS)
    return thr, need


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
    """Per row b of x[B, K]: thr, cut of the top-k rule and gamma = max|x|."""
    b = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    valid = i < K
    xf = tl.load(x_ptr + b * K + i, mask=valid, other=0.0).to(tl.float32)
    tl.store(gamma_ptr + b, tl.max(tl.abs(xf), axis=0))
    if SELECT:
        thr, cut = _threshold(tl.where(valid, abs_key(xf), -1), i, k, KEY_BITS)
        tl.store(thr_ptr + b, thr)
        tl.store(cut_ptr + b, cut)


@triton.jit
def _scan_terms(key, thr):
    """``65536 * (key > thr) + (key == thr)``: one int32 per entry whose running sum along the
    row counts the entries above the threshold (high half) and the ties so far (low half)."""
    return (key > thr).to(tl.int32) * 65536 + (key == thr).to(tl.int32)


@triton.jit
def _kept_slots(key, thr, need, cs):
    """(keep, pos) of the top-k rule from ``cs``, the inclusive running sum of
    :func:`_scan_terms` along the row: every key above ``thr`` and the first ``need`` keys
    equal to it are kept, ``pos`` is a kept entry's place in the ascending list."""
    keep = (key > thr) | ((key == thr) & ((cs & 65535) <= need))
    pos = (cs >> 16) + tl.minimum(cs & 65535, need) - 1
    return keep, pos


@triton.jit
def _pack_kept(xf, i):
    """A packed list word: ``bf16 bits of xf << 16 | i`` (``xf`` holds a bf16 value, ``i`` <
    65536); :func:`_unpack_kept` reverses it."""
    return (xf.to(tl.int32, bitcast=True) & -65536) | i


@triton.jit
def _unpack_kept(word):
    """(input index, value as fp32) of a packed list word (:func:`_pack_kept`)."""
    return word & 65535, (word & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _store_kept(xf, i, keep, pos, idx_ptr, val_ptr, PACKED: tl.constexpr):
    """The list entries of the inputs ``i`` where ``keep``, at positions ``pos``: idx[p] = i
    and val[p] = xf (fp32), or with ``PACKED`` one word per kept input in idx
    (:func:`_pack_kept`; ``xf`` must hold bf16 values): one scattered store instead of two."""
    if PACKED:
        tl.store(idx_ptr + pos, _pack_kept(xf, i), mask=keep)
    else:
        tl.store(idx_ptr + pos, i, mask=keep)
        tl.store(val_ptr + pos, xf, mask=keep)


@triton.jit
def _list_kept(key, xf, i, thr, need, idx_ptr, val_ptr, PACKED: tl.constexpr = False):
    """idx[p] = i, val[p] = xf for the kept entries of one row, ascending (``i``: the
    positions of ``key``/``xf``): every key above ``thr`` and the first ``need`` keys equal to
    it. One packed scan (:func:`_scan_terms`) gives both the tie rank and the list position
    (:func:`_kept_slots`). ``PACKED``: one word per kept input in idx instead
    (:func:`_pack_kept`): one scattered store instead of two."""
    keep, pos = _kept_slots(key, thr, need, tl.cumsum(_scan_terms(key, thr), axis=0))
    _store_kept(xf, i, keep, pos, idx_ptr, val_ptr, PACKED)


@triton.jit
def _list_one_row(
    x_ptr,
    idx_ptr,
    val_ptr,
    hint_ptr,
    K,
    k,
    BLOCK: tl.constexpr,
    LOW: tl.constexpr,
    NDIG: tl.constexpr,
    DBITS: tl.constexpr,
    HINT: tl.constexpr,
    w_ptr=None,
    eps=0.0,
    PROD: tl.constexpr = 0,
    BF16: tl.constexpr = False,
    QMAX: tl.constexpr = 0,
    scale_ptr=None,
    PACKED: tl.constexpr = False,
    d_ptr=None,
    r_ptr=None,
    ADD: tl.constexpr = False,
):
    """Batch 1: radix top-k of the site input v[K] (x, or its producer's output:
    :func:`_produce`, with ``ADD`` from the residual sum ``x + d``, stored to ``r``), then idx[p] / val[p] for the k kept inputs (:func:`_list_kept`):
    val = v (fp32), or with ``QMAX > 0`` its int8 absmax codes (:func:`_act_codes`, int32)
    and ``scale[0] = gamma / Q``; ``PACKED`` (bf16 v, QMAX = 0): one word per kept input in
    idx."""
    i = tl.arange(0, BLOCK)
    valid = i < K
    xf = _produce(x_ptr, w_ptr, 0, i, valid, K, eps, PROD, BF16, d_ptr, r_ptr, ADD)
    if QMAX > 0:
        val, gamma = _act_codes(xf, QMAX)
    else:
        val = xf
    key = tl.where(valid, abs_key(xf), -1)
    thr, need = _threshold_hinted(key, valid, K, k, hint_ptr, BLOCK, LOW, NDIG, DBITS, HINT)
    _list_kept(key, val, i, thr, need, idx_ptr, val_ptr, PACKED)
    if QMAX > 0:
        tl.store(scale_ptr, gamma / QMAX)


@triton.jit
def _band_top(h, DBITS: tl.constexpr, LOW: tl.constexpr):
    """Largest key inside the band of :func:`_threshold_hinted` around the carried hint ``h``
    (``thr >> LOW``), or -1 when there is no hint yet (``h == 0``): with the exact threshold
    at or below it, every input whose key is above it is kept."""
    NB: tl.constexpr = 1 << DBITS
    if LOW >= 8:  # the key bits of the hint word (:func:`_threshold_hinted`)
        h = h & 0xFFFFFF
    return tl.where(h > 0, (h + (NB // 2 - 2)) << LOW, -1)


@triton.jit
def _band_list_kernel(
    x_ptr,
    idx_ptr,
    val_ptr,
    cnt_ptr,
    hint_ptr,
    K,
    k,
    BLOCK: tl.constexpr,
    LOW: tl.constexpr,
    NDIG: tl.constexpr,
    DBITS: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Batch 1, threshold carried (:func:`_carry_gemv_kernel` reads the rest): the exact top-k
    of x[K] (radix select starting from ``hint[0]``, which it leaves as it is) and what the
    GEMV must add to its sweep 1 (the inputs above the band top ``hi``, :func:`_band_top`), as
    a list idx/val of ``cnt[0]`` entries; ``cnt[1]`` = the threshold key, ``cnt[2]`` = 1 when
    the GEMV must drop sweep 1. Three cases:

    - threshold at or below ``hi`` (a hit): the kept inputs at or below ``hi``;
    - above it (a miss) and fewer than k inputs to undo: those sweep 1 summed but the top-k
      drops (keys between ``hi`` and the threshold, ties past the kept ones), values negated;
    - otherwise (or no hint yet): every kept input, and sweep 1 is dropped."""
    if PDL:
        gdc_launch_dependents()
    i = tl.arange(0, BLOCK)
    valid = i < K
    xf = tl.load(x_ptr + i, mask=valid, other=0.0).to(tl.float32)
    key = tl.where(valid, abs_key(xf), -1)
    thr, need = _threshold_hinted(
        key, valid, K, k, hint_ptr, BLOCK, LOW, NDIG, DBITS, True, STORE=False
    )
    hi = _band_top(tl.load(hint_ptr), DBITS, LOW)
    eq = (key == thr).to(tl.int32)
    over = ((key > hi) & (key < thr)).to(tl.int32)  # summed by sweep 1, not kept (on a miss)
    both = tl.sum(over * 65536 + eq, axis=0)  # one reduction: both counts (K <= 16384)
    n_over = both >> 16
    n_fix = n_over + (both & 65535) - need
    # 0/1 flags as int32 scalars: fix = undo, drop = the full list
    miss = (thr > hi).to(tl.int32)
    fix = miss * (hi >= 0).to(tl.int32) * (n_fix < k).to(tl.int32)
    drop = miss - fix
    above = ((key > thr) & (key <= tl.where(drop > 0, 0x7FFFFFFF, hi))).to(tl.int32)
    a = fix * over + (1 - fix) * above
    cs = tl.cumsum(a * 65536 + eq, axis=0)
    rank = cs & 65535  # among the ties so far
    tie_kept = (rank <= need).to(tl.int32)
    listed = (a + eq * (fix * (1 - tie_kept) + (1 - fix) * tie_kept)) > 0
    tie_pos = fix * tl.maximum(rank - need, 0) + (1 - fix) * tl.minimum(rank, need)
    pos = (cs >> 16) + tie_pos - 1
    tl.store(idx_ptr + pos, i, mask=listed)
    tl.store(val_ptr + pos, xf * (1 - 2 * fix).to(tl.float32), mask=listed)
    tl.store(cnt_ptr, tl.sum(a, axis=0) + fix * (n_fix - n_over) + (1 - fix) * need)
    tl.store(cnt_ptr + 1, thr)
    tl.store(cnt_ptr + 2, drop)


@triton.jit
def _threshold_list_kernel(
    x_ptr,
    t_ptr,
    idx_ptr,
    val_ptr,
    cnt_ptr,
    K,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
    PACKED: tl.constexpr = False,
    w_ptr=None,
    eps=0.0,
    PROD: tl.constexpr = 0,
    BF16: tl.constexpr = False,
    WAIT: tl.constexpr = False,
):
    """Batch 1, a fixed threshold (TEAL): the site inputs v[K] with ``|v| > t[0]`` as a list,
    ascending, ``cnt[0]`` entries; one compare, one prefix sum, no selection. ``v`` is x or
    its producer's output (:func:`_produce`, ``PROD``). ``idx`` the indices and ``val`` the
    values (fp32), or ``PACKED`` (bf16 v): one word per kept input in idx
    (:func:`_pack_kept`), val not written. PDL: let the GEMV launched after it start (it
    waits for these writes). :func:`_compact_gemv_kernel` then reads ``cnt`` itself
    (``n_fixed = -1``). WAIT: launched as a programmatic dependent of the kernel before it;
    waits for it before reading x."""
    if PDL:
        gdc_launch_dependents()
    if WAIT:
        gdc_wait()
    i = tl.arange(0, BLOCK)
    valid = i < K
    xf = _produce(x_ptr, w_ptr, 0, i, valid, K, eps, PROD, BF16)
    keep = (tl.abs(xf) > tl.load(t_ptr)) & valid
    kept = keep.to(tl.int32)
    _store_kept(xf, i, keep, tl.cumsum(kept, axis=0) - 1, idx_ptr, val_ptr, PACKED)
    tl.store(cnt_ptr, tl.sum(kept, axis=0))


@triton.jit
def _round_to(xf, BF16: tl.constexpr):
    """fp32 ``xf`` rounded to the nearest bf16 value (ties to even) and kept in fp32, as a
    torch op with bf16 output rounds it; identity unless ``BF16``. Integer form, since the
    interpreter casts fp32 to bf16 by truncation (NaN/inf inputs not handled)."""
    if BF16:
        b = xf.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        return b.to(tl.float32, bitcast=True)
    else:
        return xf


@triton.jit
def _inv_rms(xf, K, eps):
    """``1 / sqrt(mean(x^2) + eps)`` of one row ``xf`` (fp32, zeros past K): the RMSNorm
    scale, shared by Llama's norm (:func:`_produce`) and BitNet's SubLN (the ternary prep)."""
    return tl.math.rsqrt(tl.sum(xf * xf, axis=0) / K + eps)


@triton.jit
def _produce(
    x_ptr, w_ptr, row, i, valid, K, eps, PROD: tl.constexpr, BF16: tl.constexpr,
    d_ptr=None, r_ptr=None, ADD: tl.constexpr = False,
):  # fmt: skip
    """Row ``row`` of the site's input, computed from what its producer read (fp32, each
    step rounded to the activation dtype as the torch modules round it):

    - ``PROD == 0``: ``x[row, :K]`` itself;
    - ``PROD == 1``: RMSNorm, ``w * round(x / sqrt(mean(x^2) + eps))`` (``x``: [B, K],
      ``w``: [K]; ``qsparse.models.llama.RMSNorm``); with ``ADD`` the norm's input is the
      residual sum ``x = round(x + d)`` (``d``: [B, K], the previous block's output), which
      is also stored to ``r`` [B, K] (the residual stream the layer goes on with);
    - ``PROD == 2`` / ``3``: GLU, ``round(act(g)) * u`` with ``g = x[row, :K]``,
      ``u = x[row, K:2K]`` (the fused gate|up output), act = ReLU^2 (2) or SiLU (3).
    """
    if PROD == 0:
        y = tl.load(x_ptr + row * K + i, mask=valid, other=0.0).to(tl.float32)
    elif PROD == 1:
        xf = tl.load(x_ptr + row * K + i, mask=valid, other=0.0).to(tl.float32)
        if ADD:
            df = tl.load(d_ptr + row * K + i, mask=valid, other=0.0).to(tl.float32)
            xf = _round_to(xf + df, BF16)
            tl.store(r_ptr + row * K + i, xf.to(r_ptr.dtype.element_ty), mask=valid)
        y = _round_to(xf * _inv_rms(xf, K, eps), BF16)
        w = tl.load(w_ptr + i, mask=valid, other=0.0).to(tl.float32)
        y = _round_to(w * y, BF16)
    else:
        g = tl.load(x_ptr + row * 2 * K + i, mask=valid, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * 2 * K + K + i, mask=valid, other=0.0).to(tl.float32)
        if PROD == 2:
            r = tl.maximum(g, 0.0)
            a = _round_to(r * r, BF16)
        else:
            if _HW_RINT:
                e = libdevice.exp(-g)
            else:
                e = tl.exp(-g)
            a = _round_to(tl.div_rn(g, 1.0 + e), BF16)
        y = _round_to(a * u, BF16)
    return y


@triton.jit
def _masked_topk_kernel(
    x_ptr,
    out_ptr,
    hint_ptr,
    w_ptr,
    eps,
    K,
    k,
    BLOCK: tl.constexpr,
    LOW: tl.constexpr,
    NDIG: tl.constexpr,
    DBITS: tl.constexpr,
    HINT: tl.constexpr,
    PROD: tl.constexpr = 0,
    BF16: tl.constexpr = False,
):
    """Row b of the site input v[B, K] -> out[b] = v[b] on its top-k inputs, 0 elsewhere.
    ``v`` = x itself (values copied) or what x's producer makes of it (:func:`_produce`:
    RMSNorm, act(g) * u), computed here so no separate kernel writes it. Radix select
    starting from the row's carried threshold ``hint[b]`` (``HINT``)."""
    b = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    valid = i < K
    xf = _produce(x_ptr, w_ptr, b, i, valid, K, eps, PROD, BF16)
    key = tl.where(valid, abs_key(xf), -1)
    thr, need = _threshold_hinted(key, valid, K, k, hint_ptr + b, BLOCK, LOW, NDIG, DBITS, HINT)
    keep = topk_keep(key, thr, need)
    tl.store(out_ptr + b * K + i, tl.where(keep, xf, 0.0).to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _compact_kernel(
    x_ptr,
    idx_ptr,
    val_ptr,
    cnt_ptr,
    hint_ptr,
    B,
    K,
    k,
    BB: tl.constexpr,
    BLOCK: tl.constexpr,
    KEY_BITS: tl.constexpr,
    RADIX: tl.constexpr,
    LOW: tl.constexpr,
    NDIG: tl.constexpr,
    BPP: tl.constexpr,
    DBITS: tl.constexpr = 8,
    PDL: tl.constexpr = False,
    HINT: tl.constexpr = False,
    w_ptr=None,
    eps=0.0,
    PROD: tl.constexpr = 0,
    BF16: tl.constexpr = False,
    PACKED: tl.constexpr = False,
    d_ptr=None,
    r_ptr=None,
    ADD: tl.constexpr = False,
    WAIT: tl.constexpr = False,
):
    """x[B, K] -> idx[K] (first cnt entries used), val[B, K] (fp32), cnt[1]; one program.
    PDL: let the GEMV launched after it start (it waits for this kernel's writes). WAIT:
    launched as a programmatic dependent of the kernel before it, which writes x or d; waits
    for it before reading anything. HINT (radix
    only): ``hint[b]`` carries row b's threshold from call to call (:func:`_threshold_hinted`).
    PROD (radix, batch 1 only): select from x's producer output (:func:`_produce`). PACKED
    (radix, batch 1, bf16): idx holds packed words (:func:`_list_kept`), val is not written.
    ADD (with PROD 1): the norm's input is the residual sum x + d, also stored to r."""
    if PDL:
        gdc_launch_dependents()
    if WAIT:
        gdc_wait()
    i = tl.arange(0, BLOCK)
    valid = i < K
    slot = tl.arange(0, BB)
    thrs = tl.zeros([BB], dtype=tl.int32)
    cuts = tl.zeros([BB], dtype=tl.int32)
    union = tl.zeros([BLOCK], dtype=tl.int32)
    if RADIX and BB == 1:
        _list_one_row(
            x_ptr,
            idx_ptr,
            val_ptr,
            hint_ptr,
            K,
            k,
            BLOCK,
            LOW,
            NDIG,
            DBITS,
            HINT,
            w_ptr,
            eps,
            PROD,
            BF16,
            PACKED=PACKED,
            d_ptr=d_ptr,
            r_ptr=r_ptr,
            ADD=ADD,
        )
        tl.store(cnt_ptr, k)
    else:
        for b in range(B):
            xf = tl.load(x_ptr + b * K + i, mask=valid, other=0.0).to(tl.float32)
            key = tl.where(valid, abs_key(xf), -1)
            if RADIX:
                thr, need = _threshold_hinted(
                    key, valid, K, k, hint_ptr + b, BLOCK, LOW, NDIG, DBITS, HINT
                )
                cut = _tie_cut(key, i, thr, need)
            else:
                thr, cut = _threshold(key, i, k, KEY_BITS, BPP)
            keep = _kept(key, i, thr, cut)
            union = union | keep.to(tl.int32)
            thrs = tl.where(slot == b, thr, thrs)
            cuts = tl.where(slot == b, cut, cuts)
        pos = tl.cumsum(union, axis=0) - 1
        listed = union > 0
        tl.store(idx_ptr + pos, i, mask=listed)
        tl.store(cnt_ptr, tl.sum(union, axis=0))
        for b in range(B):
            thr = tl.sum(tl.where(slot == b, thrs, 0), axis=0)
            cut = tl.sum(tl.where(slot == b, cuts, 0), axis=0)
            xf = tl.load(x_ptr + b * K + i, mask=valid, other=0.0).to(tl.float32)
            key = abs_key(xf)
            keep = _kept(key, i, thr, cut)
            tl.store(val_ptr + b * K + pos, tl.where(keep, xf, 0.0), mask=listed)


@triton.jit
def _fence(t, ASM: tl.constexpr):
    """A GPU-scope memory fence in every thread (``__threadfence``); ``t``: any int32 tensor
    the thread holds. The interpreter runs programs one after another and needs none."""
    if ASM:
        tl.inline_asm_elementwise(
            "fence.acq_rel.gpu;\n mov.b32 $0, $1;",
            "=r,r",
            [t],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )


@triton.jit
def _store_out(
    acc,
    y_ptr,
    part_ptr,
    sem_ptr,
    pid_n,
    pid_s,
    B,
    N,
    rb,
    cols,
    omask,
    SPLIT: tl.constexpr,
    BB: tl.constexpr,
    BN: tl.constexpr,
    ASM: tl.constexpr,
):
    """Write a program's fp32 sums ``acc`` [BB, BN] to ``y[rb, cols]``. SPLIT > 1 (SPLIT
    programs (j, s) share column block j): each writes its partial to ``part[s]`` and counts
    itself in ``sem[j]`` (zero between calls); the last to arrive sums the SPLIT partials in
    order (deterministic), writes y and resets ``sem[j]``."""
    out = y_ptr + rb[:, None] * N + cols[None, :]
    if SPLIT == 1:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=omask)
    else:
        offs = rb[:, None] * N + cols[None, :]
        tl.store(part_ptr + pid_s * B * N + offs, acc, mask=omask)
        _fence(cols, ASM)
        tl.debug_barrier()
        arrived = tl.atomic_add(sem_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:
            _fence(cols, ASM)
            tot = tl.zeros([BB, BN], dtype=tl.float32)
            for sp in tl.static_range(SPLIT):
                tot += tl.load(
                    part_ptr + sp * B * N + offs, mask=omask, other=0.0, cache_modifier=".cg"
                )
            tl.store(out, tot.to(y_ptr.dtype.element_ty), mask=omask)
            tl.atomic_xchg(sem_ptr + pid_n, 0)  # ready for the next call on this stream


@triton.jit
def _weight_rows(w_ptr, r, m, cmask, row_stride, wc, CMASK: tl.constexpr, EVICT: tl.constexpr):
    """Weight rows ``r`` [BK] of a program's BN columns (``w_ptr`` at its first column,
    ``wc = arange(BN)``) as a [BK, BN] tile; rows where ``m`` is false read as 0. CMASK:
    columns past N (``cmask`` false) too; without it (N a multiple of BN) the mask is per row
    only, which keeps the loads vectorized. EVICT: the loads' L2 eviction policy ("" or
    "evict_first")."""
    if CMASK:
        wmask = m[:, None] & cmask[None, :]
    else:
        wmask = m[:, None]
    return tl.load(
        w_ptr + r.to(tl.int64)[:, None] * row_stride + wc[None, :],
        mask=wmask,
        other=0.0,
        eviction_policy=EVICT,
    )


@triton.jit
def _compact_gemv_kernel(
    idx_ptr,
    val_ptr,
    cnt_ptr,
    w_ptr,
    y_ptr,
    part_ptr,
    sem_ptr,
    B,
    K,
    N,
    n_fixed,
    row_stride,
    block_stride,
    BB: tl.constexpr,
    BK: tl.constexpr,
    BN: tl.constexpr,
    PPP: tl.constexpr,
    SPLIT: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_F32: tl.constexpr,
    STAGES: tl.constexpr,
    CMASK: tl.constexpr = True,
    PDL: tl.constexpr = False,
    NEXT: tl.constexpr = False,
    ASM: tl.constexpr = True,
    PACKED: tl.constexpr = False,
    EVICT: tl.constexpr = "",
):
    """y[b, n] = sum_p val[b, p] * Wt[idx[p], n] over the listed inputs p < cnt (``n_fixed``
    instead of cnt when >= 0). PACKED (batch 1, no dot): idx[p] holds both (the packed words
    of :func:`_list_kept`) and val is not read. EVICT: the L2 eviction policy of the weight
    loads (:data:`qsparse.kernels.gemv.WEIGHTS_EVICT_FIRST`).

    Program j's weight element (i, j * BN + c) sits at ``(j // PPP) * block_stride +
    (j % PPP) * BN + i * row_stride + c``: row-major [K, N] (PPP = 1, block_stride = BN,
    row_stride = N) or column panels [N/PW, K, PW] (PPP = PW / BN programs per panel,
    block_stride = K * PW, row_stride = PW: a program's rows are close together, and the
    programs sharing a panel read adjacent pieces of each kept row).
    Grid (cdiv(N, BN), SPLIT): program (j, s) owns columns j*BN.. and the s-th slice of the
    list. SPLIT > 1: each program writes its fp32 partial sums to ``part[s]`` and counts itself
    in ``sem[j]`` (zero between calls); the last to arrive sums the SPLIT partials in order
    (deterministic), writes y and resets ``sem[j]``.
    PDL: launched as a programmatic dependent of the list kernel; waits for it here. NEXT:
    once its inputs are there, lets the kernel launched after it start (the next site's
    selection or activation kernel, which waits for this one's output).
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < N
    w_ptr = w_ptr + (pid_n // PPP).to(tl.int64) * block_stride + (pid_n % PPP) * BN
    wc = tl.arange(0, BN)
    rb = tl.arange(0, BB)
    if PDL:
        gdc_wait()
    if NEXT:  # the next site's selection / activation kernel may launch
        gdc_launch_dependents()
    if n_fixed >= 0:  # batch 1: the list holds exactly k entries, no need to read cnt
        n_kept = n_fixed
    else:
        n_kept = tl.load(cnt_ptr)
    per = tl.cdiv(tl.cdiv(n_kept, SPLIT), BK) * BK
    lo = pid_s * per
    hi = tl.minimum(lo + per, n_kept)
    if USE_DOT:
        acc = tl.zeros([BB, BN], dtype=tl.float32)
    else:
        acc2 = tl.zeros([BK, BN], dtype=tl.float32)
    # software-pipelined (cp.async, STAGES tiles in flight; the idx load of a tile is issued a
    # stage before its weight load, which depends on it)
    for p0 in tl.range(lo, hi, BK, num_stages=STAGES):
        p = p0 + tl.arange(0, BK)
        pm = p < hi
        r = tl.load(idx_ptr + p, mask=pm, other=0)
        if PACKED:
            r, v = _unpack_kept(r)
        w = _weight_rows(w_ptr, r, pm, cmask, row_stride, wc, CMASK, EVICT)
        if USE_DOT:
            v = tl.load(
                val_ptr + rb[:, None] * K + p[None, :],
                mask=(rb < B)[:, None] & pm[None, :],
                other=0.0,
            )
            if DOT_F32:  # Triton's CPU interpreter mis-evaluates bf16 dots
                acc = tl.dot(v, w.to(tl.float32), acc)
            else:
                acc = tl.dot(v.to(w.dtype), w, acc)
        else:
            if not PACKED:
                v = tl.load(val_ptr + p, mask=pm, other=0.0)
            acc2 += v[:, None] * w.to(tl.float32)
    if not USE_DOT:
        acc = tl.sum(acc2, axis=0)[None, :]
    omask = (rb < B)[:, None] & cmask[None, :]
    _store_out(
        acc, y_ptr, part_ptr, sem_ptr, pid_n, pid_s, B, N, rb, cols, omask, SPLIT, BB, BN, ASM
    )


@triton.jit
def _carry_gemv_kernel(
    x_ptr,
    hint_ptr,
    idx_ptr,
    val_ptr,
    cnt_ptr,
    w_ptr,
    y_ptr,
    part_ptr,
    sem_ptr,
    K,
    N,
    row_stride,
    BK: tl.constexpr,
    BN: tl.constexpr,
    SPLIT: tl.constexpr,
    STAGES: tl.constexpr,
    LOW: tl.constexpr,
    DBITS: tl.constexpr,
    CMASK: tl.constexpr = True,
    PDL: tl.constexpr = False,
    NEXT: tl.constexpr = False,
    ASM: tl.constexpr = True,
    EVICT: tl.constexpr = "",
):
    """Batch 1, y[n] = sum_i keep_i x_i Wt[i, n], started before the selection is known.

    Sweep 1 (before ``gdc_wait``, so under PDL while :func:`_band_list_kernel` still runs):
    the inputs whose key is above the band top ``hi`` of the carried hint (:func:`_band_top`;
    kept for sure when the exact threshold is at or below it), row-masked tiles of the
    program's slice of K (masked rows are not read). Sweep 2 (after it): the list the
    selection wrote (the kept inputs at or below ``hi``; on a miss, the inputs sweep 1 summed
    that are not kept, negated, or every kept input with sweep 1's sums dropped). Grid
    (cdiv(N, BN), SPLIT): program (j, s) owns columns j*BN.. and the s-th slice of K and of
    the list; SPLIT > 1 sums the fp32 partials in order in the last program per column block
    (``sem[j]``), as :func:`_compact_gemv_kernel`. The
    last program of the grid (``sem[cdiv(N, BN)]``) stores the new threshold in ``hint[0]``
    for the next call (every program has read the old one by then)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < N
    w_ptr = w_ptr + pid_n * BN
    wc = tl.arange(0, BN)
    hi = _band_top(tl.load(hint_ptr), DBITS, LOW)
    acc2 = tl.zeros([BK, BN], dtype=tl.float32)
    per1 = tl.cdiv(tl.cdiv(K, SPLIT), BK) * BK
    lo1 = pid_s * per1
    hi1 = tl.where(hi >= 0, tl.minimum(lo1 + per1, K), lo1)  # no hint yet: nothing certain
    for p0 in tl.range(lo1, hi1, BK, num_stages=STAGES):
        r = p0 + tl.arange(0, BK)
        xv = tl.load(x_ptr + r, mask=r < hi1, other=0.0).to(tl.float32)
        m = (r < hi1) & (abs_key(xv) > hi)
        w = _weight_rows(w_ptr, r, m, cmask, row_stride, wc, CMASK, EVICT)
        acc2 += xv[:, None] * w.to(tl.float32)
    if PDL:
        gdc_wait()
    if NEXT:  # the next site's selection / activation kernel may launch
        gdc_launch_dependents()
    n_list = tl.load(cnt_ptr)
    thr = tl.load(cnt_ptr + 1)
    acc2 = tl.where(tl.load(cnt_ptr + 2) > 0, 0.0, acc2)  # the list holds every kept input
    per = tl.cdiv(tl.cdiv(n_list, SPLIT), BK) * BK
    lo = pid_s * per
    hi2 = tl.minimum(lo + per, n_list)
    for p0 in tl.range(lo, hi2, BK, num_stages=STAGES):
        p = p0 + tl.arange(0, BK)
        pm = p < hi2
        r = tl.load(idx_ptr + p, mask=pm, other=0)
        w = _weight_rows(w_ptr, r, pm, cmask, row_stride, wc, CMASK, EVICT)
        v = tl.load(val_ptr + p, mask=pm, other=0.0)
        acc2 += v[:, None] * w.to(tl.float32)
    acc = tl.sum(acc2, axis=0)[None, :]
    rb = tl.arange(0, 1)
    omask = cmask[None, :]
    _store_out(
        acc, y_ptr, part_ptr, sem_ptr, pid_n, pid_s, 1, N, rb, cols, omask, SPLIT, 1, BN, ASM
    )
    nprog = tl.num_programs(0) * SPLIT
    done = tl.atomic_add(sem_ptr + tl.num_programs(0), 1, sem="acq_rel", scope="gpu")
    if done == nprog - 1:
        tl.store(hint_ptr, thr >> LOW)
        tl.atomic_xchg(sem_ptr + tl.num_programs(0), 0)


@triton.jit
def _dp4a(a, b, c, ASM: tl.constexpr):
    """c + sum_j a.byte_j * b.byte_j (signed bytes) elementwise on int32 tensors."""
    if ASM:
        return tl.inline_asm_elementwise(
            "dp4a.s32.s32 $0, $1, $2, $3;",
            "=r,r,r,r",
            [a, b, c],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
    else:  # the interpreter cannot run PTX: the same sum in plain integer ops
        out = c
        for j in tl.static_range(4):
            out += ((a << (24 - 8 * j)) >> 24) * ((b << (24 - 8 * j)) >> 24)
        return out


@triton.jit
def _ternary_prep_kernel(
    x_ptr,
    xq_ptr,
    qsum_ptr,
    scale_ptr,
    hint_ptr,
    K,
    KP,
    k,
    BLOCK: tl.constexpr,
    SPARSE: tl.constexpr,
    QMAX: tl.constexpr,
    LOW: tl.constexpr,
    NDIG: tl.constexpr,
    DBITS: tl.constexpr = 8,
    PDL: tl.constexpr = False,
    HINT: tl.constexpr = False,
    w_ptr=None,
    eps=0.0,
    nw_ptr=None,
    neps=0.0,
    PROD: tl.constexpr = 0,
    SUBLN: tl.constexpr = False,
    BF16: tl.constexpr = False,
    d_ptr=None,
    r_ptr=None,
    ADD: tl.constexpr = False,
    WAIT: tl.constexpr = False,
):
    """Row b of the site input v[B, K] -> int8 activation codes xq[b, :KP] (KP = K padded to
    16, zeros past K; read as int32 words, word 4g + s holds inputs 16g + 4s .. 16g + 4s +
    3), qsum[b] = sum of the codes, scale[b] = max(gamma, eps) / Q. With SPARSE, codes
    outside the row's top-k are 0. PDL: let the GEMV launched after it start loading
    weights meanwhile. HINT: ``hint[b]`` carries row b's threshold from call to call
    (:func:`_threshold_hinted`). ``v`` is computed from x: the producer PROD
    (:func:`_produce`, weight ``w``, ``eps``), then with SUBLN BitNet's SubLN as
    ``torch.nn.RMSNorm`` computes it, ``round(v / sqrt(mean(v^2) + neps) * nw)`` in fp32
    rounded once to x's dtype (BF16). ADD (with PROD 1): the norm's input is the residual sum
    ``x + d``, also stored to ``r`` (:func:`_produce`). WAIT: launched as a programmatic
    dependent of the kernel before it (the previous site's GEMV); waits for it before reading
    x or d."""
    if PDL:
        gdc_launch_dependents()
    if WAIT:
        gdc_wait()
    b = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    valid = i < K
    xf = _produce(x_ptr, w_ptr, b, i, valid, K, eps, PROD, BF16, d_ptr, r_ptr, ADD)
    if SUBLN:
        nw = tl.load(nw_ptr + i, mask=valid, other=0.0).to(tl.float32)
        xf = _round_to(xf * _inv_rms(xf, K, neps) * nw, BF16)
    q, gamma = _act_codes(xf, QMAX)
    if SPARSE:
        key = tl.where(valid, abs_key(xf), -1)
        thr, need = _threshold_hinted(key, valid, K, k, hint_ptr + b, BLOCK, LOW, NDIG, DBITS, HINT)
        keep = topk_keep(key, thr, need)
        q = tl.where(keep, q, 0)
    tl.store(qsum_ptr + b, tl.sum(q, axis=0))
    tl.store(scale_ptr + b, gamma / QMAX)
    tl.store(xq_ptr + b * KP + i, q.to(tl.int8), mask=i < KP)


@triton.jit
def _act_codes(xf, QMAX: tl.constexpr):
    """BitNet b1.58 activation codes of one row ``xf`` [BLOCK] (fp32): ``(q, gamma)`` with
    ``gamma = max(max |x|, 1e-5)`` and ``q = clamp(round_half_even(x * Q / gamma), -Q - 1, Q)``
    (int32); the row's scale is ``gamma / Q``."""
    gamma = tl.maximum(tl.max(tl.abs(xf), axis=0), 1e-5)
    s = tl.div_rn(1.0, gamma) * QMAX
    q = tl.minimum(tl.maximum(round_half_even(xf * s), -QMAX - 1.0), QMAX * 1.0).to(tl.int32)
    return q, gamma


@triton.jit
def _ternary_store(
    dot, qsum_ptr, scale_ptr, alpha_ptr, alpha, y_ptr, part_ptr, sem_ptr, pid_n, pid_s,
    B, N, rb, rvalid, cols, cmask,
    SPLIT: tl.constexpr, BB: tl.constexpr, BN: tl.constexpr, ALPHA_VEC: tl.constexpr,
    ASM: tl.constexpr,
):  # fmt: skip
    """The ternary GEMVs' epilogue: ``y[b, n] = scale_b * alpha_n * (dot[b, n] - qsum_b)``
    (``dot`` int32 [BB, BN], the sum over the codes + 1 of this program's slice; ``qsum``
    taken off by slice 0 only; ``alpha_n`` from ``alpha_ptr`` under ALPHA_VEC, else the
    scalar ``alpha``), written by :func:`_store_out`."""
    qsum = tl.load(qsum_ptr + rb, mask=rvalid, other=0)
    scale = tl.load(scale_ptr + rb, mask=rvalid, other=0.0)
    out = (dot - qsum[:, None] * (pid_s == 0).to(tl.int32)).to(tl.float32) * scale[:, None]
    if ALPHA_VEC:
        out = out * tl.load(alpha_ptr + cols, mask=cmask, other=0.0)[None, :]
    else:
        out = out * alpha
    omask = rvalid[:, None] & cmask[None, :]
    _store_out(
        out, y_ptr, part_ptr, sem_ptr, pid_n, pid_s, B, N, rb, cols, omask, SPLIT, BB, BN, ASM
    )


@triton.jit
def _ternary_dp4a_kernel(
    xw_ptr,
    qsum_ptr,
    scale_ptr,
    p_ptr,
    y_ptr,
    alpha_ptr,
    alpha,
    B,
    G,
    N,
    BB: tl.constexpr,
    BG: tl.constexpr,
    BN: tl.constexpr,
    ALPHA_VEC: tl.constexpr,
    ASM: tl.constexpr,
    PDL: tl.constexpr = False,
    NEXT: tl.constexpr = False,
    part_ptr=None,
    sem_ptr=None,
    SPLIT: tl.constexpr = 1,
    EVICT: tl.constexpr = "",
):
    """y[b, n] = scale_b * alpha_n * (sum_g sum_s dp4a(xw[b, 4g + s], (P[g, n] >> 2s) &
    0x03030303) - qsum_b), xw = the int8 codes read as int32 words. Grid (cdiv(N, BN),
    SPLIT): program (j, s) owns columns j*BN.. and the s-th slice of the words; SPLIT > 1
    sums the programs' scaled fp32 partials in order (:func:`_store_out`; ``qsum`` is taken
    off in slice 0). PDL: the first two weight tiles are requested before waiting for the
    activation kernel (weights do not depend on it). EVICT: the L2 eviction policy of the
    weight loads."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    per = tl.cdiv(tl.cdiv(G, SPLIT), BG) * BG
    lo = pid_s * per
    hi = tl.minimum(lo + per, G)
    cols = pid * BN + tl.arange(0, BN)
    cmask = cols < N
    rb = tl.arange(0, BB)
    rvalid = rb < B
    if BB == 1:  # batch 1: 2-D tiles, no batch axis to broadcast over
        acc1 = tl.zeros([BG, BN], dtype=tl.int32)
    else:
        acc = tl.zeros([BB, BG, BN], dtype=tl.int32)
    g = lo + tl.arange(0, BG)
    w = tl.load(
        p_ptr + g.to(tl.int64)[:, None] * N + cols[None, :],
        mask=(g < hi)[:, None] & cmask[None, :],
        other=0,
        eviction_policy=EVICT,
    )
    gn = g + BG
    wn = tl.load(
        p_ptr + gn.to(tl.int64)[:, None] * N + cols[None, :],
        mask=(gn < hi)[:, None] & cmask[None, :],
        other=0,
        eviction_policy=EVICT,
    )
    if PDL:
        gdc_wait()
    if NEXT:  # the next site's selection / activation kernel may launch
        gdc_launch_dependents()
    for g0 in range(lo, hi, BG):
        g = g0 + tl.arange(0, BG)
        gm = g < hi
        gn2 = g + 2 * BG
        wn2 = tl.load(  # two tiles ahead, in flight while this one is multiplied
            p_ptr + gn2.to(tl.int64)[:, None] * N + cols[None, :],
            mask=(gn2 < hi)[:, None] & cmask[None, :],
            other=0,
            eviction_policy=EVICT,
        )
        for sl in tl.static_range(4):
            c = (w >> (2 * sl)) & 0x03030303
            if BB == 1:
                a1 = tl.load(xw_ptr + 4 * g + sl, mask=gm, other=0)
                acc1 = _dp4a(tl.broadcast_to(a1[:, None], [BG, BN]), c, acc1, ASM)
            else:
                a = tl.load(
                    xw_ptr + rb[:, None] * 4 * G + 4 * g[None, :] + sl,
                    mask=rvalid[:, None] & gm[None, :],
                    other=0,
                )
                acc = _dp4a(
                    tl.broadcast_to(a[:, :, None], [BB, BG, BN]),
                    tl.broadcast_to(c[None, :, :], [BB, BG, BN]),
                    acc,
                    ASM,
                )
        w = wn
        wn = wn2
    if BB == 1:
        dot = tl.sum(acc1, axis=0)[None, :]
    else:
        dot = tl.sum(acc, axis=1)
    _ternary_store(
        dot, qsum_ptr, scale_ptr, alpha_ptr, alpha, y_ptr, part_ptr, sem_ptr, pid, pid_s,
        B, N, rb, rvalid, cols, cmask, SPLIT, BB, BN, ALPHA_VEC, ASM,
    )  # fmt: skip


@triton.jit
def _ternary_mma_kernel(
    xq_ptr,
    qsum_ptr,
    scale_ptr,
    p_ptr,
    y_ptr,
    alpha_ptr,
    alpha,
    part_ptr,
    sem_ptr,
    B,
    G,
    N,
    KP,
    BB: tl.constexpr,
    BG: tl.constexpr,
    BN: tl.constexpr,
    SPLIT: tl.constexpr,
    ALPHA_VEC: tl.constexpr,
    DOT_F32: tl.constexpr,
    STAGES: tl.constexpr,
    ASM: tl.constexpr,
    PDL: tl.constexpr = False,
    NEXT: tl.constexpr = False,
):
    """Batch 2-16: the sum of :func:`_ternary_dp4a_kernel` on int8 tensor cores.

    Per tile of ``BG`` word rows x ``BN`` columns, the 2-bit codes are unpacked to an int8
    [16 * BG, BN] operand whose row ``t * BG + g`` holds input ``16 (g0 + g) + t`` (``t = 4s +
    j``: bits ``8j + 2s`` of the word), the int8 activations are gathered in the same order
    ([BB, 16 * BG], batch padded to 16), and one int8 x int8 -> int32 ``tl.dot`` adds
    ``sum_i q[b, i] c[i, n]`` exactly. Then, as the dp4a kernel, ``y = scale_b * alpha_n *
    (dot - qsum_b)``. Grid (cdiv(N, BN), SPLIT): program (j, s) owns columns j*BN.. and the
    s-th slice of the words; SPLIT > 1 sums the programs' scaled fp32 partials in order
    (:func:`_store_out`). ``DOT_F32``: the dot in fp32 (exact here: |sum| < 2^24; the
    interpreter has no int8 dot)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < N
    rb = tl.arange(0, BB)
    rvalid = rb < B
    t = tl.arange(0, 16)
    shift = 8 * (t % 4) + 2 * (t // 4)
    r = tl.arange(0, 16 * BG)
    rt = r // BG
    rg = r % BG
    per = tl.cdiv(tl.cdiv(G, SPLIT), BG) * BG
    lo = pid_s * per
    hi = tl.minimum(lo + per, G)
    acc = tl.zeros([BB, BN], dtype=tl.int32)
    if PDL:
        gdc_wait()
    if NEXT:  # the next site's selection / activation kernel may launch
        gdc_launch_dependents()
    for g0 in tl.range(lo, hi, BG, num_stages=STAGES):
        g = g0 + tl.arange(0, BG)
        w = tl.load(
            p_ptr + g.to(tl.int64)[:, None] * N + cols[None, :],
            mask=(g < hi)[:, None] & cmask[None, :],
            other=0,
        )
        c = tl.reshape((w[None, :, :] >> shift[:, None, None]) & 3, [16 * BG, BN]).to(tl.int8)
        a = tl.load(
            xq_ptr + rb[:, None] * KP + (16 * (g0 + rg) + rt)[None, :],
            mask=rvalid[:, None] & (g0 + rg < hi)[None, :],
            other=0,
        )
        if DOT_F32:
            acc += tl.dot(a.to(tl.float32), c.to(tl.float32), input_precision="ieee").to(tl.int32)
        else:
            acc = tl.dot(a, c, acc, out_dtype=tl.int32)
    _ternary_store(
        acc, qsum_ptr, scale_ptr, alpha_ptr, alpha, y_ptr, part_ptr, sem_ptr, pid_n, pid_s,
        B, N, rb, rvalid, cols, cmask, SPLIT, BB, BN, ALPHA_VEC, ASM,
    )  # fmt: skip
