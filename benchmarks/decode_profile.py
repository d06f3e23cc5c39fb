"""Where a decode step's time goes: the CUDA kernels of one replayed step per mode (torch
profiler, CUDA time summed per kernel name), for one preset and batch.

    PYTHONPATH=$PWD python3 benchmarks/decode_profile.py --preset 7B --batch 8 --modes bitnet
    PYTHONPATH=$PWD python3 benchmarks/decode_profile.py --preset 7B --compile --graph

``--compile`` (inductor) and ``--graph`` (one CUDA graph per step) profile the step that
``qsparse-generate --compile`` times; the kernels replayed inside a graph are still traced
one by one (CUPTI), so the table lists them as in the eager step. ``--timeline`` adds, per
mode, where the span of a replayed step goes: each kernel's share (the time it alone
extended the step, :func:`attribute`) and the time no kernel ran. ``FIGURE`` lines under
``decode_profile.<preset>_b<batch>_<mode>``: ``span_us``, ``idle_us``, ``kernels`` and
``share_us.<kernel>`` for the project's own kernels.

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

from benchmarks._figures import emit
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
        "--timeline",
        action="store_true",
        help="each kernel's share of the replayed steps' span, and the time no kernel ran",
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


Kernel = tuple[str, float, float]  # (name, start us, duration us)


def _kernels(prof) -> list[Kernel]:
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


def attribute(ks: list[Kernel]) -> tuple[float, dict[str, float], dict[str, int]]:
    """Split one step's span among its kernels ``ks`` (sorted by start): kernel i's share is
    ``end_i - max(start_i, latest end before it)``, the time it alone extended the step (a
    programmatic dependent launched early is charged only from its predecessor's end).
    Returns (span = last end - first start, shares summed by name, calls by name); the span
    minus the shares is the time no kernel ran."""
    share: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    end = ks[0][1]
    for name, t, d in ks:
        share[name] += max(0.0, t + d - max(t, end))
        calls[name] += 1
        end = max(end, t + d)
    return end - ks[0][1], dict(share), dict(calls)


def timeline(engine: DecodeEngine, steps: int, top: int, tag: str) -> None:
    """Replay ``steps`` decode steps one at a time (synchronized in between; the engine has
    just generated at least ``steps + 2`` tokens) and print, per step on average, the span,
    the idle time and the ``top`` kernels by share (:func:`attribute`)."""
    engine.cache.pos.sub_(steps + 2)  # decode again over positions already written
    for _ in range(2):
        engine._run_step()
    torch.cuda.synchronize()
    span = 0.0
    share: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine._run_step()
            torch.cuda.synchronize()
        ks = _kernels(prof)
        if not ks:
            print(f"TIMELINE {tag}: no kernels traced")
            return
        s, sh, c = attribute(ks)
        span += s / steps
        share.update({k: v / steps for k, v in sh.items()})
        calls.update({k: v / steps for k, v in c.items()})
    idle = span - sum(share.values())
    print(
        f"TIMELINE {tag}: step span {span:.1f} us, {sum(calls.values()):.0f} kernels, "
        f"no kernel running {idle:.1f} us"
    )
    emit(f"decode_profile.{tag}.span_us", span, "us")
    emit(f"decode_profile.{tag}.idle_us", idle, "us")
    emit(f"decode_profile.{tag}.kernels", sum(calls.values()))
    for name, t in share.most_common(top):
        print(f"  share {t:8.1f} us/step {calls[name]:5.0f} calls  {name[:70]}")
        if name.startswith("_"):  # the project's own kernels: a figure each
            emit(f"decode_profile.{tag}.share_us.{name.strip('_')}", t, "us")


if __name__ == "__main__":
    main()
