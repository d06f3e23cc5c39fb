"""Figure: launch settings of the decode step against the shipped ones, in the same run. For
one preset and mode (random weights, S = 0.6, batch 1, the step compiled by inductor in a CUDA
graph: :func:`qsparse.cli.generate.measure`), the step is built and timed once per variant,
and each variant's tokens/s is divided by the ``default`` run's.

    PYTHONPATH=$PWD python3 benchmarks/decode_variants.py --preset 7B --mode bitnet \\
        --variants default,no_pdl,ternary=128x16x4,prep_warps=4
    PYTHONPATH=$PWD python3 benchmarks/decode_variants.py --preset tiny --new-tokens 2 \
        --compile-backend eager -- --device cpu --no-graph    # a CPU check of the script

Arguments after ``--`` go to every ``qsparse-generate`` run.

Variants (module settings of :mod:`qsparse.kernels.gemv` and :mod:`qsparse.decode_view`,
changed for that run only):

- ``default``: as shipped (always measured, first);
- ``no_pdl``: no programmatic dependent launch anywhere (each GEMV waits for its selection or
  activation kernel to end before it starts, instead of loading weights meanwhile);
- ``ternary=BKxBNxW``: the batch-1 ternary GEMV's launch shape (``block_k`` word rows per
  tile, ``block_n`` columns per program, ``num_warps``) in place of ``TERNARY_CONFIG``, or of
  ``TERNARY_SPARSE_CONFIG`` in a mode with top-k;
- ``prep_warps=W``: warps of the ternary activation kernel (``select_warps`` of that config);
- ``select_warps=W``: warps of every one-program selection kernel whose config leaves them to
  the row width (:func:`qsparse.kernels.gemv.select_warps_for` and
  :data:`~qsparse.kernels.gemv.WIDE_LIST_WARPS`; the Q-Sparse list kernel);
- ``wide_select_warps=W``: warps of the batch-1 list kernel for rows wider than 8192 inputs
  only (the 7B down site; :data:`qsparse.kernels.gemv.WIDE_LIST_WARPS`, 32 as shipped), the
  others keeping the shipped rule;
- ``no_residual_sum``: each residual add as a PyTorch op (a kernel of its own) instead of in
  the next site's selection or activation kernel (:data:`qsparse.decode_view.RESIDUAL_SUM`);
- ``pdl_chain``: each site's selection or activation kernel launched as a programmatic
  dependent of the kernel before it, instead of after it ends
  (:data:`qsparse.kernels.gemv.PDL_CHAIN` on);
- ``glu_selection`` / ``no_glu_selection``: every down site's first kernel that can computes
  ``act(g) * u`` from the gate|up output / none does (a GLU kernel of its own instead), in
  place of the shipped choice, the ternary sites only
  (:data:`qsparse.decode_view.GLU_IN_SELECTION`);
- ``attention_preload`` / ``no_attention_preload``: the decode attention loads its first
  block of cached keys and values before the step's position / after it, as it loads the
  later blocks (:data:`qsparse.kernels.decode_attention.PRELOAD_FIRST_BLOCK` on / off; off
  is shipped since 2026-12-06);
- ``weights_evict_first`` / ``no_weights_evict_first``: the list GEMV and the 2-bit ternary
  GEMV load their weights with the L2 policy ``evict_first`` / without a policy
  (:data:`qsparse.kernels.gemv.WEIGHTS_EVICT_FIRST` on / off; on is shipped since
  2026-12-06).

``FIGURE decode_variants.<preset>.<mode>.<variant>.tokens_per_s`` and ``.ratio`` (to the
default run; ``=`` in a variant's name written ``_``); ``RATIO`` lines as it goes.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace

from benchmarks._figures import emit
from qsparse import decode_view as V
from qsparse.cli.generate import _parser, measure
from qsparse.generate import MODES
from qsparse.kernels import decode_attention as DA
from qsparse.kernels import gemv as G

_TERNARY = re.compile(r"ternary=([1-9]\d*)x([1-9]\d*)x([1-9]\d*)")
_WARPS = re.compile(r"prep_warps=([1-9]\d*)")
_SELECT_WARPS = re.compile(r"select_warps=([1-9]\d*)")
_WIDE_SELECT_WARPS = re.compile(r"wide_select_warps=([1-9]\d*)")
_NAMED = (
    "default",
    "no_pdl",
    "no_residual_sum",
    "pdl_chain",
    "glu_selection",
    "no_glu_selection",
    "attention_preload",
    "no_attention_preload",
    "weights_evict_first",
    "no_weights_evict_first",
)


def check_variant(name: str) -> str:
    """``name`` if it is a variant this script knows, else ValueError naming the forms."""
    if (
        any(r.fullmatch(name) for r in (_TERNARY, _WARPS, _SELECT_WARPS, _WIDE_SELECT_WARPS))
        or name in _NAMED
    ):
        return name
    raise ValueError(
        f"unknown variant {name!r}: use {', '.join(_NAMED)}, ternary=BKxBNxW, prep_warps=W or "
        "select_warps=W or wide_select_warps=W (positive integers)"
    )


@contextlib.contextmanager
def variant(name: str, mode: str) -> Iterator[None]:
    """The module settings of variant ``name`` while the block runs (restored after)."""
    attr = "TERNARY_SPARSE_CONFIG" if mode == "bitnet_qsparse" else "TERNARY_CONFIG"
    names = (
        "_pdl_device_ok",
        "PDL_CHAIN",
        "WEIGHTS_EVICT_FIRST",
        "select_warps_for",
        "WIDE_LIST_WARPS",
        attr,
    )
    saved = {a: getattr(G, a) for a in names}
    base, residual_sum, glu = saved[attr], V.RESIDUAL_SUM, V.GLU_IN_SELECTION
    preload = DA.PRELOAD_FIRST_BLOCK
    try:
        if name == "no_pdl":
            G._pdl_device_ok = lambda index: False
        elif name == "no_residual_sum":
            V.RESIDUAL_SUM = False
        elif name == "pdl_chain":
            G.PDL_CHAIN = True
        elif name == "glu_selection":
            V.GLU_IN_SELECTION = V.GLU_SITE_MODES
        elif name == "no_glu_selection":
            V.GLU_IN_SELECTION = ()
        elif name in ("attention_preload", "no_attention_preload"):
            DA.PRELOAD_FIRST_BLOCK = name == "attention_preload"
        elif name in ("weights_evict_first", "no_weights_evict_first"):
            G.WEIGHTS_EVICT_FIRST = name == "weights_evict_first"
        elif m := _TERNARY.fullmatch(name):
            bk, bn, warps = (int(v) for v in m.groups())
            setattr(G, attr, replace(base, block_k=bk, block_n=bn, num_warps=warps))
        elif m := _WARPS.fullmatch(name):
            setattr(G, attr, replace(base, select_warps=int(m.group(1))))
        elif m := _SELECT_WARPS.fullmatch(name):
            w = int(m.group(1))
            G.select_warps_for = lambda width, warps=0, lanes_per_warp=512: warps or w
            G.WIDE_LIST_WARPS = w
        elif m := _WIDE_SELECT_WARPS.fullmatch(name):
            G.WIDE_LIST_WARPS = int(m.group(1))
        yield
    finally:
        for a, v in saved.items():
            setattr(G, a, v)
        V.RESIDUAL_SUM, V.GLU_IN_SELECTION = residual_sum, glu
        DA.PRELOAD_FIRST_BLOCK = preload


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog="arguments after -- go to qsparse-generate"
    )
    ap.add_argument("--preset", default="7B")
    ap.add_argument("--mode", default="bitnet", choices=MODES)
    ap.add_argument("--variants", default="default,no_pdl", help="comma list (module doc)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    try:
        names = [check_variant(v) for v in args.variants.split(",") if v != "default"]
    except ValueError as err:
        ap.error(f"--variants: {err}")
    gen_args = _parser().parse_args(
        ["--preset", args.preset, "--new-tokens", str(args.new_tokens)]
        + ["--compile", args.compile_backend, *argv[cut + 1 :]]
    )
    key = f"decode_variants.{args.preset}.{args.mode}"
    base = None
    for name in ["default", *names]:
        with variant(name, args.mode):
            ((_, tps, _, _),) = measure(gen_args, [args.mode])
        base = tps if name == "default" else base
        print(f"RATIO decode {args.preset} {args.mode} {name}: {tps / base:.3f}x ({tps:.1f} tok/s)")
        tag = name.replace("=", "_")
        emit(f"{key}.{tag}.tokens_per_s", tps, "tokens/s")
        emit(f"{key}.{tag}.ratio", tps / base)


if __name__ == "__main__":
    main()
