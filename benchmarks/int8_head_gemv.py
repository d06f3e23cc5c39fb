"""Figure: weight-only int8 lm-head GEMV (:func:`qsparse.kernels.int8_gemv.int8_gemv`, per-row
scales) vs the cuBLAS bf16 head (``F.linear``) at the vocab x hidden shapes of the 1.3B / 7B
presets (32000 x 2048, 32000 x 4096) and SmolLM2-135M (49152 x 576), batch 1 by default.

Each call reads its own copy of the weights: ``--buffers`` copies (int8 and bf16) are cycled
inside one CUDA graph (:func:`benchmarks._timing.time_graph`), so L2 serves neither. Also timed
where it runs: ``torch._weight_int8pack_mm`` (PyTorch's own weight-only int8 product, same
layout). The Triton kernel's launch shape is swept first (``--quick``: the default only).

    PYTHONPATH=$PWD python3 benchmarks/int8_head_gemv.py            # ~2 min on one H100/H200
    PYTHONPATH=$PWD python3 benchmarks/int8_head_gemv.py --quick --batches 1,4,8

Prints a Markdown row per shape and batch (cuBLAS us, then each variant's us and speed-up over
cuBLAS measured in the same run), effective GB/s, and ``FIGURE int8_head.<shape>_b<batch>.*``
lines (``dense_us``, ``int8_us``, ``int8`` = cuBLAS / int8, ``int8pack_mm*`` where it runs).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks._timing import emit_vs_dense, row, sweep, time_graph
from qsparse.kernels import int8_gemv as I8

SHAPES = {"1.3B": (32000, 2048), "7B": (32000, 4096), "smollm2": (49152, 576)}
SWEEP = [  # block_v, block_d, num_warps, num_stages
    (32, 256, 4, 3),
    (16, 256, 4, 3),
    (64, 256, 4, 3),
    (32, 128, 4, 3),
    (16, 512, 4, 3),
    (32, 512, 8, 3),
    (64, 128, 4, 4),
    (8, 512, 2, 3),
    (128, 128, 8, 3),
]
BATCH_SWEEP = [(64, 128, 4, 3), (32, 128, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3)]


def measure(name: str, ws: list[torch.Tensor], packs: list, batch: int, quick: bool) -> None:
    """Time one shape at one batch (cuBLAS on ``ws``, int8 on ``packs``) and report it."""
    v, d = ws[0].shape
    x = torch.randn(batch, d, device="cuda", dtype=torch.bfloat16)
    ref = I8.int8_gemv_reference(x, *packs[0]).float()
    got = I8.int8_gemv(x, *packs[0]).float()
    err = ((got - ref).norm() / ref.norm()).item()
    print(f"# {name} b{batch}: rel err vs reference {err:.2e}")
    assert err < 1e-2, err

    def int8_calls(cfg):
        return [lambda p=p: I8.int8_gemv(x, *p, cfg) for p in packs]

    cfg = I8.int8_config_for(batch)
    if not quick:
        grid = SWEEP if batch == 1 else BATCH_SWEEP
        cfg = sweep([I8.Int8GemvConfig(*c) for c in grid], int8_calls, f"{name} b{batch}")
    dense_us = time_graph([lambda w=w: F.linear(x, w) for w in ws])
    timed = {"int8": time_graph(int8_calls(cfg))}
    scales = [s.to(x.dtype) for _, s in packs]
    try:  # PyTorch's weight-only int8 mm, where this build has a CUDA kernel
        calls = [
            lambda q=q, s=s: torch._weight_int8pack_mm(x, q, s)
            for (q, _), s in zip(packs, scales, strict=True)
        ]
        timed["int8pack_mm"] = time_graph(calls)
    except (RuntimeError, NotImplementedError) as err:
        print(f"# torch._weight_int8pack_mm on CUDA: {type(err).__name__}: {err}"[:200])
    # weight bytes per microsecond / 1e3 = GB/s (int8: one byte a weight, bf16: two)
    gbs = {"dense": 2 * v * d / (dense_us * 1e3)}
    gbs |= {k: v * d / (t * 1e3) for k, t in timed.items()}
    print(f"# {name} b{batch} {cfg}: GB/s " + ", ".join(f"{k} {g:.0f}" for k, g in gbs.items()))
    emit_vs_dense(f"int8_head.{name}_b{batch}", (f"{v}x{d}", batch), dense_us, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="1.3B,7B,smollm2", help=f"comma list of {list(SHAPES)}")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--buffers", type=int, default=4, help="weight copies cycled per graph")
    ap.add_argument("--quick", action="store_true", help="no launch-shape sweep")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(row("shape", "batch", "cuBLAS bf16 us", "variants us ...", "speed-ups ..."))
    for name in args.shapes.split(","):
        v, d = SHAPES[name]
        ws = [torch.randn(v, d, device="cuda", dtype=torch.bfloat16) * 0.02]
        ws += [torch.randn_like(ws[0]) * 0.02 for _ in range(args.buffers - 1)]
        packs = [I8.quantize_int8_rows(w) for w in ws]
        for batch in [int(b) for b in args.batches.split(",")]:
            measure(name, ws, packs, batch, args.quick)
        del ws, packs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
