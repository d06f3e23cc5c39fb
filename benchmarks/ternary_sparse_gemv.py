"""Figure: batch-1 BitNet + Q-Sparse GEMV on input-major packed weights
(:func:`qsparse.kernels.ternary_rows.ternary_rows_gemv`) vs the K-packed ternary GEMV and
cuBLAS, on every projection shape of the 7B and 1.3B presets (q|k|v, o, gate|up, down), S=0.6.

Per shape, each call inside a CUDA graph cycling through ``--buffers`` weight copies (L2 cannot
serve them), one fresh bf16 input per copy (the selection sees new values each call), times
per call:

- ``cublas``: ``F.linear(x, W)`` on bf16 weights;
- ``ternary``: :func:`~qsparse.kernels.gemv.ternary_gemv` dense (``k=None``; BitNet b1.58);
- ``ternary_topk``: the same with top-k (``k = 0.4 K``) and the carried threshold (``hint=``),
  what decode runs today for BitNet + Q-Sparse;
- ``rows``: :func:`~qsparse.kernels.ternary_rows.ternary_rows_gemv` with the same ``k`` and
  a carried threshold, selection included, default launch shape
  (:func:`~qsparse.kernels.ternary_rows.ternary_rows_config_for`); ``rows_nohint`` without
  the carry; ``rows_list`` the list kernel alone (carried threshold) and ``rows_gemv`` the
  GEMV given a list (where the time goes); on the ``--sweep-presets`` shapes (7B; none with
  ``--no-sweep``) every launch shape of ``VARIANTS`` (block_k, block_n, warps, stages, target
  programs), and ``rows_best`` the fastest.

Before timing, the kernel is checked against
:func:`~qsparse.kernels.gemv.ternary_gemv_reference` on the K-packed copy of the same codes
(fresh inputs; bf16 and fp32, with and without a carried threshold).

    PYTHONPATH=$PWD python3 benchmarks/ternary_sparse_gemv.py [--presets 7B,1.3B] [--no-sweep]
        [--decode 1.3B,7B [--decode-compile inductor]]

``--decode``: also greedy decode end to end at batch 1 (:func:`decode`): BitNet b1.58, and
BitNet + Q-Sparse with ``qsparse.decode_view.TERNARY_ROWS`` off / on.

``FIGURE`` lines under ``ternary_sparse_gemv.<preset>_<shape>``: ``<kernel>_us`` and the
ratios ``rows_vs_ternary`` (ternary dense time / rows time), ``rows_vs_ternary_topk``,
``rows_vs_cublas`` (and ``best_vs_*`` for the fastest swept shape); with ``--decode`` under
``ternary_sparse_gemv.decode_<preset>``: ``<run>.tokens_per_s``, ``rows_vs_k_packed``,
``rows_vs_bitnet``, ``k_packed_vs_bitnet``, ``rows_token_agreement``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks._figures import emit
from benchmarks._timing import row, time_graph
from qsparse.kernels import gemv as G
from qsparse.kernels import ternary_rows as TR
from qsparse.models import LlamaConfig

DEVICE = "cuda"
#: launch shapes tried with --sweep: (block_k, block_n, num_warps, num_stages, programs)
VARIANTS = [
    (64, 128, 4, 3, 528),
    (128, 128, 4, 3, 528),
    (64, 256, 4, 3, 528),
    (128, 256, 8, 3, 528),
    (64, 128, 4, 1, 528),
    (128, 128, 8, 1, 528),
    (64, 128, 4, 3, 264),
    (32, 128, 4, 3, 1056),
]


def shapes(preset: str) -> dict[str, tuple[int, int]]:
    """(in, out) of the fused projections of ``preset``."""
    cfg = LlamaConfig.from_preset(preset)
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qkv = d + 2 * cfg.num_key_value_heads * hd
    return {"qkv": (d, qkv), "o": (d, d), "gate_up": (d, 2 * f), "down": (f, d)}


def emit_ratios(key: str, **ratios: float) -> None:
    """One ``FIGURE <key>.<name> <ratio> x`` line per ratio."""
    for name, value in ratios.items():
        emit(f"{key}.{name}", value)


def variant_config(v: tuple[int, int, int, int, int], n: int, k: int) -> G.GemvConfig:
    bk, bn, warps, stages, programs = v
    base = G.GemvConfig(block_k=bk, block_n=bn, num_warps=warps, num_stages=stages)
    return TR.ternary_rows_config_for(n, k, base, programs)


def check(kin: int, n: int, k: int) -> None:
    """The kernel vs the K-packed reference on fresh random inputs: bf16 (the decode dtype) to
    a bf16 rounding, fp32 to float summation order; a carried threshold on the later calls."""
    codes = torch.randint(-1, 2, (n, kin), dtype=torch.int8, device=DEVICE)
    rows, packed = TR.pack_ternary_rows(codes), G.pack_ternary(codes)
    alpha = torch.rand(16 * rows.shape[1], device=DEVICE) + 0.5
    for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 1e-4)):
        hint = G.new_hint(1, DEVICE)
        for _ in range(3):
            x = torch.randn(1, kin, device=DEVICE, dtype=dtype)
            ref = G.ternary_gemv_reference(x, packed, alpha[:n], k, 8).float()
            for h in (None, hint):
                got = TR.ternary_rows_gemv(x, rows, alpha, k, hint=h, n_out=n).float()
                err = ((got - ref).norm() / ref.norm()).item()
                assert err < tol, (kin, n, dtype, err)


def decode(preset: str, new_tokens: int, backend: str | None) -> None:
    """End to end (``--decode PRESET``): greedy decode tokens/s at batch 1 (random weights,
    bf16, CUDA graph, ``--decode-compile`` backend) of BitNet b1.58, and of BitNet + Q-Sparse
    S=0.6 with :data:`qsparse.decode_view.TERNARY_ROWS` off and on, in one process; the
    fraction of greedy tokens the two BitNet + Q-Sparse runs agree on."""
    import gc

    import qsparse.decode_view as DV
    from qsparse.generate import DecodeEngine, convert
    from qsparse.models import LlamaForCausalLM

    cfg = LlamaConfig.from_preset(preset)
    ids = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    rates, tokens = {}, {}
    for name, mode, rows in (
        ("bitnet", "bitnet", False),
        ("bitnet_qsparse", "bitnet_qsparse", False),
        ("bitnet_qsparse_rows", "bitnet_qsparse", True),
    ):
        torch.manual_seed(0)
        with torch.device(DEVICE):
            model = LlamaForCausalLM(cfg)
        model = convert(model.to(torch.bfloat16).eval(), mode, 0.6)
        DV.TERNARY_ROWS = rows
        engine = DecodeEngine(model, compile=backend)
        engine.generate(ids, new_tokens)  # warm-up: kernels, compiled step, CUDA graph
        res = engine.generate(ids, new_tokens)
        rates[name], tokens[name] = res.tokens_per_s, res.tokens.cpu()
        print(f"# decode {preset} {name}: {res.tokens_per_s:.1f} tokens/s", flush=True)
        del engine, model, res
        gc.collect()
        torch.cuda.empty_cache()
    DV.TERNARY_ROWS = False
    key = f"ternary_sparse_gemv.decode_{preset}"
    for name, tps in rates.items():
        emit(f"{key}.{name}.tokens_per_s", tps, "tokens/s")
    rows, k_packed, bitnet = (rates[r] for r in ("bitnet_qsparse_rows", "bitnet_qsparse", "bitnet"))
    emit_ratios(
        key, rows_vs_k_packed=rows / k_packed, rows_vs_bitnet=rows / bitnet,
        k_packed_vs_bitnet=k_packed / bitnet,
    )  # fmt: skip
    same = (tokens["bitnet_qsparse_rows"] == tokens["bitnet_qsparse"]).float().mean().item()
    emit(f"{key}.rows_token_agreement", 100 * same, "%")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="7B,1.3B")
    ap.add_argument("--sparsity", type=float, default=0.6)
    ap.add_argument("--buffers", type=int, default=8)
    ap.add_argument("--sweep-presets", default="7B", help="presets whose shapes are swept")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--decode", default="", help="also decode end to end: comma list of presets")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--decode-compile", default=None, help="torch.compile backend of the step")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.time()
    cols = ("shape", "cuBLAS us", "ternary us", "ternary+k us", "rows+k us", "best rows us")
    cols += ("rows vs ternary", "rows vs ternary+k", "rows vs cuBLAS", "best vs ternary+k")
    table = [row(*cols), row(*["---"] * len(cols))]
    for preset in args.presets.split(","):
        sweep = not args.no_sweep and preset in args.sweep_presets.split(",")
        for name, (kin, n) in shapes(preset).items():
            k = int((1 - args.sparsity) * kin)
            check(kin, n, k)
            torch.manual_seed(1)
            codes = [
                torch.randint(-1, 2, (n, kin), dtype=torch.int8, device=DEVICE)
                for _ in range(args.buffers)
            ]
            ws = [c.to(torch.bfloat16) * 0.02 for c in codes]
            packs = [G.pack_ternary(c) for c in codes]
            rows = [TR.pack_ternary_rows(c) for c in codes]
            del codes
            xs = [torch.randn(1, kin, device=DEVICE, dtype=torch.bfloat16) for _ in ws]

            def timed(fn, weights, fast=False, xs=xs):
                calls = [lambda w=w, x=x: fn(x, w) for w, x in zip(weights, xs, strict=True)]
                return time_graph(calls, reps=2, replays=10) if fast else time_graph(calls)

            hints = [G.new_hint(1, DEVICE) for _ in range(2)]
            t = {
                "cublas": timed(F.linear, ws),
                "ternary": timed(lambda x, p: G.ternary_gemv(x, p, 0.02, None, 8), packs),
                "ternary_topk": timed(
                    lambda x, p, k=k, h=hints[0]: G.ternary_gemv(x, p, 0.02, k, 8, hint=h), packs
                ),
                "rows": timed(
                    lambda x, p, k=k, h=hints[1]: TR.ternary_rows_gemv(x, p, 0.02, k, hint=h), rows
                ),
                "rows_nohint": timed(lambda x, p, k=k: TR.ternary_rows_gemv(x, p, 0.02, k), rows),
            }
            # the two halves alone: the list kernel (carried threshold), the GEMV given a list
            t["rows_list"] = timed(
                lambda x, p, k=k, h=hints[1]: TR.ternary_rows_list(x, k, hint=h), rows
            )
            lists = [TR.ternary_rows_list(x, k) for x in xs]
            t["rows_gemv"] = time_graph(
                [
                    lambda p=p, x=x, r=r, k=k: TR.ternary_rows_gemv(x, p, 0.02, k, rows=r)
                    for p, x, r in zip(rows, xs, lists, strict=True)
                ]
            )
            best = t["rows"]
            if sweep:
                for v in VARIANTS:
                    cfg = variant_config(v, 16 * rows[0].shape[1], k)
                    hint = G.new_hint(1, DEVICE)
                    try:
                        tv = timed(
                            lambda x, p, c=cfg, h=hint, k=k: TR.ternary_rows_gemv(
                                x, p, 0.02, k, cfg=c, hint=h
                            ),
                            rows,
                            fast=True,
                        )
                    except Exception as e:  # noqa: BLE001  (a shape the compiler rejects)
                        print(f"# {preset} {name} skip {v}: {type(e).__name__}: {e}")
                        continue
                    tag = "k{}_n{}_w{}_s{}_p{}".format(*v)
                    print(f"# {preset} {name} variant {tag} split {cfg.split}: {tv:.2f} us")
                    emit(f"ternary_sparse_gemv.{preset}_{name}.variant.{tag}_us", tv, "us")
                    best = min(best, tv)
            t["rows_best"] = best
            key = f"ternary_sparse_gemv.{preset}_{name}"
            for what, us in t.items():
                emit(f"{key}.{what}_us", us, "us")
            for tag, us in (("rows", t["rows"]), ("best", best)):
                emit_ratios(
                    key,
                    **{
                        f"{tag}_vs_{base}": t[base] / us
                        for base in ("ternary", "ternary_topk", "cublas")
                    },
                )
            table.append(
                row(
                    f"{preset} {name} {kin}->{n}",
                    f"{t['cublas']:.1f}",
                    f"{t['ternary']:.1f}",
                    f"{t['ternary_topk']:.1f}",
                    f"{t['rows']:.1f} (no hint {t['rows_nohint']:.1f}; list "
                    f"{t['rows_list']:.1f} + GEMV {t['rows_gemv']:.1f})",
                    f"{best:.1f}",
                    f"{t['ternary'] / t['rows']:.2f}x",
                    f"{t['ternary_topk'] / t['rows']:.2f}x",
                    f"{t['cublas'] / t['rows']:.2f}x",
                    f"{t['ternary_topk'] / best:.2f}x",
                )
            )
            print(table[-1], f"# {time.time() - t0:.0f} s", flush=True)
            del ws, packs, rows
    print("\n".join(table))
    print(f"# S={args.sparsity}, batch 1, {args.buffers} weight copies; {time.time() - t0:.0f} s")
    for preset in filter(None, args.decode.split(",")):
        decode(preset, args.decode_tokens, args.decode_compile)
        print(f"# decode {preset} done; {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
