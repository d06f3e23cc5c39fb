"""Weight-only int8 GEMV for the lm head at decode (issue 11: in BitNet b1.58 modes the
projections are 2-bit, so the bf16 head, vocab x hidden, is the largest single read per token).

Quantization (:func:`quantize_int8_rows`, once, when the decode view is built): per output row
``v`` of ``W`` [V, D], symmetric round-to-nearest,

    scale[v] = max_d |W[v, d]| / 127,    q[v, d] = round(W[v, d] / scale[v])  in [-127, 127]

(a zero row gets scale 0 and codes 0). Layout: ``q`` row-major int8 [V, D] (half the bf16
bytes; one output's inputs contiguous) and ``scale`` fp32 [V].

Product (:func:`int8_gemv`): ``y[b, v] = scale[v] * sum_d x[b, d] * q[v, d]`` with fp32
accumulation, output in the activation dtype. Batch 1-16 (:data:`MAX_ROWS`) on CUDA (or on CPU
under ``TRITON_INTERPRET=1``) runs the Triton kernel (``_int8_gemv_triton``) inside the custom
op ``qsparse::int8_gemv`` (``torch.compile`` traces it without a graph break); elsewhere, and
for more rows (prompt prefill), :func:`int8_gemv_reference` (pure PyTorch, fp32).

Why a kernel of our own: PyTorch's ``torch._weight_int8pack_mm(x, q, scale)`` computes the same
product (same layout) and exists in the 2.13 CPU build; its CUDA kernel (``int8mm.cu``) is one
thread per output looping over D, each thread reading its own row (no coalescing across
threads), not a bandwidth-bound GEMV. ``benchmarks/int8_head_gemv.py`` times it beside this
kernel and cuBLAS where it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from . import kernels_available
from .gemv import _interpreted  # CPU tensors reach a kernel only under the interpreter

__all__ = [
    "INT8_BATCH_CONFIG",
    "INT8_CONFIG",
    "MAX_ROWS",
    "Int8GemvConfig",
    "dequantize_int8_rows",
    "int8_config_for",
    "int8_gemv",
    "int8_gemv_reference",
    "quantize_int8_rows",
]

#: most rows (tokens) per call the kernel takes; more run :func:`int8_gemv_reference`
MAX_ROWS = 16
#: largest int8 code (symmetric: -127..127)
QMAX = 127


@dataclass(frozen=True)
class Int8GemvConfig:
    """Launch shape of the int8 GEMV: ``block_v`` outputs per program, ``block_d`` inputs per
    tile (int8: ``block_d`` bytes per output row per tile), ``num_warps``, ``num_stages``
    (tiles in flight in the pipelined loop)."""

    block_v: int = 32
    block_d: int = 256
    num_warps: int = 4
    num_stages: int = 3


#: batch 1 (not tuned on a GPU yet: ``benchmarks/int8_head_gemv.py`` sweeps it)
INT8_CONFIG = Int8GemvConfig()
#: batch 2-16: one ``tl.dot`` of [16, block_d] x [block_d, block_v] per tile
INT8_BATCH_CONFIG = Int8GemvConfig(block_v=64, block_d=128, num_warps=4, num_stages=3)


def int8_config_for(batch: int) -> Int8GemvConfig:
    """The config :func:`int8_gemv` uses without ``cfg``: :data:`INT8_CONFIG` at batch 1,
    else :data:`INT8_BATCH_CONFIG`."""
    return INT8_CONFIG if batch == 1 else INT8_BATCH_CONFIG


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``W`` [V, D] -> (``q`` int8 [V, D], ``scale`` fp32 [V]): per-row symmetric int8,
    ``scale = max|W[v]| / 127``, ``q = round(W / scale)`` (ties to even), computed in fp32.
    Round trip (:func:`dequantize_int8_rows`): ``|W - q * scale| <= scale / 2`` per entry (up to
    fp32 rounding)."""
    if w.dim() != 2:
        raise ValueError(f"quantize_int8_rows: W must be [V, D], got shape {tuple(w.shape)}")
    wf = w.detach().float()
    scale = wf.abs().amax(dim=1) / QMAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (wf / safe[:, None]).round().clamp(-QMAX, QMAX).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_int8_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale[:, None]`` in fp32 [V, D] (the fake-quantized weight)."""
    return q.float() * scale.float()[:, None]


def int8_gemv_reference(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``y[..., v] = scale[v] * sum_d x[..., d] * q[v, d]`` in fp32 (any leading shape, any
    device), cast to ``out_dtype`` (default x's dtype)."""
    y = (x.float() @ q.float().t()) * scale.float()
    return y.to(out_dtype or x.dtype)


def _check(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"q must be a 2-D int8 tensor [V, D], got {q.dtype} {tuple(q.shape)}")
    if scale.shape != (q.shape[0],):
        raise ValueError(
            f"scale must be [{q.shape[0]}] (one per row of q), got {tuple(scale.shape)}"
        )
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, q expects {q.shape[1]}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x.dtype must be bf16/fp16/fp32, got {x.dtype}")


def int8_gemv(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    cfg: Int8GemvConfig | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``y[B, V] = scale[v] * sum_d x[B, d] * q[v, d]`` (fp32 sums, ``out_dtype`` default x's
    dtype) for ``x`` [B, D], ``q``/``scale`` from :func:`quantize_int8_rows`. The Triton kernel
    at B <= :data:`MAX_ROWS` where kernels run (``cfg`` default :func:`int8_config_for`), else
    :func:`int8_gemv_reference`."""
    _check(x, q, scale)
    if x.dim() != 2:
        raise ValueError(f"x must be [batch, D], got shape {tuple(x.shape)}")
    out_dtype = out_dtype or x.dtype
    if not (kernels_available(x) and 1 <= x.shape[0] <= MAX_ROWS) or x.device != q.device:
        return int8_gemv_reference(x, q, scale, out_dtype)
    cfg = cfg or int8_config_for(x.shape[0])
    cfg_ints = [int(getattr(cfg, f.name)) for f in fields(cfg)]
    return int8_gemv_op(x.contiguous(), q, scale.float().contiguous(), out_dtype, cfg_ints)


@torch.library.custom_op("qsparse::int8_gemv", mutates_args=())
def int8_gemv_op(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype, cfg: list[int]
) -> torch.Tensor:
    """The launch behind :func:`int8_gemv` (validated arguments; ``scale`` fp32; ``cfg``: the
    :class:`Int8GemvConfig` fields in order). Returns [B, V] in ``out_dtype``."""
    import triton

    from ._int8_gemv_triton import _int8_gemv_kernel

    c = Int8GemvConfig(*cfg)
    bsz, d = x.shape
    v = q.shape[0]
    y = torch.empty(bsz, v, dtype=out_dtype, device=x.device)
    _int8_gemv_kernel[(triton.cdiv(v, c.block_v),)](
        x,
        q,
        scale,
        y,
        bsz,
        v,
        d,
        BB=1 if bsz == 1 else max(16, triton.next_power_of_2(bsz)),
        BV=c.block_v,
        BD=c.block_d,
        DOT_F32=_interpreted(x) or x.dtype == torch.float32,
        num_warps=c.num_warps,
        num_stages=c.num_stages,
    )
    return y


@int8_gemv_op.register_fake
def _int8_gemv_fake(x, q, scale, out_dtype, cfg):
    return x.new_empty((x.shape[0], q.shape[0]), dtype=out_dtype)
