"""Figure: 2-bit ternary decode GEMV (BitNet b1.58, int8 activations) vs cuBLAS bf16 GEMV,
dense and with Q-Sparse top-k (S=0.6) on a 4096 -> 11008 layer.

Ternary weights are packed 16 inputs per int32 ([256, 11008] int32, 11.3 MB) and multiplied
with int8 activations by ``dp4a`` (exact int32 sums); ``--buffers`` copies (and as many 90 MB
bf16 copies for cuBLAS) are cycled inside one CUDA graph so L2 serves neither. The per-token
absmax int8 quantization (and, for the sparse variant, the top-k selection kernel) runs inside
every timed call.

    PYTHONPATH=$PWD python3 benchmarks/ternary_gemv.py

Goal (issue 5): >= 4x bf16 dense at batch 1; and ternary + sparse together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks._timing import emit_vs_dense, gemv_setup, row, sweep, time_graph
from qsparse.kernels import gemv as G

SWEEP = [  # block_k (16-input groups per tile), block_n, num_warps, num_stages[, split]
    # the words of a column block split over 2-4 programs (more loads in flight at batch 1:
    # the kernel streams about 1.5 TB/s of the card's ~4.3), and wider column blocks
    (64, 32, 4, 3, 2),
    (64, 32, 4, 3, 4),
    (32, 32, 4, 3, 4),
    (64, 64, 4, 3, 2),
    (32, 128, 4, 3),
    (64, 128, 8, 3),
    (64, 32, 4, 3),
    (256, 16, 4, 3),
    (256, 32, 8, 3),
    (256, 8, 4, 3),
    (128, 16, 4, 3),
    (128, 32, 4, 3),
    (128, 32, 8, 3),
    (64, 16, 2, 3),
    (64, 64, 4, 3),
    (32, 32, 4, 3),
]


def main() -> None:
    args, ws = gemv_setup(__doc__)
    kin = args.in_features
    packs, alphas = [], []
    for w in ws:
        codes, alpha = G.ternarize(w)
        packs.append(G.pack_ternary(codes))
        alphas.append(alpha)

    def dense_calls(x):
        return [lambda w=w: F.linear(x, w) for w in ws]

    def tern_calls(x, k, cfg):
        return [
            lambda p=p, a=a: G.ternary_gemv(x, p, a, k, 8, cfg)
            for p, a in zip(packs, alphas, strict=True)
        ]

    x1 = torch.randn(1, kin, device="cuda", dtype=torch.bfloat16)
    k60 = int(0.4 * kin)
    for k in (None, k60):
        ref = G.ternary_gemv_reference(x1, packs[0], alphas[0], k, 8)
        got = G.ternary_gemv(x1, packs[0], alphas[0], k, 8)
        err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        print(f"# rel err vs reference (k={k}): {err:.2e}")
        assert err < 1e-2

    best = {None: G.TERNARY_CONFIG, k60: G.TERNARY_SPARSE_CONFIG}
    if not args.quick:
        for k in (None, k60):
            configs = [
                G.GemvConfig(
                    block_k=bg,
                    block_n=bn,
                    num_warps=nw,
                    num_stages=ns,
                    select_warps=sw,
                    pdl=pdl,
                    digit_bits=db,
                    split=sp[0] if sp else 1,
                )
                for bg, bn, nw, ns, *sp in SWEEP
                for pdl in (True, False)
                for sw, db in (
                    ((8, 5), (4, 5), (8, 8), (4, 4)) if (bg, bn) == (128, 32) and k else ((8, 5),)
                )
            ]
            best[k] = sweep(configs, lambda cfg, k=k: tern_calls(x1, k, cfg), f"k={k}", top=4)
    print(f"# configs: dense {best[None]}, sparse {best[k60]}")
    print(
        row(
            "batch",
            "cuBLAS bf16 us",
            "ternary us",
            "ternary+S0.6 us",
            "ternary speed-up",
            "ternary+sparse speed-up",
        )
    )
    print(row(*["---"] * 6))
    for batch in (1, 2, 4, 8):
        x = torch.randn(batch, kin, device="cuda", dtype=torch.bfloat16)
        t_dense = time_graph(dense_calls(x))
        if batch == 1:
            cd, cs = best[None], best[k60]
        else:
            cd = cs = G.GemvConfig(block_k=16, block_n=32, num_warps=4)
        t_t = time_graph(tern_calls(x, None, cd))
        t_ts = time_graph(tern_calls(x, k60, cs))
        timed = {"ternary": t_t, "ternary_sparse": t_ts}
        emit_vs_dense(f"ternary_gemv.b{batch}", (batch,), t_dense, timed)


if __name__ == "__main__":
    main()
