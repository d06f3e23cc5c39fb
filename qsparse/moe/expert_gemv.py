"""Expert-block decode GEMV: an MoE down projection that streams whole expert blocks.

After :func:`qsparse.moe.moefy`, expert ``e`` owns neurons ``I_e``; permuting the FFN so that
``I_e = [e·m, (e+1)·m)`` (a free relabelling of the intermediate dimension) makes every
expert a contiguous block of ``m`` rows of ``Wt = W_downᵀ`` [F, d]. A decoding token that runs
experts ``sel`` then needs::

    y[n] = Σ_{e ∈ sel} Σ_{r < m} h[e·m + r] · Wt[e·m + r, n]          y: [d]

i.e. a sparse-input GEMV whose kept rows come in blocks known from the router, with no
per-element selection or index list. The Triton kernel gives each program ``BLOCK_N`` output
columns and one of ``SPLIT`` interleaved shares of ``sel`` (fp32 atomics combine the shares
when ``SPLIT > 1``); it loads ``[m, BLOCK_N]`` weight tiles, each ``m`` contiguous rows.
:func:`expert_gemv_reference` is the fp32 torch reference it is tested against (on CPU through
``TRITON_INTERPRET=1``); ``benchmarks/expert_gemv.py`` times it against cuBLAS and the
sparse-input GEMV of :mod:`qsparse.kernels.gemv` at the same kept fraction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def expert_rows(sel: torch.Tensor, m: int) -> torch.Tensor:
    """The rows ``[e·m, (e+1)·m)`` of every expert in ``sel`` [n], ascending per expert."""
    return (sel.long()[:, None] * m + torch.arange(m, device=sel.device)).flatten()


def expert_gemv_reference(h: torch.Tensor, wt: torch.Tensor, sel: torch.Tensor, m: int):
    """fp32 reference: ``h[rows] @ Wt[rows]`` for the rows of the experts ``sel``; ``h`` [F]
    or [1, F], ``wt`` [F, d]; returns [d] (or [1, d]) in ``h``'s dtype."""
    rows = expert_rows(sel, m)
    out = h[..., rows].float() @ wt[rows].float()
    return out.to(h.dtype)


@dataclass(frozen=True)
class ExpertGemvConfig:
    """Launch shape: ``block_n`` output columns per program, ``split`` shares of the expert
    list (fp32 atomics when > 1), ``num_warps``."""

    block_n: int = 64
    split: int = 1
    num_warps: int = 4


try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None

if triton is not None:

    @triton.jit
    def _expert_gemv_kernel(
        h_ptr,
        wt_ptr,
        sel_ptr,
        y_ptr,
        n_sel,
        N,
        M: tl.constexpr,
        M_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SPLIT: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        share = tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        r = tl.arange(0, M_PAD)
        rmask = r < M
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for i in range(share, n_sel, SPLIT):
            e = tl.load(sel_ptr + i).to(tl.int64)
            rows = e * M + r
            hv = tl.load(h_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
            w = tl.load(
                wt_ptr + rows[:, None] * N + cols[None, :],
                mask=rmask[:, None] & cmask[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(hv[:, None] * w, axis=0)
        if SPLIT == 1:
            tl.store(y_ptr + cols, acc, mask=cmask)
        else:
            tl.atomic_add(y_ptr + cols, acc, mask=cmask)


def expert_gemv(
    h: torch.Tensor,
    wt: torch.Tensor,
    sel: torch.Tensor,
    m: int,
    cfg: ExpertGemvConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = Σ_{e ∈ sel} h[I_e] Wt[I_e]`` (module docstring) for one token: ``h`` [F] or
    [1, F], ``wt`` [F, d] row-major contiguous, ``sel`` int32 [n] expert ids, ``m`` rows per
    expert. Returns fp32 [d] (``out``: a preallocated fp32 [d] buffer, zeroed here when
    ``split > 1``)."""
    if triton is None:
        raise RuntimeError("expert_gemv needs Triton")
    cfg = cfg or ExpertGemvConfig()
    f, n = wt.shape
    if f % m or not wt.is_contiguous():
        raise ValueError(f"wt must be contiguous [F, d] with F ({f}) a multiple of m ({m})")
    h = h.reshape(-1)
    if h.numel() != f:
        raise ValueError(f"h has {h.numel()} entries, wt has {f} rows")
    y = out if out is not None else torch.empty(n, device=wt.device, dtype=torch.float32)
    if cfg.split > 1:
        y.zero_()
    grid = (triton.cdiv(n, cfg.block_n), cfg.split)
    _expert_gemv_kernel[grid](
        h,
        wt,
        sel,
        y,
        sel.numel(),
        n,
        M=m,
        M_PAD=triton.next_power_of_2(m),
        BLOCK_N=cfg.block_n,
        SPLIT=cfg.split,
        num_warps=cfg.num_warps,
    )
    return y
