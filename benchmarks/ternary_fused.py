"""Figure: the batch-1 BitNet site as one kernel (``GemvConfig(fused=True)``: every GEMV
program quantizes the row itself) against the activation kernel + dp4a GEMV, same run.

Each decode site of a BitNet b1.58 model (no top-k) at the 7B and 1.3B preset shapes, with
what its first kernel computes in the decode step: q|k|v and gate|up the residual sum, the
layer's RMSNorm and the SubLN; o and down the SubLN. ``--buffers`` weight copies with one input
row each are cycled in one CUDA graph (L2 serves neither), so consecutive calls chain as in
a decode step (the GEMV lets the next site's first kernel launch early).

    PYTHONPATH=$PWD python3 benchmarks/ternary_fused.py
    PYTHONPATH=$PWD python3 benchmarks/ternary_fused.py --presets 7B --shapes 64x16x2,32x16x2

``FIGURE ternary_fused.<preset>_<site>.<BKxBNxW>`` (unfused time / fused time) and ``_us``;
``.unfused_us`` the baseline.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from benchmarks._figures import emit
from benchmarks._timing import row, time_graph
from qsparse.kernels import gemv as G

#: (inputs, outputs, the first kernel's producer: "norm" = residual sum + RMSNorm) per site
SITES = {
    "7B": {"qkv": (4096, 12288, "norm"), "o": (4096, 4096, None),
           "gate_up": (4096, 22016, "norm"), "down": (11008, 4096, None)},
    "1.3B": {"qkv": (2048, 6144, "norm"), "o": (2048, 2048, None),
             "gate_up": (2048, 11264, "norm"), "down": (5632, 2048, None)},
}  # fmt: skip


def shape_cfg(text: str) -> G.GemvConfig:
    """``BKxBNxW`` -> the fused config with that tile (16-input groups x columns) and warps."""
    bk, bn, warps = (int(v) for v in text.split("x"))
    return replace(G.TERNARY_CONFIG, block_k=bk, block_n=bn, num_warps=warps, fused=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="7B,1.3B")
    ap.add_argument("--shapes", default="64x16x2,32x16x2,64x32x4,128x16x4")
    ap.add_argument("--buffers", type=int, default=8)
    args = ap.parse_args()
    shapes = args.shapes.split(",")
    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    print(row("site", "unfused us", *(f"fused {s} us (x)" for s in shapes)))
    print(row(*["---"] * (2 + len(shapes))))
    for preset in args.presets.split(","):
        for site, (kin, n, prod) in SITES[preset].items():
            packs, alphas = [], []
            for _ in range(args.buffers):
                codes, alpha = G.ternarize(torch.randn(n, kin, device=dev, dtype=bf16))
                packs.append(G.pack_ternary(codes))
                alphas.append(torch.full((n,), float(alpha), device=dev))
            xs = [torch.randn(1, kin, device=dev, dtype=bf16) for _ in packs]
            ds = [torch.randn(1, kin, device=dev, dtype=bf16) for _ in packs]
            kw = {"subln": G.SubLN(torch.rand(kin, device=dev, dtype=bf16) + 0.5, 1e-6)}
            if prod == "norm":
                kw["producer"] = G.Producer(
                    "rmsnorm", torch.rand(kin, device=dev, dtype=bf16) + 0.5
                )

            def calls(cfg, kw=kw, packs=packs, alphas=alphas, xs=xs, ds=ds, prod=prod):
                def one(p, a, x, d):
                    res = {"residual": d} if prod == "norm" else {}
                    return lambda: G.ternary_gemv(x, p, a, None, 8, cfg, **kw, **res)

                return [one(*t) for t in zip(packs, alphas, xs, ds, strict=True)]

            base = time_graph(calls(G.TERNARY_CONFIG))
            key = f"ternary_fused.{preset}_{site}"
            emit(f"{key}.unfused_us", base, "us")
            cells = []
            for s in shapes:
                t = time_graph(calls(shape_cfg(s)))
                emit(f"{key}.{s}", base / t)
                emit(f"{key}.{s}_us", t, "us")
                cells.append(f"{t:.1f} ({base / t:.2f}x)")
            print(row(f"{preset} {site} {kin}->{n}", f"{base:.1f}", *cells), flush=True)
            del packs, alphas


if __name__ == "__main__":
    main()
