"""Figure: sparse-input GEMV **with its top-k selection** vs cuBLAS on every projection shape of
the 7B preset (q|k|v 4096->12288, o 4096->4096, gate|up 4096->22016, down 11008->4096), bf16,
S=0.6, batch 1, 2, 4 and 8.

Per shape and batch, each call inside a CUDA graph cycling through ``--buffers`` weight
copies (L2 cannot serve them), times per call:

- ``dense``: ``F.linear(x, W)`` (cuBLAS), the baseline;
- ``sparse``: ``sparse_gemv(x, Wt, k)`` (selection + list + GEMV over the kept rows; at batch
  > 1 the union of the rows' kept inputs);
- ``sparse+carry``: with the threshold carried from the previous call (``hint=``; the inputs
  are redrawn from one distribution per call, as consecutive decode steps are): at batch 1
  the carried GEMV (``GemvConfig(carry=True)``: the inputs above the carried band summed
  while the selection runs; measured slower, not the default), and ``carry_list`` what
  :mod:`qsparse.generate` runs (the selection from the carried threshold, then the list
  GEMV; ``two_lists``: the same with ``GemvConfig(packed=False)``, an index list and an
  fp32 value list instead of one packed word per kept input), plus a sweep of the carried
  GEMV's launch shapes on o and down (``carry_sweep``: split x block_k); at batch > 1 the
  default path with the hint;
- ``topk+gemm`` (batch > 1): :func:`qsparse.kernels.gemv.masked_topk` from carried
  thresholds, then one cuBLAS GEMM on the masked input, and ``bisect+gemm`` the training
  top-k kernel (bit bisection) in its place;
- ``site`` (q|k|v, gate|up, down): the whole input site as decode runs it, the producer of
  the input included: the layer's RMSNorm (q|k|v, gate|up) or ``act(g) * u`` of the 7B
  preset's GLU (down). Baseline ``site_dense``: the torch modules' producer, then cuBLAS;
  ``site_fused``: the selection kernel computing the producer itself (``producer=``), with the
  carried threshold, then the list GEMV (batch 1) or one cuBLAS GEMM (batch > 1);
- ``ternary`` (batch > 1): the 2-bit ternary GEMV with int8 activations (BitNet b1.58), dense
  and with top-k (BitNet + Q-Sparse): ``split`` the default (``ternary_split_config``: the
  words split over programs on narrow outputs), ``dp4a`` one program per column block
  (``TERNARY_BATCH_CONFIG``, the default until 2026-12-02), ``dot`` on int8 tensor cores
  (``TERNARY_MMA_CONFIG``, opt-in), vs the same cuBLAS bf16 baseline.

Before timing, every kernel is checked against its PyTorch reference on fresh inputs.

    PYTHONPATH=$PWD python3 benchmarks/sparse_gemv_7b.py [--json out.json]

For ``benchmarks/run_all.py`` it prints ``FIGURE`` lines per shape, batch and sparsity, under
``sparse_gemv_7b.<shape>_b<batch>_S<S>`` (as ``benchmarks/sparse_gemv.py``): ``dense_us``
(cuBLAS), ``incl`` / ``incl_us`` (selection included), ``carry`` / ``carry_us`` (selection
included, threshold carried), at batch 1 ``carry_list`` / ``carry_list_us`` and
``carry_sweep.s<split>_k<block_k>_us`` (with ``--sweep``), at batch > 1 ``topk_gemm`` /
``topk_gemm_us`` and ``bisect_gemm`` / ``bisect_gemm_us``, and
``ternary_<split|dp4a|dot>[_topk]``
(+ ``_us``); per site (not o) ``site_dense_us``, ``site_fused`` / ``site_fused_us``; a ratio
is the baseline's time over the kernel's.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch
import torch.nn.functional as F

from benchmarks._figures import emit
from benchmarks._timing import row, time_graph
from qsparse import kernels as K
from qsparse.kernels import gemv as G
from qsparse.models import LlamaConfig

SHAPES = {  # name: (in, out) of the fused 7B projections
    "qkv": (4096, 12288),
    "o": (4096, 4096),
    "gate_up": (4096, 22016),
    "down": (11008, 4096),
}
DEVICE = "cuda"  # tests swap in "cpu" with the timing stubbed
#: the op making each site's input, fused into its selection (docs/decode.md)
PRODUCERS = {
    "qkv": "rmsnorm",
    "gate_up": "rmsnorm",
    "down": f"{LlamaConfig.from_preset('7B').hidden_act}_glu",
}


def producer(name: str, kin: int) -> G.Producer | None:
    """The site's :class:`~qsparse.kernels.gemv.Producer` (RMSNorm weight near 1), or None."""
    kind = PRODUCERS.get(name)
    if kind is None:
        return None
    w = (1 + 0.1 * torch.randn(kin, device=DEVICE)).to(torch.bfloat16)
    return G.Producer(kind, w if kind == "rmsnorm" else None, 1e-6)


#: launch shapes of the carried GEMV tried at batch 1 on the shapes in SWEEP_SHAPES
SWEEP = [(split, bk) for split in (1, 2, 4, 8) for bk in (64, 128)]
SWEEP_SHAPES = ("o", "down")


def check(kin: int, n: int, k: int, batch: int) -> None:
    """Kernel vs reference on fresh random inputs (with and without a carried threshold)."""
    w = torch.randn(n, kin, device=DEVICE, dtype=torch.bfloat16) * 0.02
    wt = G.prepare_dense(w)
    hint = G.new_hint(16, DEVICE)
    for _ in range(3):
        x = torch.randn(batch, kin, device=DEVICE, dtype=torch.bfloat16)
        ref = G.sparse_gemv_reference(x, wt, k)[:, :n].float()
        carried = G.sparse_config_for(kin, wt.shape[1], k, carry=True) if batch == 1 else None
        for h, c in ((None, None), (hint, None), (hint, carried)):
            got = G.sparse_gemv(x, wt, k, c, n_out=n, hint=h).float()
            err = ((got - ref).norm() / ref.norm()).item()
            assert err < 1e-2, (kin, n, batch, err)
        if batch > 1:
            assert torch.equal(G.masked_topk(x, k, hint), K.fused_token_topk(x, k, True, None))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sparsity", type=float, default=0.6)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--buffers", type=int, default=8)
    ap.add_argument("--sweep", action="store_true", help="the carried GEMV's launch shapes")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)
    results = []
    print(
        row(
            "shape", "batch", "dense us", "sparse us (x)", "sparse+carry us (x)", "topk+gemm us (x)"
        )
    )
    print(row(*["---"] * 6))
    for name, (kin, n) in SHAPES.items():
        k = int((1 - args.sparsity) * kin)
        ws = [
            torch.randn(n, kin, device=DEVICE, dtype=torch.bfloat16) * 0.02
            for _ in range(args.buffers)
        ]
        wts = [G.prepare_dense(w) for w in ws]
        for batch in batches:
            check(kin, n, k, batch)
            # one input per weight copy: the selection sees new values each call
            xs = [torch.randn(batch, kin, device=DEVICE, dtype=torch.bfloat16) for _ in ws]
            hint = G.new_hint(16, DEVICE)

            def timed(fn, weights, xs=xs):
                calls = [lambda w=w, x=x: fn(x, w) for w, x in zip(weights, xs, strict=True)]
                return time_graph(calls)

            def hinted(cfg, k=k, n=n, h=hint, wts=wts):
                """``sparse_gemv`` with ``cfg`` and the threshold carried, timed."""
                return timed(lambda x, wt: G.sparse_gemv(x, wt, k, cfg, n_out=n, hint=h), wts)

            dense = timed(F.linear, ws)
            sparse = timed(lambda x, wt, k=k, n=n: G.sparse_gemv(x, wt, k, n_out=n), wts)
            # batch 1: the carried GEMV (GemvConfig.carry, not the default); else the default
            ccfg = G.sparse_config_for(kin, wts[0].shape[1], k, carry=True) if batch == 1 else None
            carry = hinted(ccfg)
            masked = bisect = carry_list = None
            extra = {}
            if batch > 1:
                masked = timed(
                    lambda x, wt, k=k, n=n, h=hint: (G.masked_topk(x, k, h) @ wt)[:, :n], wts
                )
                bisect = timed(
                    lambda x, wt, k=k, n=n: (K.fused_token_topk(x, k, True, None) @ wt)[:, :n],
                    wts,
                )
            else:
                cfg = replace(G.sparse_config_for(kin, wts[0].shape[1], k), carry=False)
                carry_list = hinted(cfg)
                # the list as it was until 2026-12-03: index and fp32 value lists
                extra["two_lists"] = hinted(replace(cfg, packed=False))
                print(
                    f"# {name} batch 1 list GEMV, carried threshold: packed list {carry_list:.1f}"
                    f" us, two lists {extra['two_lists']:.1f} us "
                    f"({extra['two_lists'] / carry_list:.2f}x)"
                )
                bn = G.sparse_config_for(kin, wts[0].shape[1], k, carry=True).block_n
                swept = {
                    f"s{split}_k{bk}": hinted(
                        G.GemvConfig(block_k=bk, block_n=bn, split=split, carry=True)
                    )
                    for split, bk in (SWEEP if name in SWEEP_SHAPES and args.sweep else ())
                }
                if swept:
                    best = min(swept, key=swept.__getitem__)
                    print(
                        f"# {name} carried GEMV sweep (block_n {bn}): "
                        + ", ".join(f"{c} {t:.1f} us" for c, t in swept.items())
                        + f"; best {best}"
                    )
                extra.update(swept)
            prod = producer(name, kin)
            if prod is not None:  # the whole site: producer + selection + product
                pxs = [
                    torch.randn(batch, prod.width(kin), device=DEVICE, dtype=torch.bfloat16)
                    for _ in ws
                ]
                extra["site_dense"] = timed(
                    lambda x, w, p=prod: F.linear(p.reference(x), w), ws, pxs
                )

                def fused(x, wt, k=k, n=n, h=hint, p=prod, b=batch):
                    if b == 1:  # the list GEMV
                        return G.sparse_gemv(x, wt, k, n_out=n, hint=h, producer=p)
                    return (G.masked_topk(x, k, h, producer=p) @ wt)[:, :n]

                extra["site_fused"] = timed(fused, wts, pxs)
            if batch > 1:  # BitNet (+ Q-Sparse): ternary GEMV, tensor cores vs dp4a
                packs = [G.pack_ternary(G.ternarize(w)[0]) for w in ws]
                for tag, cfg in (
                    ("split", None),  # the default: words split on narrow outputs
                    ("dp4a", G.TERNARY_BATCH_CONFIG),  # one program per column block
                    ("dot", G.TERNARY_MMA_CONFIG),  # int8 tensor cores
                ):
                    for sfx, kk in (("", None), ("_topk", k)):
                        extra[f"ternary_{tag}{sfx}"] = timed(
                            lambda x, p, kk=kk, c=cfg, h=hint: G.ternary_gemv(
                                x, p, 0.5, kk, 8, cfg=c, hint=h if kk else None
                            ),
                            packs,
                        )
                del packs
            r = dict(shape=name, kin=kin, n=n, batch=batch, k=k, dense_us=dense)
            r.update(sparse_us=sparse, carry_us=carry, topk_gemm_us=masked)
            r.update(bisect_gemm_us=bisect, carry_list_us=carry_list, carry_sweep_us=extra)
            results.append(r)
            mtxt = f"{masked:.1f} ({dense / masked:.2f}x)" if masked else "-"
            print(
                row(
                    f"{name} {kin}->{n}",
                    batch,
                    f"{dense:.1f}",
                    f"{sparse:.1f} ({dense / sparse:.2f}x)",
                    f"{carry:.1f} ({dense / carry:.2f}x)",
                    mtxt,
                ),
                flush=True,
            )
            key = f"sparse_gemv_7b.{name}_b{batch}_S{args.sparsity:g}"
            emit(f"{key}.dense_us", dense, "us")
            for what, t in (
                ("incl", sparse),
                ("carry", carry),
                ("carry_list", carry_list),
                ("topk_gemm", masked),
                ("bisect_gemm", bisect),
            ):
                if t:
                    emit(f"{key}.{what}", dense / t)
                    emit(f"{key}.{what}_us", t, "us")
            for c, t in extra.items():
                if c.startswith("s") and c[1].isdigit():
                    emit(f"{key}.carry_sweep.{c}_us", t, "us")
                    continue
                base = extra["site_dense"] if c.startswith("site") else dense
                if c != "site_dense":
                    emit(f"{key}.{c}", base / t)
                emit(f"{key}.{c}_us", t, "us")
            if "site_fused" in extra:
                print(
                    f"# {name} batch {batch} site ({PRODUCERS[name]} + product): torch + cuBLAS "
                    f"{extra['site_dense']:.1f} us, fused selection {extra['site_fused']:.1f} us "
                    f"({extra['site_dense'] / extra['site_fused']:.2f}x)"
                )
            tern = {c: t for c, t in extra.items() if c.startswith("ternary")}
            if tern:
                print(
                    f"# {name} batch {batch} ternary vs cuBLAS {dense:.1f} us: "
                    + ", ".join(f"{c} {t:.1f} us ({dense / t:.2f}x)" for c, t in tern.items())
                )
            print(
                f"RATIO sparse_gemv_7b {name} batch {batch}: sparse {dense / sparse:.2f}x, "
                f"carry {dense / carry:.2f}x"
                + (f", carry_list {dense / carry_list:.2f}x" if carry_list else "")
                + (f", topk+gemm {dense / masked:.2f}x" if masked else "")
                + (f", bisect+gemm {dense / bisect:.2f}x" if bisect else "")
            )
        del ws, wts
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
