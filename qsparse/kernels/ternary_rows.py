"""Batch-1 sparse-input ternary GEMV on input-major packed weights (BitNet b1.58 + Q-Sparse).

:func:`qsparse.kernels.gemv.ternary_gemv` packs the 2-bit codes 16 per int32 *along K*
([ceil(K/16), N]), so that ``dp4a`` takes four int8 activations at once. With top-k on the
input, a word is skipped only when all 16 of its inputs are dropped (at S = 0.6: 0.6^16, about
never), so the sparse kernel reads what the dense one reads. Here the codes are packed *along
N* (:func:`pack_ternary_rows`: input ``i``'s N codes in ``ceil(N/16)`` contiguous words), and
the GEMV reads only the rows of the kept inputs, as :func:`~qsparse.kernels.gemv.sparse_gemv`
does for float weights: at S = 0.6, 40% of the K-packed bytes (5% of bf16).

:func:`ternary_rows_gemv` computes the same ``y = alpha * (Q8(v) * M) @ T`` as
``ternary_gemv(v, pack_ternary(codes), alpha, k)`` (``Q8``: per-row absmax int8, ``M``: top-k
of |v|), exactly in int32 up to the final float scaling, with two kernels: one program makes
the site input ``v`` (x, or its :class:`~qsparse.kernels.gemv.Producer`'s output), quantizes
it, selects its top-k (from the carried threshold ``hint``) and lists the kept inputs with
their int8 codes; the GEMV streams those rows (unpacking the 2-bit fields with shifts and
masks, two outputs per int32 multiply). Batch 1 only (decode keeps the
K-packed layout for batch 2-16 and for dense BitNet). It runs inside the custom op
``qsparse::ternary_rows_gemv`` (no ``torch.compile`` graph break) and, on CPU tensors, under
``TRITON_INTERPRET=1`` (tests). Reference: :func:`ternary_rows_gemv_reference`.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .gemv import (
    NO_PRODUCER,
    GemvConfig,
    Producer,
    _alpha_arg,
    _cfg_from_ints,
    _cfg_ints,
    _check_k,
    _check_x,
    _gemv_launch_opts,
    _gemv_outputs,
    _hint_arg,
    _interpreted,
    _pdl_ok,
    _prod_args,
    _radix_digits,
    _semaphores,
    pack_ternary,
    select_warps_for,
    ternary_gemv_reference,
)

__all__ = [
    "ROWS_CONFIG",
    "ROWS_PROGRAMS",
    "pack_ternary_rows",
    "ternary_rows_config_for",
    "ternary_rows_gemv",
    "ternary_rows_gemv_reference",
    "ternary_rows_list",
    "unpack_ternary_rows",
]

#: launch shape of the GEMV before the split is chosen (not yet tuned on a GPU:
#: benchmarks/ternary_sparse_gemv.py sweeps block_k / block_n / warps / stages): tiles of 64
#: kept rows x 128 outputs (32 bytes of each row, one sector)
ROWS_CONFIG = GemvConfig(block_k=64, block_n=128, num_warps=4, num_stages=3)
#: programs the GEMV aims for (about four per SM of an H200), by splitting the list
ROWS_PROGRAMS = 528
#: widest input the one-program list kernel takes (its scan packs two counts in an int32)
MAX_IN = 32767
#: tiles a row slot of the GEMV sums before its packed halves are decoded (128 * 128 < 2^15)
FLUSH = 128


def ternary_rows_config_for(
    n: int, k: int, cfg: GemvConfig = ROWS_CONFIG, programs: int = ROWS_PROGRAMS
) -> GemvConfig:
    """``cfg`` with the list of ``k`` kept rows split over up to 16 programs per column block
    so that ``n`` outputs give about ``programs`` programs, each keeping at least two tiles
    (7B at S = 0.6 with the default shape: down 16, o 13, q|k|v 5, gate|up 3)."""
    blocks = -(-n // cfg.block_n)
    tiles = -(-k // cfg.block_k)
    return replace(cfg, split=max(1, min(16, programs // blocks, tiles // 2)))


def pack_ternary_rows(codes: torch.Tensor, align: int = 256) -> torch.Tensor:
    """Ternary ``codes`` [N, K] (``nn.Linear`` layout, values in {-1, 0, 1}) -> int32
    [K, N' / 16], ``N'`` = N padded to a multiple of ``align`` (a multiple of 16) with zero
    weights.

    Word ``P[i, w]`` holds outputs ``16w .. 16w + 15`` of input ``i`` as ``code + 1``, output
    ``16w + j`` in bits ``2j .. 2j + 1``: a kept input reads one contiguous row of ``N' / 16``
    words. (``align`` 256: a row is a multiple of 64 bytes, so rows stay 16-byte aligned and
    Triton sees the row length divisible by 16.)
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be [out_features, in_features], got {tuple(codes.shape)}")
    if align < 16 or align % 16:
        raise ValueError(f"align must be a positive multiple of 16 (outputs), got {align}")
    n, k_in = codes.shape
    c = codes.to(torch.int64) + 1  # [N, K] in {0, 1, 2}
    if bool(((c < 0) | (c > 2)).any()):
        raise ValueError("ternary codes must be in {-1, 0, 1}")
    pad = -n % align
    if pad:
        c = torch.cat([c, torch.ones(pad, k_in, dtype=c.dtype, device=c.device)], dim=0)
    shifts = 2 * torch.arange(16, device=c.device, dtype=torch.int64)
    words = (c.t().reshape(k_in, -1, 16) << shifts).sum(-1)  # [K, W], < 2^32
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).contiguous()


def unpack_ternary_rows(packed: torch.Tensor, out_features: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_ternary_rows`: int32 [K, W] -> int8 codes [out_features, K]
    (``out_features`` default ``16 * W``)."""
    k_in, w = packed.shape
    shifts = 2 * torch.arange(16, device=packed.device, dtype=torch.int64)
    c = (packed.to(torch.int64)[:, :, None] >> shifts) & 3  # [K, W, 16]
    c = c.reshape(k_in, 16 * w)[:, : (out_features or 16 * w)]
    return (c - 1).t().to(torch.int8).contiguous()


def ternary_rows_gemv_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    alpha: float | torch.Tensor,
    k: int | None = None,
    act_bits: int = 8,
    producer: Producer = NO_PRODUCER,
) -> torch.Tensor:
    """fp32 reference of :func:`ternary_rows_gemv` ([B, N'], padding kept): the K-packed
    :func:`~qsparse.kernels.gemv.ternary_gemv_reference` on the same codes, of the site input
    ``producer.reference(x)``."""
    codes = unpack_ternary_rows(packed)
    return ternary_gemv_reference(producer.reference(x), pack_ternary(codes), alpha, k, act_bits)


def ternary_rows_gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    alpha: float | torch.Tensor,
    k: int | None,
    act_bits: int = 8,
    cfg: GemvConfig | None = None,
    out_dtype: torch.dtype | None = None,
    hint: torch.Tensor | None = None,
    producer: Producer = NO_PRODUCER,
    n_out: int | None = None,
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``y[1, N'] = alpha * (Q(v) * M) @ T`` for one token, ``T = unpack_ternary_rows(packed).T``
    ([K, N']), ``v = producer.reference(x)`` (x itself by default; an RMSNorm of x, or
    ``act(g) * u`` of x = [g | u], computed by the selection kernel when it can:
    :meth:`~qsparse.kernels.gemv.Producer.fuses`).

    ``Q``: per-row absmax quantization to ``act_bits`` (2..8) bits, ``M``: the top-``k`` of
    |v| (``None``: every input, read as a list). ``alpha``: a float or an fp32 [N'] tensor.
    ``cfg`` default: :func:`ternary_rows_config_for` the shape (``block_k``: kept rows per
    tile, ``block_n``: outputs per program, a power of two >= 16, ``split``: programs sharing
    a column block). ``hint``: the site's threshold carry
    (:func:`~qsparse.kernels.gemv.new_hint`, updated in place). ``n_out``: keep the first
    ``n_out`` columns (drops the padding). ``rows``: :func:`ternary_rows_list` of the same
    ``(x, k, act_bits)`` when already computed (the selection is then skipped).
    """
    if producer.kind != "none" and not producer.fuses(x):
        x, producer = producer.reference(x), NO_PRODUCER
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(
            f"packed must be a 2-D int32 tensor (pack_ternary_rows), got {packed.dtype} "
            f"{tuple(packed.shape)}"
        )
    k_in, words = packed.shape
    _check_x(x, producer.width(k_in))
    if x.shape[0] != 1:
        raise ValueError(f"ternary_rows_gemv takes one token (batch 1), got {x.shape[0]}")
    if k_in > MAX_IN:
        raise ValueError(f"ternary_rows_gemv takes up to {MAX_IN} inputs, the weight has {k_in}")
    k = k_in if k is None else k
    _check_k(k, k_in)
    if not 2 <= act_bits <= 8:
        raise ValueError(f"act_bits must be in [2, 8] for the ternary kernel, got {act_bits}")
    cfg = cfg or ternary_rows_config_for(16 * words, k)
    bn = cfg.block_n
    if bn < 16 or bn & (bn - 1) or cfg.block_k < 1 or cfg.block_k & (cfg.block_k - 1):
        raise ValueError(
            f"cfg.block_n ({bn}) must be a power of two >= 16 and cfg.block_k "
            f"({cfg.block_k}) a power of two"
        )
    _radix_digits(x.dtype, cfg.digit_bits)  # validates digit_bits
    alpha_vec, alpha_f = _alpha_arg(alpha, 16 * words, x.device)
    code, w, eps = _prod_args(producer, x)
    y = ternary_rows_gemv_op(
        x.contiguous(),
        packed,
        alpha_vec,
        alpha_f,
        k,
        act_bits,
        out_dtype or x.dtype,
        _cfg_ints(cfg),
        _hint_arg(hint, 1, x.device),
        code,
        w,
        eps,
        *(rows if rows is not None else (None, None, None)),
    )
    return y[:, :n_out] if n_out is not None else y


@torch.library.custom_op("qsparse::ternary_rows_gemv", mutates_args=("hint",))
def ternary_rows_gemv_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    alpha_vec: torch.Tensor | None,
    alpha_f: float,
    k: int,
    act_bits: int,
    out_dtype: torch.dtype,
    cfg: list[int],
    hint: torch.Tensor,
    prod: int,
    prod_w: torch.Tensor,
    eps: float,
    idx: torch.Tensor | None,
    qv: torch.Tensor | None,
    scale: torch.Tensor | None,
) -> torch.Tensor:
    """Launch behind :func:`ternary_rows_gemv` (validated arguments; ``alpha_vec`` None: the
    scalar ``alpha_f``; ``cfg``: ``_cfg_ints``; ``hint`` updated in place, empty: none;
    ``prod``/``prod_w``/``eps``: the fused producer; ``idx``/``qv``/``scale``: the list when
    given, else the list kernel runs). Returns [1, N'] in ``out_dtype``."""
    import triton

    from ._ternary_rows_triton import _ternary_rows_gemv_kernel

    cfg = _cfg_from_ints(cfg)
    k_in, words = packed.shape
    interp = _interpreted(x)
    pdl = cfg.pdl and idx is None and _pdl_ok(x)
    if idx is None:
        idx, qv, scale = _list_launch(x, k_in, k, act_bits, cfg, hint, prod, prod_w, eps, pdl)
    n = 16 * words
    bw = cfg.block_n // 16
    split = max(1, cfg.split)
    grid = (triton.cdiv(words, bw), split)
    y, part = _gemv_outputs(x, 1, n, out_dtype, split, interp)
    sem = _semaphores(x.device, grid[0]) if split > 1 else idx
    _ternary_rows_gemv_kernel[grid](
        idx,
        qv,
        scale,
        packed,
        y,
        alpha_vec if alpha_vec is not None else scale,
        alpha_f,
        part,
        sem,
        k,
        words,
        BK=cfg.block_k,
        BN=cfg.block_n,
        SPLIT=split,
        STAGES=cfg.num_stages,
        FLUSH=FLUSH,
        ALPHA_VEC=alpha_vec is not None,
        CMASK=words % bw != 0,
        **_gemv_launch_opts(cfg, pdl, interp),
    )
    return y.to(out_dtype)


@ternary_rows_gemv_op.register_fake
def _ternary_rows_gemv_fake(
    x, packed, alpha_vec, alpha_f, k, act_bits, out_dtype, cfg, hint, prod, prod_w, eps, *rows
):
    return x.new_empty((1, 16 * packed.shape[1]), dtype=out_dtype)


def _list_launch(
    x: torch.Tensor,
    k_in: int,
    k: int,
    act_bits: int,
    cfg: GemvConfig,
    hint: torch.Tensor,
    prod: int,
    prod_w: torch.Tensor,
    eps: float,
    pdl: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The list kernel (:func:`~qsparse.kernels._ternary_rows_triton._ternary_list_kernel`):
    (idx int32 [K], qv int32 [K], scale fp32 [1]), the first ``k`` entries used."""
    import triton

    from ._ternary_rows_triton import _ternary_list_kernel

    idx = torch.empty(k_in, dtype=torch.int32, device=x.device)
    qv = torch.empty(k_in, dtype=torch.int32, device=x.device)
    scale = torch.empty(1, dtype=torch.float32, device=x.device)
    low, ndig = _radix_digits(x.dtype, cfg.digit_bits)
    _ternary_list_kernel[(1,)](
        x,
        idx,
        qv,
        scale,
        hint if hint.numel() else idx,
        prod_w if prod_w.numel() else idx,
        eps,
        k_in,
        k,
        BLOCK=triton.next_power_of_2(k_in),
        QMAX=2 ** (act_bits - 1) - 1,
        LOW=low,
        NDIG=ndig,
        DBITS=cfg.digit_bits,
        HINT=hint.numel() > 0,
        PROD=prod,
        BF16=x.dtype == torch.bfloat16,
        PDL=pdl,
        num_warps=select_warps_for(k_in, cfg.select_warps),
    )
    return idx, qv, scale


def ternary_rows_list(
    x: torch.Tensor,
    k: int,
    act_bits: int = 8,
    cfg: GemvConfig = ROWS_CONFIG,
    hint: torch.Tensor | None = None,
    producer: Producer = NO_PRODUCER,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The selection half of :func:`ternary_rows_gemv` alone, for ``rows=`` (one token,
    ``x``: [1, K], or what ``producer`` reads): (idx int32 [K], qv int32 [K], scale fp32 [1]):
    ``idx[:k]`` the kept inputs ascending, ``qv[:k]`` their int8 absmax codes, ``scale =
    gamma / Q``. ``cfg``: its ``digit_bits`` and ``select_warps``."""
    if producer.kind != "none" and not producer.fuses(x):
        x, producer = producer.reference(x), NO_PRODUCER
    k_in = x.shape[-1] // 2 if producer.kind.endswith("_glu") else x.shape[-1]
    _check_x(x, producer.width(k_in))
    if x.shape[0] != 1 or k_in > MAX_IN or not 2 <= act_bits <= 8:
        raise ValueError(
            f"ternary_rows_list takes one token of up to {MAX_IN} inputs and act_bits in "
            f"[2, 8], got x {tuple(x.shape)}, act_bits {act_bits}"
        )
    _check_k(k, k_in)
    code, w, eps = _prod_args(producer, x)
    hint = _hint_arg(hint, 1, x.device)
    return _list_launch(x.contiguous(), k_in, k, act_bits, cfg, hint, code, w, eps, False)
