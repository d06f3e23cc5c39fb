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
  whole selection, as :func:`qsparse.kernels.gemv.compact_rows` runs it (also timed: ``real``).

Each call sits in a CUDA graph cycling 8 input rows (S = 0.6, Gaussian inputs, the threshold
carried from call to call as decode carries it). Ratios are against ``real`` of the same K.

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
from qsparse.kernels._gemv_triton import _list_kept, _produce, _threshold_hinted
from qsparse.kernels._topk_rule import abs_key

STAGES = ("empty", "load", "norm", "thresh", "list")


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
        xf = _produce(x_ptr, w_ptr, 0, i, valid, K, eps, 1, True)
        tl.store(val_ptr + i, xf, mask=valid)
    else:
        xf = _produce(x_ptr, w_ptr, 0, i, valid, K, eps, 1, True)
        key = tl.where(valid, abs_key(xf), -1)
        thr, need = _threshold_hinted(key, valid, K, k, hint_ptr, BLOCK, LOW, NDIG, 5, True)
        if STAGE == 3:
            tl.store(idx_ptr, thr + need)
        else:
            _list_kept(key, xf, i, thr, need, idx_ptr, val_ptr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[2048, 4096, 5632, 11008])
    ap.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    ap.add_argument("--sparsity", type=float, default=0.6)
    args = ap.parse_args()
    torch.manual_seed(0)
    low, ndig = G._radix_digits(torch.bfloat16, 5)
    print(row("K", "warps", *STAGES, "real", *(f"{s}/real" for s in STAGES[1:])))
    print(row(*["---"] * (3 + 2 * len(STAGES))))
    for width in args.widths:
        k = max(1, round((1 - args.sparsity) * width))
        xs = [torch.randn(1, width, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
        w = 1.0 + 0.1 * torch.randn(width, device="cuda", dtype=torch.bfloat16)
        idx = torch.empty(width, dtype=torch.int32, device="cuda")
        val = torch.empty(width, dtype=torch.float32, device="cuda")
        block = triton.next_power_of_2(width)
        for warps in args.warps:
            times: dict[str, float] = {}
            for s, name in enumerate(STAGES):
                hint = G.new_hint(1, "cuda")
                launch = _stage_kernel[(1,)]
                opts = dict(BLOCK=block, LOW=low, NDIG=ndig, STAGE=s, num_warps=warps)
                times[name] = time_graph(
                    [partial(launch, x, w, idx, val, hint, width, k, 1e-5, **opts) for x in xs]
                )
            hint = G.new_hint(1, "cuda")
            opts = dict(hint=hint, prod=1, prod_w=w, eps=1e-5)
            times["real"] = time_graph([partial(G.compact_rows, x, k, warps, **opts) for x in xs])
            real = times["real"]
            print(
                row(
                    width,
                    warps,
                    *(f"{times[n]:.2f}" for n in (*STAGES, "real")),
                    *(f"{times[n] / real:.2f}" for n in STAGES[1:]),
                ),
                flush=True,
            )
            for name, t in times.items():
                emit(f"select_latency.K{width}_w{warps}.{name}_us", t, "us")


if __name__ == "__main__":
    main()
