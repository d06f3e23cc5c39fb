"""Timing helpers shared by the kernel benchmarks (CUDA events, medians, CUDA-graph replays)."""

from __future__ import annotations

import argparse
import collections
import statistics
from collections.abc import Callable

import torch

from benchmarks._figures import emit


def time_cuda(fn: Callable[[], object], warmup: int = 3, iters: int = 10) -> float:
    """Median wall time of ``fn()`` in milliseconds, each call bracketed by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_times(fn: Callable[[], object], reps: int = 20) -> dict[str, float]:
    """Mean device microseconds per call of every kernel ``fn`` launches (by kernel name, cut
    to 60 characters), from the CUDA profiler after three warm-up calls (L2-warm)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    tot: dict[str, float] = collections.defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            tot[ev.name[:60]] += ev.device_time / reps
    return dict(tot)


def time_graph(calls: list[Callable[[], object]], reps: int = 4, replays: int = 20) -> float:
    """Microseconds per call: capture ``calls`` (typically one per rotated weight buffer, so
    L2 cannot serve them) ``reps`` times into one CUDA graph, replay it, return the median
    replay time divided by the number of calls in the graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:  # warm up: compile and autotune outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for fn in calls:
                fn()
    ms = time_cuda(graph.replay, warmup=2, iters=replays)
    return ms * 1000.0 / (reps * len(calls))


def sweep(configs, calls_for: Callable, label: str, top: int = 5):
    """Time ``calls_for(cfg)`` (a list of calls, as for :func:`time_graph`) for every config,
    skipping shapes the compiler rejects; print the ``top`` fastest and return the best."""
    results = []
    for cfg in configs:
        try:
            t = time_graph(calls_for(cfg), reps=2, replays=10)
        except Exception as e:  # noqa: BLE001  (a launch shape the compiler rejects)
            print(f"# skip {cfg}: {type(e).__name__}")
            continue
        results.append((t, cfg))
    results.sort(key=lambda r: r[0])
    for t, cfg in results[:top]:
        print(f"# sweep {label}: {t:.2f} us {cfg}")
    return results[0][1]


def row(*cols: object) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(str(c) for c in cols) + " |"


def emit_vs_dense(key: str, cells: tuple, dense_us: float, timed: dict[str, float]) -> None:
    """Report one measured point against the dense baseline of the same run.

    Prints a Markdown row (``cells``, then ``dense_us`` and each of ``timed``'s microseconds,
    then each speed-up ``dense_us / t`` as ``1.23x``), a ``RATIO key name speed-up ...`` line,
    and the figures ``key.dense_us``, ``key.<name>_us`` (us) and ``key.<name>`` (the speed-up)."""
    ratios = {name: dense_us / t for name, t in timed.items()}
    times = [f"{t:.1f}" for t in (dense_us, *timed.values())]
    print(row(*cells, *times, *(f"{r:.2f}x" for r in ratios.values())), flush=True)
    print(f"RATIO {key} " + " ".join(f"{name} {r:.2f}" for name, r in ratios.items()))
    emit(f"{key}.dense_us", dense_us, "us")
    for name, t in timed.items():
        emit(f"{key}.{name}_us", t, "us")
    for name, r in ratios.items():
        emit(f"{key}.{name}", r)


def gemv_setup(description: str | None) -> tuple[argparse.Namespace, list[torch.Tensor]]:
    """Arguments shared by the GEMV benchmarks and the rotated bf16 weight buffers they time.

    Returns the parsed args and ``--buffers`` random [out, in] bf16 CUDA weights (scale 0.02):
    cycling through several copies keeps L2 from serving the weights.
    """
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--in-features", type=int, default=4096)
    ap.add_argument("--out-features", type=int, default=11008)
    ap.add_argument("--buffers", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="no config sweep")
    args = ap.parse_args()
    torch.manual_seed(0)
    shape = (args.out_features, args.in_features)
    ws = [
        torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(args.buffers)
    ]
    return args, ws
