"""Where a decode step's time goes: the CUDA kernels of one replayed step per mode (torch
profiler, CUDA time summed per kernel name), for one preset and batch.

    PYTHONPATH=$PWD python3 benchmarks/decode_profile.py --preset 7B --batch 8 --modes bitnet
    PYTHONPATH=$PWD python3 benchmarks/decode_profile.py --preset 7B --compile --graph

``--compile`` (inductor) and ``--graph`` (one CUDA graph per step) profile the step that
``qsparse-generate --compile`` times; the kernels replayed inside a graph are still traced
one by one (CUPTI), so the table lists them as in the eager step. ``--timeline`` adds, per
mode, where the wall time of the replayed steps goes: kernel time against the idle gaps
between consecutive kernels (the span of a step minus its kernels' busy time), and the
kernel pairs whose gaps cost most, summed over a step.

    PYTHONPATH=$PWD python3 benchmarks/decode_profile.py --preset 7B --compile --graph --timeline
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

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
    ap.add_argument(
        "--timeline", action="store_true", help="kernel time vs gaps of the replayed steps"
    )
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
        if args.timeline:
            timeline(engine, args.steps, args.top, f"{args.preset}_b{args.batch}_{mode}")
        del engine, model
        torch.cuda.empty_cache()


def _kernels(prof) -> list[tuple[str, float, float]]:
    """(name, start us, duration us) of every CUDA kernel the profiler traced, by start."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    out = [
        (e["name"], float(e["ts"]), float(e["dur"]))
        for e in events
        if e.get("cat") == "kernel" and "dur" in e
    ]
    return sorted(out, key=lambda e: e[1])


def timeline(engine: DecodeEngine, steps: int, top: int, tag: str) -> None:
    """Replay ``steps`` decode steps one at a time (synchronized in between) and print, per
    step on average, the span from its first kernel's start to its last kernel's end, the
    kernels' summed time, the gaps (span minus busy time, where no kernel of the step ran) and
    the ``top`` consecutive kernel pairs with the largest summed gap; then each kernel's share
    of the span, ``end_i - max(start_i, end_{i-1})`` (a kernel started early, as a
    programmatic dependent, is charged only from its predecessor's end), summed by name.
    Per step, these shares plus the gaps make the span."""
    # decode again over positions already written: back by the steps taken below (the engine
    # has just generated at least that many tokens)
    engine.cache.pos.sub_(steps + 2)
    step = engine._run_step
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    spans, busy, count = [], [], []
    gaps: collections.Counter[tuple[str, str]] = collections.Counter()
    share: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        ks = _kernels(prof)
        if not ks:
            print(f"TIMELINE {tag}: no kernels traced")
            return
        spans.append(ks[-1][1] + ks[-1][2] - ks[0][1])
        busy.append(sum(d for _, _, d in ks))
        count.append(len(ks))
        end = ks[0][1]
        for name, t, d in ks:
            share[name[:60]] += max(0.0, t + d - max(t, end)) / steps
            calls[name[:60]] += 1 / steps
            end = max(end, t + d)
        for (a, ta, da), (b, tb, _) in zip(ks, ks[1:], strict=False):
            gaps[(a[:40], b[:40])] += max(0.0, tb - (ta + da)) / steps
    span, work = sum(spans) / steps, sum(busy) / steps
    print(
        f"TIMELINE {tag}: step span {span:.1f} us, kernels {work:.1f} us "
        f"({sum(count) / steps:.0f} kernels), gaps {span - work:.1f} us "
        f"({100 * (span - work) / span:.0f}% of the span)"
    )
    idle = span - sum(share.values())
    print(f"  idle (no kernel running) {idle:.1f} us/step")
    for (a, b), g in gaps.most_common(top):
        print(f"  gap {g:8.1f} us/step  {a} -> {b}")
    for name, t in share.most_common(2 * top):
        print(f"  share {t:8.1f} us/step  {calls[name]:5.0f} calls  {name}")


if __name__ == "__main__":
    main()
