"""Triton kernels for per-token and per-block top-k selection fused with absmax quantization.

Imported only when a kernel is about to run (CUDA tensor, or CPU under ``TRITON_INTERPRET=1``),
so CPU users never need Triton's GPU backend.

Selection: the top-k rule of :mod:`._topk_rule` (the same as :mod:`qsparse.nn.topk`): the
``k`` largest ``|x|`` of a row (token) or block, ties to the lower index, exactly ``k`` kept;
bisection on the key bits, one bit per pass over the whole tile.

Quantization (Eq. 4-7): ``q = clamp(rint(x * s), -Q-1, Q) / s`` with ``s = Q * (1 / max(gamma, eps))``,
gamma = max|x| of the token (the whole row, also for block top-k), ``Q = 2^(b-1) - 1``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import round_half_even
from ._topk_rule import abs_key, topk_mask


@triton.jit
def _quantize(xf, gamma, eps, QMAX: tl.constexpr):
    """Fake-quantize fp32 ``xf`` [R, ...] with per-row ``gamma`` already broadcast.

    ``s`` is formed as ``(1 / gamma) * Q`` because that is how PyTorch evaluates the
    reference's ``Q / gamma`` (scalar over tensor = reciprocal times scalar), bit for bit.
    """
    s = tl.div_rn(tl.full(gamma.shape, 1.0, tl.float32), tl.maximum(gamma, eps)) * QMAX
    q = round_half_even(xf * s)
    q = tl.minimum(tl.maximum(q, -QMAX - 1.0), QMAX * 1.0)
    return tl.div_rn(q, s)


@triton.jit
def _topk_keep(xf, valid, k, KEY_BITS: tl.constexpr):
    """The selection rule (:mod:`._topk_rule`, one bit per pass) along the last axis of fp32
    ``xf`` ([R, D] rows or [R, NBLK, BS] blocks; ``valid`` masks padding): True for the ``k``
    largest ``|x|`` of each row/block, ties to the lower index."""
    return topk_mask(tl.where(valid, abs_key(xf), -1), k, KEY_BITS)


@triton.jit
def _topk_tile(
    x_ptr,
    out_ptr,
    mask_ptr,
    offs,
    valid,
    k,
    eps,
    KEY_BITS: tl.constexpr,
    QMAX: tl.constexpr,
    SELECT: tl.constexpr,
    WRITE_MASK: tl.constexpr,
):
    """One program's tile ([R, D] rows or [R, NBLK, BS] blocks at ``offs``, ``valid`` masks
    padding): ``out`` = x fake-quantized (``QMAX > 0``, gamma per row over the whole row)
    and, with SELECT, zeroed outside the top-k of each row/block (the keep mask written to
    ``mask`` if WRITE_MASK)."""
    x = tl.load(x_ptr + offs, mask=valid, other=0.0)
    xf = x.to(tl.float32)
    if QMAX > 0:
        if len(xf.shape) == 2:
            gamma = tl.max(tl.abs(xf), axis=1)[:, None]
        else:
            gamma = tl.max(tl.max(tl.abs(xf), axis=2), axis=1)[:, None, None]
        val = _quantize(xf, gamma, eps, QMAX)
    else:
        val = xf
    if SELECT:
        keep = _topk_keep(xf, valid, k, KEY_BITS)
        val = tl.where(keep, val, 0.0)
        if WRITE_MASK:
            tl.store(mask_ptr + offs, keep.to(tl.int1), mask=valid)
    tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _token_topk_kernel(
    x_ptr,
    out_ptr,
    mask_ptr,
    n_rows,
    d,
    k,
    eps,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KEY_BITS: tl.constexpr,
    QMAX: tl.constexpr,
    SELECT: tl.constexpr,
    WRITE_MASK: tl.constexpr,
):
    """x, out: [n_rows, d] contiguous; mask: [n_rows, d] bool (written if WRITE_MASK).

    One program handles ROWS rows held in registers as a [ROWS, BLOCK_D] tile.
    """
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    valid = (rows < n_rows)[:, None] & (cols < d)[None, :]
    offs = rows.to(tl.int64)[:, None] * d + cols[None, :]
    _topk_tile(x_ptr, out_ptr, mask_ptr, offs, valid, k, eps, KEY_BITS, QMAX, SELECT, WRITE_MASK)


@triton.jit
def _block_topk_kernel(
    x_ptr,
    out_ptr,
    mask_ptr,
    n_rows,
    d,
    k,
    eps,
    ROWS: tl.constexpr,
    NBLK: tl.constexpr,
    BS: tl.constexpr,
    KEY_BITS: tl.constexpr,
    QMAX: tl.constexpr,
    WRITE_MASK: tl.constexpr,
):
    """x, out: [n_rows, d] contiguous with d = nblocks * BS; a [ROWS, NBLK, BS] tile per
    program; k largest |x| kept inside each block of BS; gamma is per row (token)."""
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    blk = tl.arange(0, NBLK)
    lane = tl.arange(0, BS)
    col = blk[:, None] * BS + lane[None, :]  # [NBLK, BS]
    valid = (rows < n_rows)[:, None, None] & (col < d)[None, :, :]
    offs = rows.to(tl.int64)[:, None, None] * d + col[None, :, :]
    _topk_tile(x_ptr, out_ptr, mask_ptr, offs, valid, k, eps, KEY_BITS, QMAX, True, WRITE_MASK)


def _launch(
    kernel, x, out, mask, k: int, eps: float, key_bits: int, width: int, wide_warps: int, **meta
) -> None:
    """Launch ``kernel`` on 2-D contiguous ``x`` -> ``out`` (and ``mask`` if not None);
    ``key_bits``: ``qsparse.kernels.topk.KEY_BITS[x.dtype]``; ``meta``: the kernel's own
    constexprs. A program holds about 4K values: ``4096 // width`` rows of ``width`` (the
    padded row) for narrow layers (at most 16), one row otherwise, with 4 warps, or
    ``wide_warps`` when that tile holds more than 4096 values."""
    n_rows, d = x.shape
    rows = max(1, min(16, 4096 // width))
    kernel[(triton.cdiv(n_rows, rows),)](
        x,
        out,
        mask if mask is not None else out,
        n_rows,
        d,
        k,
        eps,
        ROWS=rows,
        KEY_BITS=key_bits,
        WRITE_MASK=mask is not None,
        num_warps=4 if width * rows <= 4096 else wide_warps,
        **meta,
    )


def launch_token_topk(
    x, out, mask, k: int, qmax: int, eps: float, select: bool, key_bits: int
) -> None:
    """Run the token kernel on 2-D contiguous ``x`` -> ``out`` (and ``mask`` if not None)."""
    block_d = triton.next_power_of_2(x.shape[1])
    wide = 8 if block_d <= 8192 else 16
    meta = {"BLOCK_D": block_d, "QMAX": qmax, "SELECT": select}
    _launch(_token_topk_kernel, x, out, mask, k, eps, key_bits, block_d, wide, **meta)


def launch_block_topk(
    x, out, mask, k: int, block_size: int, qmax: int, eps: float, key_bits: int
) -> None:
    """Run the block kernel on 2-D contiguous ``x`` (d divisible by ``block_size``)."""
    nblk = triton.next_power_of_2(x.shape[1] // block_size)
    meta = {"NBLK": nblk, "BS": block_size, "QMAX": qmax}
    _launch(_block_topk_kernel, x, out, mask, k, eps, key_bits, nblk * block_size, 8, **meta)
