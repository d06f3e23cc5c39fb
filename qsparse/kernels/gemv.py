"""Decode-time GEMV kernels: sparse-input bf16 and 2-bit ternary, with their references.

Weights are prepared once (:func:`prepare_dense`, :func:`pack_ternary`) in the layout the
kernels read: input-major so that a kept input reads one contiguous row of weights.

- :func:`sparse_gemv`: ``y = (x * M) @ Wt`` with ``M`` the per-row top-k of |x|, ``Wt``: [K, N]
  bf16. Reads only weight rows kept by some batch row (batch 1: ``k * N`` weights).
- :func:`ternary_gemv`: ``y = Q8(x) * M @ (alpha * T)`` with ``T`` in {-1, 0, 1} packed 16 per
  int32 along N ([K, N/16]: 1/8 of the bf16 bytes), activations absmax-quantized per row (BitNet
  b1.58 inference); with ``k`` set, also top-k sparse (BitNet + Q-Sparse).

Top-k selection (one small kernel, one program per row) is part of every call that sparsifies;
:func:`select_rows` exposes it for timing. References: :func:`sparse_gemv_reference`,
:func:`ternary_gemv_reference` (pure PyTorch, any device).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..nn.quant import absmax_quantize
from ..nn.topk import topk_mask

KEY_BITS = {torch.bfloat16: 15, torch.float16: 18, torch.float32: 31}


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape: split the K loop over ``split`` programs per column block."""

    block_k: int = 64
    block_n: int = 64
    split: int = 4
    num_warps: int = 4
    num_stages: int = 3
    use_dot: bool | None = None  # tensor-core dot with the batch padded to 16; None: batch > 1


def _check_x(x: torch.Tensor, k_in: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [batch, in_features], got shape {tuple(x.shape)}")
    if x.shape[1] != k_in:
        raise ValueError(f"x has {x.shape[1]} features, the weight expects {k_in}")
    if x.dtype not in KEY_BITS:
        raise ValueError(f"x.dtype must be bf16/fp16/fp32, got {x.dtype}")


def _check_k(k: int | None, width: int) -> None:
    if k is not None and not 1 <= k <= width:
        raise ValueError(f"k must be in [1, {width}] (inputs kept per row), got {k}")


def select_rows(x: torch.Tensor, k: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``x[B, K]``: (thr int32 [B], cut int32 [B], gamma fp32 [B]).

    Entry i of row b is kept iff ``bits|x_bi| > thr_b`` or (``== thr_b`` and ``i <= cut_b``);
    ``gamma_b = max_i |x_bi|``. With ``k=None`` only gamma is meaningful.
    """
    import triton

    from ._gemv_triton import _select_kernel

    bsz, width = x.shape
    thr = torch.empty(bsz, dtype=torch.int32, device=x.device)
    cut = torch.empty(bsz, dtype=torch.int32, device=x.device)
    gamma = torch.empty(bsz, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(width)
    _select_kernel[(bsz,)](
        x,
        thr,
        cut,
        gamma,
        width,
        k if k is not None else width,
        BLOCK=block,
        KEY_BITS=KEY_BITS[x.dtype],
        SELECT=k is not None and k < width,
        num_warps=8 if block <= 8192 else 16,
    )
    return thr, cut, gamma


def prepare_dense(weight: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.weight`` [N, K] -> the kernel layout ``Wt`` [K, N] (contiguous copy)."""
    return weight.t().contiguous()


def _launch_split(k_in: int, cfg: GemvConfig) -> tuple[int, int]:
    split = max(1, min(cfg.split, -(-k_in // cfg.block_k)))
    per = -(-k_in // split)
    per = -(-per // cfg.block_k) * cfg.block_k
    split = -(-k_in // per)
    return split, per


def sparse_gemv(
    x: torch.Tensor,
    wt: torch.Tensor,
    k: int | None = None,
    cfg: GemvConfig | None = None,
    out_dtype: torch.dtype | None = None,
    meta: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``y[B, N] = (x * M) @ wt`` for ``x[B, K]`` and ``wt[K, N]`` (``M``: top-``k`` of |x| per
    row; ``k=None`` = dense, the same kernel reading every row). ``meta``: the output of
    :func:`select_rows` for ``(x, k)`` when already computed (the selection is then skipped)."""
    import triton

    from ._gemv_triton import _sparse_gemv_kernel

    cfg = cfg or GemvConfig()
    k_in, n = wt.shape
    _check_x(x, k_in)
    _check_k(k, k_in)
    x = x.contiguous()
    bsz = x.shape[0]
    sparse = k is not None and k < k_in
    if sparse:
        thr, cut, _ = meta if meta is not None else select_rows(x, k)
    else:
        thr = cut = torch.empty(1, dtype=torch.int32, device=x.device)
    split, per = _launch_split(k_in, cfg)
    use_dot = bsz > 1 if cfg.use_dot is None else cfg.use_dot
    bb = max(16, triton.next_power_of_2(bsz)) if use_dot else 1
    part = torch.empty(split, bsz, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, cfg.block_n), split)
    _sparse_gemv_kernel[grid](
        x,
        wt,
        part,
        thr,
        cut,
        thr,
        bsz,
        k_in,
        n,
        per,
        BB=bb,
        BLOCK_K=cfg.block_k,
        BLOCK_N=cfg.block_n,
        SPARSE=sparse,
        USE_DOT=use_dot,
        DOT_F32=x.device.type == "cpu",
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    y = part[0] if split == 1 else part.sum(0)
    return y.to(out_dtype or x.dtype)


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Ternary ``codes`` [N, K] (``nn.Linear`` layout, values in {-1, 0, 1}) -> int32
    [K, ceil(N/16)].

    Column ``16 q + j`` of input row ``i`` sits in bits ``2j..2j+1`` of ``P[i, q]`` as
    ``code + 1``; columns past ``N`` (padding to a multiple of 16) hold code 0 (weight 0).
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be [out_features, in_features], got {tuple(codes.shape)}")
    n, k_in = codes.shape
    c = codes.t().to(torch.int64) + 1  # [K, N] in {0, 1, 2}
    if bool(((c < 0) | (c > 2)).any()):
        raise ValueError("ternary codes must be in {-1, 0, 1}")
    pad = -n % 16
    if pad:
        c = torch.cat([c, torch.ones(k_in, pad, dtype=c.dtype, device=c.device)], dim=1)
    c = c.reshape(k_in, (n + pad) // 16, 16)
    shifts = 2 * torch.arange(16, device=codes.device, dtype=torch.int64)
    packed = (c << shifts).sum(-1)  # < 2^32, fits int64
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32).contiguous()


def unpack_ternary(packed: torch.Tensor, n_out: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: int32 [K, NQ] -> int8 codes [n_out, K]
    (``n_out`` default ``16 * NQ``)."""
    k_in, nq = packed.shape
    shifts = 2 * torch.arange(16, device=packed.device, dtype=torch.int64)
    c = (packed.to(torch.int64)[:, :, None] >> shifts) & 3
    c = c.reshape(k_in, nq * 16)[:, : (n_out or nq * 16)]
    return (c - 1).t().to(torch.int8).contiguous()


def ternarize(weight: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, float]:
    """BitNet b1.58 absmean ternarization of a ``[N, K]`` weight: (int8 codes, alpha)."""
    alpha = weight.detach().float().abs().mean().clamp_min(eps)
    codes = (weight.detach().float() / alpha).round().clamp(-1, 1).to(torch.int8)
    return codes, float(alpha)


def ternary_gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    alpha: float | torch.Tensor,
    k: int | None = None,
    act_bits: int | None = 8,
    cfg: GemvConfig | None = None,
    out_dtype: torch.dtype | None = None,
    n_out: int | None = None,
    meta: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``y[B, N] = alpha * (Q(x) * M) @ T`` with ``T = unpack_ternary(packed, N).T`` ([K, N]).

    ``Q``: per-row absmax quantization to ``act_bits`` (``None``: none), ``M``: top-``k`` of
    |x| (``None``: dense). ``alpha``: a float or an fp32 [N] tensor (one scale per output
    column, for fused projections such as q|k|v). Only weight rows kept by some batch row are
    read. ``meta``: precomputed :func:`select_rows` ``(x, k)``.
    """
    import triton

    from ._gemv_triton import _ternary_gemv_kernel

    cfg = cfg or GemvConfig(block_k=32, block_n=256, split=8)
    k_in, nq = packed.shape
    n = nq * 16
    _check_x(x, k_in)
    _check_k(k, k_in)
    if packed.dtype != torch.int32:
        raise ValueError(f"packed must be int32 (pack_ternary), got {packed.dtype}")
    qmax = 0 if act_bits is None else 2 ** (act_bits - 1) - 1
    x = x.contiguous()
    bsz = x.shape[0]
    sparse = k is not None and k < k_in
    thr, cut, gamma = meta if meta is not None else select_rows(x, k if sparse else None)
    split, per = _launch_split(k_in, cfg)
    use_dot = bsz > 1 if cfg.use_dot is None else cfg.use_dot
    bb = max(16, triton.next_power_of_2(bsz)) if use_dot else 1
    bq = max(1, cfg.block_n // 16)
    part = torch.empty(split, bsz, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(nq, bq), split)
    alpha_vec = isinstance(alpha, torch.Tensor)
    if alpha_vec:
        alpha = alpha.to(device=x.device, dtype=torch.float32).contiguous()
        if alpha.numel() not in (n, n_out or n) or alpha.numel() == 0:
            raise ValueError(
                f"alpha must be a float or an [{n_out or n}] tensor, got {tuple(alpha.shape)}"
            )
        if alpha.numel() < n:  # padded columns: scale 0
            alpha = torch.cat([alpha, alpha.new_zeros(n - alpha.numel())])
    _ternary_gemv_kernel[grid](
        x,
        packed,
        part,
        thr,
        cut,
        gamma,
        alpha if alpha_vec else gamma,
        0.0 if alpha_vec else float(alpha),
        bsz,
        k_in,
        nq,
        per,
        BB=bb,
        BLOCK_K=cfg.block_k,
        BQ=bq,
        ALPHA_VEC=alpha_vec,
        SPARSE=sparse,
        QMAX=qmax,
        USE_DOT=use_dot,
        DOT_F32=x.device.type == "cpu",
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    y = part[0] if split == 1 else part.sum(0)
    if n_out is not None and n_out != n:
        y = y[:, :n_out]
    return y.to(out_dtype or x.dtype)  # scales by gamma / Q and alpha applied in the kernel


def sparse_gemv_reference(x: torch.Tensor, wt: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """fp32 reference of :func:`sparse_gemv`: ``(x * topk_mask(x, k)) @ wt``, cast to x.dtype."""
    xs = x * topk_mask(x, k) if k is not None and k < x.shape[-1] else x
    acc = torch.promote_types(x.dtype, torch.float32)
    return (xs.to(acc) @ wt.to(acc)).to(x.dtype)


def ternary_gemv_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    alpha: float | torch.Tensor,
    k: int | None = None,
    act_bits: int | None = 8,
    n_out: int | None = None,
) -> torch.Tensor:
    """fp32 reference of :func:`ternary_gemv` (dequantized activations times alpha * T)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xq = absmax_quantize(x.to(acc), act_bits, ste=False) if act_bits else x.to(acc)
    if k is not None and k < x.shape[-1]:
        xq = xq * topk_mask(x, k)
    t = unpack_ternary(packed, n_out).to(acc)  # [N, K]
    return (xq @ t.t() * alpha).to(x.dtype)
