"""What a persistent decode step would pay per phase: a grid-wide barrier between programs
that stay resident, against the dependent kernel launch it would replace, in the same run.

A decode step today is about 450 kernels in a CUDA graph (docs/decode.md, "Where a step's
time goes"); a persistent step would instead keep one program per SM resident and separate
its phases with barriers. This script times both, for P programs (default: one per SM):

- ``barrier``: one kernel in which each of P programs runs R rounds of "arrive (atomic add
  on a counter, release), then spin until the counter reaches (round + 1) * P (acquire)";
  microseconds per round, the launch amortized over R rounds;
- ``launch``: R launches of a P-program kernel that stores one int per program, captured in a
  CUDA graph, each waiting for the one before it as the decode step's kernels do;
  microseconds per launch.

``FIGURE grid_barrier.p<P>.{barrier_us,launch_us,launch_vs_barrier}``; the ratio is how many
times cheaper a barrier is than a launch. All P programs must be resident at once for the
barrier not to deadlock: P is refused above the SM count.

    PYTHONPATH=$PWD python3 benchmarks/grid_barrier.py              # one program per SM
    PYTHONPATH=$PWD python3 benchmarks/grid_barrier.py --programs 32 132 --rounds 2000
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from benchmarks._figures import emit
from benchmarks._timing import time_cuda, time_graph


@triton.jit
def _barrier_rounds_kernel(count_ptr, out_ptr, rounds, programs):
    """Each program: ``rounds`` grid barriers on the int32 counter ``count_ptr`` (zero at the
    start); it stores the sum of the counter values it saw leaving each barrier (every one at
    least ``(r + 1) * programs``), so the rounds cannot be optimized away."""
    pid = tl.program_id(0)
    seen_sum = 0
    for r in range(rounds):
        tl.atomic_add(count_ptr, 1, sem="release")
        target = (r + 1) * programs
        seen = tl.atomic_add(count_ptr, 0, sem="acquire")
        while seen < target:
            seen = tl.atomic_add(count_ptr, 0, sem="acquire")
        seen_sum += seen
    tl.store(out_ptr + pid, seen_sum)


@triton.jit
def _store_pid_kernel(out_ptr):
    """The cheapest kernel: each program stores its index."""
    pid = tl.program_id(0)
    tl.store(out_ptr + pid, pid)


def barrier_rounds(
    programs: int, rounds: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run :func:`_barrier_rounds_kernel` once; returns (each program's sum of the counter
    values it left its barriers with, [programs] int32; the counter, [1] int32, which must end
    at ``rounds * programs``: one arrival per program and round)."""
    count = torch.zeros(1, dtype=torch.int32, device=device)
    out = torch.empty(programs, dtype=torch.int32, device=device)
    _barrier_rounds_kernel[(programs,)](count, out, rounds, programs, num_warps=4)
    return out, count


def check_programs(programs: int, sms: int) -> int:
    """``programs`` if 1 <= programs <= sms (all resident at once), else ValueError."""
    if not 1 <= programs <= sms:
        raise ValueError(
            f"--programs {programs}: must be in [1, {sms}] (one resident program per SM at "
            "most, or the barrier never opens)"
        )
    return programs


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--programs", type=int, nargs="+", default=None, help="default: SM count")
    ap.add_argument("--rounds", type=int, default=1000)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device (the CPU tests run the kernel under the interpreter)")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    try:
        counts = [check_programs(p, sms) for p in (args.programs or [sms])]
    except ValueError as err:
        ap.error(str(err))
    for p in counts:
        _, count = barrier_rounds(p, args.rounds, "cuda")
        if int(count.item()) != p * args.rounds:
            raise RuntimeError(
                f"barrier counter ended at {int(count.item())}, not {p * args.rounds}: the "
                "arrivals are not one per program and round"
            )
        barrier_ms = time_cuda(lambda p=p: barrier_rounds(p, args.rounds, "cuda"))
        barrier_us = 1000.0 * barrier_ms / args.rounds
        out = torch.empty(p, dtype=torch.int32, device="cuda")
        launch_us = time_graph([lambda p=p, out=out: _store_pid_kernel[(p,)](out)], reps=200)
        print(
            f"RATIO grid barrier, {p} programs: {barrier_us:.2f} us a barrier, "
            f"{launch_us:.2f} us a dependent launch: {launch_us / barrier_us:.2f}x"
        )
        emit(f"grid_barrier.p{p}.barrier_us", barrier_us, "us")
        emit(f"grid_barrier.p{p}.launch_us", launch_us, "us")
        emit(f"grid_barrier.p{p}.launch_vs_barrier", launch_us / barrier_us)


if __name__ == "__main__":
    main()
