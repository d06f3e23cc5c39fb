"""Diagnostic: where a batch-1 sparse decode GEMV's time goes, and loop variants tried for it
(4096 -> 11008 bf16, S=0.6, H100).

1. Selection breakdown (profiler kernel times, L2-warm): a one-program kernel that loads x and
   stores its keys (the floor), then the same plus 1, 2 or 3 radix passes, plus the kept-input
   list; and an exponent-relative variant (max exponent, 32 binades below it, then one
   mantissa histogram), checked against :func:`qsparse.kernels.gemv.compact_rows`.
2. GEMV loop variants over a given kept-input list, each against cuBLAS in the same run (CUDA
   graph over 8 weight copies, so L2 cannot serve them): ``pipe`` = ``tl.range(...,
   num_stages=S)`` (Triton's software pipeliner, what ``qsparse`` uses), ``unrolled`` = D tiles'
   loads issued back to back per step; both with and without ``evict_first`` on the weights,
   on row-major weights and on 64-wide column panels.

    PYTHONPATH=$PWD python3 benchmarks/gemv_variants.py [sel] [gemv]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from benchmarks._figures import emit, slug
from benchmarks._timing import kernel_times, time_graph
from qsparse.kernels import gemv as G
from qsparse.kernels._gemv_triton import _list_kept, _threshold_radix
from qsparse.kernels._topk_rule import abs_key as _abs_key


@triton.jit
def _weight_tile(w_ptr, r, pm, row_stride, BN: tl.constexpr, EVICT: tl.constexpr):
    wc = tl.arange(0, BN)
    ptrs = w_ptr + r.to(tl.int64)[:, None] * row_stride + wc[None, :]
    if EVICT:
        return tl.load(ptrs, mask=pm[:, None], other=0.0, eviction_policy="evict_first")
    return tl.load(ptrs, mask=pm[:, None], other=0.0)


@triton.jit
def _gemv_pipe(
    idx_ptr,
    val_ptr,
    w_ptr,
    y_ptr,
    n_kept,
    row_stride,
    block_stride,
    PPP: tl.constexpr,
    BK: tl.constexpr,
    BN: tl.constexpr,
    STAGES: tl.constexpr,
    EVICT: tl.constexpr,
):
    """Tiles of BK listed rows in a software-pipelined loop, STAGES tiles in flight."""
    pid = tl.program_id(0)
    w_ptr = w_ptr + (pid // PPP).to(tl.int64) * block_stride + (pid % PPP) * BN
    acc = tl.zeros([BK, BN], dtype=tl.float32)
    for p0 in tl.range(0, n_kept, BK, num_stages=STAGES):
        p = p0 + tl.arange(0, BK)
        pm = p < n_kept
        r = tl.load(idx_ptr + p, mask=pm, other=0)
        v = tl.load(val_ptr + p, mask=pm, other=0.0)
        acc += v[:, None] * _weight_tile(w_ptr, r, pm, row_stride, BN, EVICT).to(tl.float32)
    cols = pid * BN + tl.arange(0, BN)
    tl.store(y_ptr + cols, tl.sum(acc, axis=0).to(y_ptr.dtype.element_ty))


@triton.jit
def _gemv_unrolled(
    idx_ptr,
    val_ptr,
    w_ptr,
    y_ptr,
    n_kept,
    row_stride,
    block_stride,
    PPP: tl.constexpr,
    BK: tl.constexpr,
    BN: tl.constexpr,
    DEPTH: tl.constexpr,
    EVICT: tl.constexpr,
):
    """DEPTH tiles per step, their loads issued back to back (register prefetch)."""
    pid = tl.program_id(0)
    w_ptr = w_ptr + (pid // PPP).to(tl.int64) * block_stride + (pid % PPP) * BN
    acc = tl.zeros([BK, BN], dtype=tl.float32)
    for p0 in range(0, n_kept, BK * DEPTH):
        for d in tl.static_range(DEPTH):
            p = p0 + d * BK + tl.arange(0, BK)
            pm = p < n_kept
            r = tl.load(idx_ptr + p, mask=pm, other=0)
            v = tl.load(val_ptr + p, mask=pm, other=0.0)
            acc += v[:, None] * _weight_tile(w_ptr, r, pm, row_stride, BN, EVICT).to(tl.float32)
    cols = pid * BN + tl.arange(0, BN)
    tl.store(y_ptr + cols, tl.sum(acc, axis=0).to(y_ptr.dtype.element_ty))


@triton.jit
def _selection_probe(
    x_ptr,
    out_ptr,
    idx_ptr,
    val_ptr,
    K,
    k,
    BLOCK: tl.constexpr,
    DBITS: tl.constexpr,
    NPASS: tl.constexpr,
    LIST: tl.constexpr,
):
    """NPASS = 0: load x, store its keys (the floor); else NPASS radix passes (bf16 keys,
    5-bit digits), then the list (LIST) or just the keys again."""
    i = tl.arange(0, BLOCK)
    valid = i < K
    xf = tl.load(x_ptr + i, mask=valid, other=0.0).to(tl.float32)
    key = tl.where(valid, _abs_key(xf), -1)
    if NPASS == 0:
        tl.store(out_ptr + i, key)
    else:
        thr, need = _threshold_radix(key, valid, K, k, BLOCK, 16, NPASS, DBITS)
        if LIST:
            _list_kept(key, xf, i, thr, need, idx_ptr, val_ptr)
        else:
            tl.store(out_ptr + i, key + thr + need)


@triton.jit
def _selection_exponent_first(
    x_ptr,
    idx_ptr,
    val_ptr,
    K,
    k,
    BLOCK: tl.constexpr,
    LOW2: tl.constexpr,
    NDIG2: tl.constexpr,
    DBITS2: tl.constexpr,
):
    """First pass on exponents relative to the row's largest (32 bins: 0..30 binades below
    it, 31 = further down, which this probe does not handle), then the mantissa bits of the
    chosen binade by radix, then the list."""
    i = tl.arange(0, BLOCK)
    valid = i < K
    xf = tl.load(x_ptr + i, mask=valid, other=0.0).to(tl.float32)
    key = tl.where(valid, _abs_key(xf), -1)
    e = key >> 23
    emax = tl.max(e, axis=0)
    off = tl.where(valid, tl.minimum(emax - e, 31), 31)
    bins = tl.arange(0, 32)
    h = tl.histogram(off, 32) - tl.where(bins == 31, BLOCK - K, 0)
    cum = tl.cumsum(h, axis=0)
    best = tl.min(tl.where(cum >= k, bins, 31), axis=0)
    both = tl.sum(tl.where(bins == best, (cum - h) * 65536 + h, 0), axis=0)
    match = valid & (off == best)
    pref, need = _threshold_radix(
        key, match, both & 65535, k - (both >> 16), BLOCK, LOW2, NDIG2, DBITS2
    )
    _list_kept(key, xf, i, ((emax - best) << 23) | pref, need, idx_ptr, val_ptr)


def kernel_us(fn, reps: int = 50) -> float:
    """Mean device microseconds per call of the kernels ``fn`` launches (L2-warm)."""
    return sum(kernel_times(fn, reps).values())


def _selection_rows(kin: int) -> None:
    """Selection timings for one row width (S=0.6, bf16)."""
    x = torch.randn(1, kin, device="cuda", dtype=torch.bfloat16)
    k = int(0.4 * kin)
    block = triton.next_power_of_2(kin)
    out = torch.empty(block, dtype=torch.int32, device="cuda")
    idx = torch.empty(kin, dtype=torch.int32, device="cuda")
    val = torch.empty(kin, dtype=torch.float32, device="cuda")
    ref_idx = G.compact_rows(x, k)[0][:k]

    def probe(npass: int, lst: int, warps: int) -> None:
        _selection_probe[(1,)](
            x,
            out,
            idx,
            val,
            kin,
            k,
            BLOCK=block,
            DBITS=5,
            NPASS=npass,
            LIST=lst,
            num_warps=warps,
        )

    def exponent_first(dbits: int, ndig: int, low: int, warps: int) -> None:
        _selection_exponent_first[(1,)](
            x,
            idx,
            val,
            kin,
            k,
            BLOCK=block,
            LOW2=low,
            NDIG2=ndig,
            DBITS2=dbits,
            num_warps=warps,
        )

    for warps in (4, 8):
        for npass, lst in [(0, 0), (1, 0), (2, 0), (3, 0), (3, 1)]:
            t = kernel_us(lambda n=npass, li=lst, w=warps: probe(n, li, w))
            print(f"K={kin} {warps} warps: {npass} passes, list {bool(lst)}: {t:.2f} us")
            emit(f"variants.sel.K{kin}.w{warps}.passes{npass}{'.list' if lst else ''}", t, "us")
        for dbits, ndig, low in [(7, 1, 16), (4, 2, 15)]:
            t = kernel_us(lambda d=dbits, nd=ndig, lo=low, w=warps: exponent_first(d, nd, lo, w))
            exact = torch.equal(idx[:k], ref_idx)  # idx as the last timed call left it
            print(
                f"K={kin} {warps} warps: exponent first, mantissa {ndig}x{dbits} bits: "
                f"{t:.2f} us, list exact: {exact}"
            )
            emit(f"variants.sel.K{kin}.w{warps}.exponent_first_{ndig}x{dbits}", t, "us")
    t_list = kernel_us(lambda: G.compact_rows(x, k))
    t_topk = kernel_us(lambda: torch.topk(x.float().abs(), k))
    print(f"K={kin} compact_rows: {t_list:.2f} us")
    print(f"K={kin} torch.topk: {t_topk:.2f} us")
    emit(f"variants.sel.K{kin}.compact_rows", t_list, "us")
    emit(f"variants.sel.K{kin}.torch_topk", t_topk, "us")


def selection_breakdown() -> None:
    print("## selection breakdown, S=0.6, bf16 (kernel us, profiler, L2-warm)")
    for kin in (4096, 2048, 5632):
        _selection_rows(kin)


def _loop_rows(ws, panel, x, k, t_dense) -> list[tuple[float, str]]:
    """Every loop variant on one weight layout (None: row-major, else panel width)."""
    idx, val, _ = G.compact_rows(x, k)
    wts = [G.prepare_dense(w, panel) for w in ws]
    ref = G.sparse_gemv_reference(x, wts[0], k).float()
    _, n_pad, _, row_stride, block_stride, ppp = G._panels(wts[0], G.GemvConfig())
    y = torch.empty(1, n_pad, device="cuda", dtype=torch.bfloat16)

    def call(wt, kern, opts, bk, warps, evict):
        kern[(n_pad // 64,)](
            idx,
            val,
            wt,
            y,
            k,
            row_stride,
            block_stride,
            PPP=ppp,
            BK=bk,
            BN=64,
            EVICT=evict,
            num_warps=warps,
            **opts,
        )

    variants = [(_gemv_pipe, "pipe", {"STAGES": s}) for s in (2, 3, 4, 6)]
    variants += [(_gemv_unrolled, "unrolled", {"DEPTH": d}) for d in (2, 4)]
    results = []
    for kern, tag, opts in variants:
        for bk, warps in [(32, 4), (64, 4), (64, 8), (128, 4), (128, 8)]:
            for evict in (0, 1):
                args = (kern, opts, bk, warps, evict)
                call(wts[0], *args)
                err = ((y.float() - ref).norm() / ref.norm()).item()
                t = time_graph([lambda wt=wt, a=args: call(wt, *a) for wt in wts])
                layout = "row-major" if panel is None else f"panels {panel}"
                name = f"{tag} {opts} {layout} {bk}x64 {warps} warps evict_first={bool(evict)}"
                print(f"{name}: {t:.2f} us {t_dense / t:.2f}x (rel err {err:.1e})", flush=True)
                emit(f"variants.gemv.{slug(name)}.us", t, "us")
                emit(f"variants.gemv.{slug(name)}", t_dense / t)
                results.append((t, name))
    return results


def loop_variants() -> None:
    print("## GEMV loop variants over a given list, 4096 -> 11008, S=0.6, us per call")
    kin, n = 4096, 11008
    ws = [torch.randn(n, kin, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(8)]
    x = torch.randn(1, kin, device="cuda", dtype=torch.bfloat16)
    k = int(0.4 * kin)
    t_dense = time_graph([lambda w=w: F.linear(x, w) for w in ws])
    print(f"cuBLAS dense: {t_dense:.2f} us")
    emit("variants.gemv.cublas_dense.us", t_dense, "us")
    results = []
    for panel in (None, 64):
        results += _loop_rows(ws, panel, x, k, t_dense)
        torch.cuda.empty_cache()
    results.sort()
    print("## fastest 8")
    for t, name in results[:8]:
        print(f"RATIO {t_dense / t:.2f} ({t:.2f} us) {name}")


if __name__ == "__main__":
    parts = sys.argv[1:] or ["sel", "gemv"]
    torch.manual_seed(0)
    print(torch.cuda.get_device_name())
    if "sel" in parts:
        selection_breakdown()
    if "gemv" in parts:
        loop_variants()
