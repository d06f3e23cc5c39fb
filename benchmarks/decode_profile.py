"""Where a decode step's time goes: the CUDA kernels of one replayed step per mode (torch
profiler, CUDA time summed per kernel name), for one preset and batch.

    PYTHONPATH=$PWD python3 benchmarks/decode_profile.py --preset 7B --batch 8 --modes bitnet
    PYTHONPATH=$PWD python3 benchmarks/decode_profile.py --preset 7B --compile --graph

``--compile`` (inductor) and ``--graph`` (one CUDA graph per step) profile the step that
``qsparse-generate --compile`` times; the kernels replayed inside a graph are still traced
one by one (CUPTI), so the table lists them as in the eager step.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from qsparse.cli.generate import _preset_model
from qsparse.generate import MODES, DecodeEngine, convert


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="7B")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--compile", action="store_true", help="inductor-compiled step")
    ap.add_argument("--graph", action="store_true", help="replay each step as a CUDA graph")
    args = ap.parse_args()
    for mode in args.modes.split(","):
        ns = argparse.Namespace(preset=args.preset, seed=0, device="cuda")
        model = convert(_preset_model(ns, torch.bfloat16), mode, 0.6)
        engine = DecodeEngine(model, cuda_graph=args.graph, compile=args.compile)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, 16))
        engine.generate(ids, args.steps + 2)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.generate(ids, args.steps + 2)
        print(
            f"## {args.preset} batch {args.batch} {mode}: {args.steps + 1} steps + prompt"
            f"{' compiled' if args.compile else ''}{' in CUDA graphs' if args.graph else ''}"
        )
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top))
        del engine, model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
