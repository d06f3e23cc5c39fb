"""Where the batch-1 selection's time goes: the one-program list kernel behind decode's
sparse GEMV, built up stage by stage and timed alone.

The compiled 7B step spends 9.3 us a site in ``_compact_kernel`` (docs/decode.md, "Where a
compiled batch-1 step's time goes"), a third of the dense GEMV it replaces. This script times,
per row width K (the preset's site widths) and warp count, one-program kernels that stop after
each stage of that kernel, all made of the same ``@triton.jit`` helpers:

- ``empty``: store one int (the floor of a one-program launch inside a CUDA graph);
- ``load``: read the row, write it back as fp32 (one round trip of the row);
- ``norm``: the producer too (``RMSNorm``: a block reduction, the weight read, two roundings);
- ``thresh``: then the keys and the threshold from the carried hint (one 32-bin histogram);
- ``list``: then the kept list (one packed scan over the row, two scattered stores) - the
  whole selection, as :func:`qsparse.kernels.gemv.compact_rows` runs it (also timed: ``real``);
- ``scan``: the threshold and the scan, but no list written (what the stores cost);
- ``packed``: the list as one int32 per kept input (``bf16 bits << 16 | index``);
- ``idx``: the list of indices only (the GEMV would read the values from the input row);
- ``list1`` / ``packed1``: ``list`` / ``packed`` with the row read through offsets the
  compiler cannot prove contiguous (``i % (K + 1)``), so one input per thread and lane: the
  layout the scattered stores want, with no conversion before them.

- ``thresh_band``: ``thresh`` with only the entries inside the carried band histogrammed,
  those above it counted by a reduction;
- ``packed_w1``: ``packed`` with the carried band fixed at one key value per bin (before the
  band could widen): against ``packed`` with ``--spread``, what the widening saves;
- ``thresh2d`` / ``scan2d`` / ``packed2d`` (``--producer none`` only; ``_c256``, ``_c512``):
  the row read as [K / C, C] so that each C-wide piece is scanned inside one warp, the
  pieces' offsets by a scan of their totals; the threshold over the flattened keys.

``--ternary`` times instead the BitNet b1.58 activation kernel (``_ternary_prep_kernel``:
int8 absmax codes of the row, and with top-k the selection from the carried threshold) per
width and warp count: ``dense`` (no top-k), ``topk`` (carried threshold), ``topk_nohint``
(the full radix select every call), each with the SubLN computed in the kernel (``_subln``)
or not; ratios against ``dense``.

``--cold MB`` times instead what a cold start costs the real selection (``real``) and the
ternary activation kernel without top-k (``act``): each call after a copy of MB megabytes
(past L2: the kernel's code and the row leave it, as a decode step's weight stream pushes them
out) and a read of the row (back into L2, as the kernel before it in a step leaves it), minus
the copy and the read alone; beside the same call without the copy. ``cold/warm`` above 1 is
what the kernel's code (about 5400 instructions at 4096 inputs and 8 warps, 8300 at 16384
and 16) costs when it is not in L2.

``--producer none`` selects from the row itself (the o and down sites) instead of its RMSNorm
(q|k|v and gate|up); then ``norm`` equals ``load``.

Each call sits in a CUDA graph cycling 8 input rows (S = 0.6, Gaussian inputs, the threshold
carried from call to call as decode carries it). ``--spread s`` scales row j by ``2^(s z_j)``
(z standard normal), so that the threshold moves from call to call (0.2: about +-35 bf16 key
values, as the down projection's input moves in a random-weight 1.3B decode). Ratios are against ``real`` of the same K.

    PYTHONPATH=$PWD python3 benchmarks/select_latency.py [--widths 4096 11008] [--warps 4 8 16]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import triton
import triton.language as tl

from benchmarks._figures import emit
from benchmarks._timing import row, time_graph
from qsparse.kernels import gemv as G
from qsparse.kernels._gemv_triton import (
    _band_pass,
    _kept_slots,
    _list_kept,
    _pack_kept,
    _produce,
    _scan_terms,
    _ternary_prep_kernel,
    _threshold_hinted,
    _threshold_radix,
)
from qsparse.kernels._topk_rule import abs_key

STAGES = (
    "empty", "load", "norm", "thresh", "list", "scan", "packed", "idx", "list1", "packed1",
    "thresh_band", "packed_w1",
)  # fmt: skip
STAGES_2D = ("thresh2d", "scan2d", "packed2d")


@triton.jit
def _threshold_band(key, valid, n_valid, k, hint_ptr, BLOCK: tl.constexpr, LOW: tl.constexpr,
                    NDIG: tl.constexpr):  # fmt: skip
    """:func:`_threshold_hinted` (32 bins) with only the entries inside the hint's band in
    the histogram; those above it are counted by one reduction instead of piling into bin 31
    (Triton 3.9 lowers ``tl.histogram`` to one shared-memory atomic per entry)."""
    hint = tl.load(hint_ptr)
    base = hint - 15
    dig = (key >> LOW) - base + 1
    above = tl.sum((valid & (dig >= 31)).to(tl.int32), axis=0)
    inband = valid & (dig > 0) & (dig < 31)
    h = tl.histogram(tl.minimum(tl.maximum(dig, 0), 31), 32, mask=inband)
    bins = tl.arange(0, 32)
    suf = above + tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h
    best = tl.max(tl.where(suf >= k, bins, 0), axis=0)
    if (best > 0) & (best < 31):
        thr = (base + best - 1) << LOW
        need = k - tl.sum(tl.where(bins == best, suf - h, 0), axis=0)
    else:
        thr, need = _threshold_radix(key, valid, n_valid, k, BLOCK, LOW, NDIG, 5)
    tl.store(hint_ptr, thr >> LOW)
    return thr, need


@triton.jit
def _threshold_one_width(key, valid, n_valid, k, hint_ptr, BLOCK: tl.constexpr,
                         LOW: tl.constexpr, NDIG: tl.constexpr):  # fmt: skip
    """The carried threshold before the band could widen: one 32-bin pass of single key
    values around the hint (a plain key word), else the full radix select."""
    h = tl.load(hint_ptr)
    best, above = _band_pass(key >> LOW, valid, n_valid, k, h - 15, h * 0, 32)
    if (best > 0) & (best < 31):
        thr = (h - 15 + best - 1) << LOW
        need = k - above
    else:
        thr, need = _threshold_radix(key, valid, n_valid, k, BLOCK, LOW, NDIG, 5)
    tl.store(hint_ptr, thr >> LOW)
    return thr, need


@triton.jit
def _rows2d_kernel(
    x_ptr, idx_ptr, hint_ptr, K, k,
    BLOCK: tl.constexpr, C: tl.constexpr, LOW: tl.constexpr, NDIG: tl.constexpr,
    STAGE: tl.constexpr,
):  # fmt: skip
    """The selection (no producer) on the row viewed as [BLOCK / C, C]: the threshold over
    the flattened keys, the list positions by a scan along each C-wide piece (inside one warp
    when C = 8 x 32) plus the exclusive scan of the pieces' totals. ``STAGE`` indexes
    :data:`STAGES_2D`."""
    i = tl.arange(0, BLOCK // C)[:, None] * C + tl.arange(0, C)[None, :]
    valid = i < K
    xf = tl.load(x_ptr + i, mask=valid, other=0.0).to(tl.float32)
    key = tl.where(valid, abs_key(xf), -1)
    flat = tl.reshape(key, [BLOCK], can_reorder=True)
    thr, need = _threshold_hinted(flat, flat >= 0, K, k, hint_ptr, BLOCK, LOW, NDIG, 5, True)
    if STAGE == 0:
        tl.store(idx_ptr, thr + need)
    else:
        terms = _scan_terms(key, thr)
        tot = tl.sum(terms, axis=1)
        cs = tl.cumsum(terms, axis=1) + (tl.cumsum(tot, axis=0) - tot)[:, None]
        keep, pos = _kept_slots(key, thr, need, cs)
        if STAGE == 1:
            tl.store(idx_ptr, tl.max(tl.max(tl.where(keep, pos, 0), axis=1), axis=0))
        else:
            tl.store(idx_ptr + pos, _pack_kept(xf, i), mask=keep)


@triton.jit
def _stage_kernel(
    x_ptr,
    w_ptr,
    idx_ptr,
    val_ptr,
    hint_ptr,
    K,
    k,
    eps,
    BLOCK: tl.constexpr,
    LOW: tl.constexpr,
    NDIG: tl.constexpr,
    STAGE: tl.constexpr,
    PROD: tl.constexpr,
):
    """The batch-1 selection cut after stage ``STAGE`` (index into :data:`STAGES`)."""
    i = tl.arange(0, BLOCK)
    valid = i < K
    if STAGE == 0:
        tl.store(idx_ptr, k)
    elif STAGE == 1:
        xf = tl.load(x_ptr + i, mask=valid, other=0.0).to(tl.float32)
        tl.store(val_ptr + i, xf, mask=valid)
    elif STAGE == 2:
        xf = _produce(x_ptr, w_ptr, 0, i, valid, K, eps, PROD, True)
        tl.store(val_ptr + i, xf, mask=valid)
    else:
        off = i % (K + 1) if STAGE >= 8 else i
        xf = _produce(x_ptr, w_ptr, 0, off, valid, K, eps, PROD, True)
        key = tl.where(valid, abs_key(xf), -1)
        if STAGE == 10:
            thr, need = _threshold_band(key, valid, K, k, hint_ptr, BLOCK, LOW, NDIG)
        elif STAGE == 11:
            thr, need = _threshold_one_width(key, valid, K, k, hint_ptr, BLOCK, LOW, NDIG)
        else:
            thr, need = _threshold_hinted(key, valid, K, k, hint_ptr, BLOCK, LOW, NDIG, 5, True)
        if STAGE == 3 or STAGE == 10:
            tl.store(idx_ptr, thr + need)
        elif STAGE == 4 or STAGE == 8:
            _list_kept(key, xf, i, thr, need, idx_ptr, val_ptr)
        else:
            keep, pos = _kept_slots(key, thr, need, tl.cumsum(_scan_terms(key, thr), axis=0))
            if STAGE == 5:
                tl.store(idx_ptr, tl.max(tl.where(keep, pos, 0), axis=0))
            elif STAGE == 6 or STAGE == 9 or STAGE == 11:
                tl.store(idx_ptr + pos, _pack_kept(xf, i), mask=keep)
            else:
                tl.store(idx_ptr + pos, i, mask=keep)


def _rows(width: int, spread: float) -> list[torch.Tensor]:
    """The 8 input rows [1, width] (bf16, Gaussian), row j scaled by ``2^(spread z_j)``."""
    scales = torch.exp2(spread * torch.randn(8)).tolist()
    return [(torch.randn(1, width, device="cuda") * s).to(torch.bfloat16) for s in scales]


def _report(key: str, cells: tuple, times: dict[str, float], names: list[str], base: str) -> None:
    """One table row (``cells``, the times of ``names``, then each time over ``base``'s but
    ``base`` itself) and the figures ``select_latency.<key>.<name>_us``."""
    ratios = (f"{times[n] / times[base]:.2f}" for n in names if n != base)
    print(row(*cells, *(f"{times[n]:.2f}" for n in names), *ratios), flush=True)
    for name, t in times.items():
        emit(f"select_latency.{key}.{name}_us", t, "us")


def _ternary(args: argparse.Namespace) -> None:
    """The ternary activation kernel with and without top-k (``--ternary``)."""
    low, ndig = G._radix_digits(torch.bfloat16, 5)
    names = [f"{n}{s}" for s in ("", "_subln") for n in ("dense", "topk", "topk_nohint")]
    print(row("K", "warps", *names, *(f"{n}/dense" for n in names[1:])))
    print(row(*["---"] * (1 + 2 * len(names))))
    for width in args.widths:
        k = max(1, round((1 - args.sparsity) * width))
        kp = 16 * triton.cdiv(width, 16)
        xs = _rows(width, args.spread)
        nw = 1.0 + 0.1 * torch.randn(width, device="cuda", dtype=torch.bfloat16)
        xq = torch.empty(1, kp, dtype=torch.int8, device="cuda")
        qsum = torch.empty(1, dtype=torch.int32, device="cuda")
        scale = torch.empty(1, dtype=torch.float32, device="cuda")
        for warps in args.warps:
            times: dict[str, float] = {}
            for name in names:
                hint = G.new_hint(1, "cuda")
                sparse, subln = name.startswith("topk"), name.endswith("_subln")
                opts = dict(
                    BLOCK=triton.next_power_of_2(kp), SPARSE=sparse, QMAX=127, LOW=low,
                    NDIG=ndig, DBITS=5, HINT=sparse and "nohint" not in name, w_ptr=nw,
                    nw_ptr=nw, neps=1e-6, SUBLN=subln, BF16=True, num_warps=warps,
                )  # fmt: skip
                launch = _ternary_prep_kernel[(1,)]
                times[name] = time_graph(
                    [partial(launch, x, xq, qsum, scale, hint, width, kp, k, **opts) for x in xs]
                )
            _report(f"ternary_K{width}_w{warps}", (width, warps), times, names, "dense")


def _prep(x: torch.Tensor, rest: tuple, opts: dict) -> None:
    """The ternary activation kernel on row ``x`` (``rest``: its other arguments)."""
    _ternary_prep_kernel[(1,)](x, *rest, **opts)


def _touch(x: torch.Tensor, flush: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Copy ``flush`` (src, dst) first when given (L2 emptied), then read ``x`` (back in L2)."""
    if flush is not None:
        flush[1].copy_(flush[0])
    x.float().sum()


def _then(first, second, x: torch.Tensor) -> None:
    """``first(x)``, then ``second(x)``."""
    first(x)
    second(x)


def _cold(args: argparse.Namespace) -> None:
    """Cold against warm starts of the selection and activation kernels (``--cold MB``)."""
    n = args.cold * 2**20 // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    low, ndig = G._radix_digits(torch.bfloat16, 5)
    names = ["real_warm", "real_cold", "act_warm", "act_cold"]
    print(row("K", "warps", *names, "real cold/warm", "act cold/warm"))
    print(row(*["---"] * 8))
    for width in args.widths:
        k = max(1, round((1 - args.sparsity) * width))
        xs = _rows(width, args.spread)
        w = 1.0 + 0.1 * torch.randn(width, device="cuda", dtype=torch.bfloat16)
        kp = 16 * triton.cdiv(width, 16)
        xq = torch.empty(1, kp, dtype=torch.int8, device="cuda")
        qsum = torch.empty(1, dtype=torch.int32, device="cuda")
        scale = torch.empty(1, dtype=torch.float32, device="cuda")
        for warps in args.warps:
            hint = G.new_hint(1, "cuda")
            real = partial(
                G.compact_rows, k=k, num_warps=warps, hint=hint, prod=1, prod_w=w, eps=1e-5,
                packed=True,
            )  # fmt: skip
            opts = dict(
                BLOCK=triton.next_power_of_2(kp), SPARSE=False, QMAX=127, LOW=low, NDIG=ndig,
                DBITS=5, HINT=False, w_ptr=w, nw_ptr=w, neps=1e-6, SUBLN=True, BF16=True,
                num_warps=warps,
            )  # fmt: skip
            act = partial(_prep, rest=(xq, qsum, scale, hint, width, kp, k), opts=opts)
            times = {}
            for name, fn in (("real", real), ("act", act)):
                for cold in (False, True):
                    before = partial(_touch, flush=(src, dst) if cold else None)
                    base = time_graph([partial(before, x) for x in xs])
                    both = time_graph([partial(_then, before, fn, x) for x in xs])
                    times[f"{name}_{'cold' if cold else 'warm'}"] = both - base
            ratios = (
                times["real_cold"] / times["real_warm"],
                times["act_cold"] / times["act_warm"],
            )
            print(
                row(
                    width, warps, *(f"{times[n]:.2f}" for n in names), *(f"{r:.2f}" for r in ratios)
                )
            )
            for name, t in times.items():
                emit(f"select_latency.cold{args.cold}_K{width}_w{warps}.{name}_us", t, "us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[2048, 4096, 5632, 11008])
    ap.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    ap.add_argument("--sparsity", type=float, default=0.6)
    ap.add_argument("--producer", choices=("none", "rmsnorm"), default="rmsnorm")
    ap.add_argument("--ternary", action="store_true", help="the ternary activation kernel")
    ap.add_argument("--spread", type=float, default=0.0, help="log2 std of the rows' scales")
    ap.add_argument("--cold", type=int, default=0, help="MB copied before each call (module doc)")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.cold:
        _cold(args)
        return
    if args.ternary:
        _ternary(args)
        return
    low, ndig = G._radix_digits(torch.bfloat16, 5)
    prod = 1 if args.producer == "rmsnorm" else 0
    names = [*STAGES] + ([f"{n}_c{c}" for c in (256, 512) for n in STAGES_2D] if not prod else [])
    print(row("K", "warps", *names, "real", *(f"{s}/real" for s in names)))
    print(row(*["---"] * (3 + 2 * len(names))))
    for width in args.widths:
        k = max(1, round((1 - args.sparsity) * width))
        xs = _rows(width, args.spread)
        w = 1.0 + 0.1 * torch.randn(width, device="cuda", dtype=torch.bfloat16)
        idx = torch.empty(width, dtype=torch.int32, device="cuda")
        val = torch.empty(width, dtype=torch.float32, device="cuda")
        block = triton.next_power_of_2(width)
        for warps in args.warps:
            times: dict[str, float] = {}
            for s, name in enumerate(STAGES):
                hint = G.new_hint(1, "cuda")
                launch = _stage_kernel[(1,)]
                opts = dict(BLOCK=block, LOW=low, NDIG=ndig, STAGE=s, PROD=prod, num_warps=warps)
                times[name] = time_graph(
                    [partial(launch, x, w, idx, val, hint, width, k, 1e-5, **opts) for x in xs]
                )
            for c in (256, 512) if not prod else ():
                for s, name in enumerate(STAGES_2D):
                    hint = G.new_hint(1, "cuda")
                    launch = _rows2d_kernel[(1,)]
                    opts = dict(BLOCK=block, C=c, LOW=low, NDIG=ndig, STAGE=s, num_warps=warps)
                    times[f"{name}_c{c}"] = time_graph(
                        [partial(launch, x, idx, hint, width, k, **opts) for x in xs]
                    )
            hint = G.new_hint(1, "cuda")
            opts = dict(hint=hint, prod=prod, prod_w=w, eps=1e-5)
            times["real"] = time_graph([partial(G.compact_rows, x, k, warps, **opts) for x in xs])
            key = f"{args.producer}_K{width}_w{warps}"
            _report(key, (width, warps), times, [*names, "real"], "real")


if __name__ == "__main__":
    main()
