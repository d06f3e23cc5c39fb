"""FSDP2 on two GPUs against one GPU, the 7B preset under FSDP, and an FSDP resume (issue 15).

Runs ``python -m qsparse.cli.train`` in subprocesses (random tokens, 8 x 2048 tokens per GPU per
step, bf16 autocast, Q-Sparse top-k S=0.5):

1. ``one_gpu``: the 374M preset with ``trainer=gpu``;
2. ``fsdp2``: the same with ``trainer=fsdp trainer.devices=2`` (sharded checkpoint at half
   way, transformers export at the end);
3. ``fsdp_7b``: the 7B preset with BitNet b1.58 + Q-Sparse, ``trainer=fsdp`` on 2 GPUs with
   activation checkpointing, 1 x 2048 tokens per GPU, a few steps, no checkpoint;
4. ``resume``: the ``fsdp2`` run restarted from its half-way sharded checkpoint;
5. ``rerun``: the ``fsdp2`` run once more, uninterrupted, as the noise floor of the resume
   check (bf16 GPU kernels with atomic adds are not bitwise reproducible run to run).

Throughput is the median of the per-step ``perf/tokens_per_s`` (all ranks together) after
the first 3 steps, so a step that wrote a checkpoint does not count. Figures:
``fsdp2_over_one_gpu`` (goal >= 1.85), ``fsdp_7b_peak_gib`` (rank 0's
``torch.cuda.max_memory_allocated``; nvidia-smi samples of both GPUs go to ``smi.csv``), and
``resume_max_abs_loss_diff`` (per-step training loss of the resumed leg against the
uninterrupted run) beside ``rerun_max_abs_loss_diff`` (the same for a second uninterrupted
run: the resume is exact when its difference is no larger).

    python3 benchmarks/fsdp_scaling.py --out /tmp/fsdp [--skip 7b,resume]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._figures import emit

RUNS = Path("/tmp/qsparse_fsdp_runs")
COMMON = [
    "data=random",
    "sparsity=topk",
    "sparsity.ratio=0.5",
    "logger=csv",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.limit_val_batches=2",
    "callbacks.throughput.every_n_steps=1",
    "callbacks.throughput.warmup_steps=0",
    "callbacks.sparsity.every_n_steps=1000",
]


def train(out: Path, name: str, args: list[str], timeout: int = 300) -> Path:
    """One ``qsparse.train`` run into ``RUNS/name``, its log in ``out``; returns the run dir."""
    run_dir = RUNS / name
    t0 = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        res = subprocess.run(
            [sys.executable, "-m", "qsparse.cli.train", *COMMON, *args, f"run_dir={run_dir}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            env={**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"},
        )
    print(f"{name}: exit {res.returncode} in {time.perf_counter() - t0:.0f} s", flush=True)
    if res.returncode != 0:
        print((out / f"{name}.log").read_text()[-3000:], flush=True)
        raise SystemExit(f"{name} failed")
    return run_dir


def series(run_dir: Path, key: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for path in run_dir.rglob("metrics.csv"):
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get(key) and row.get("step"):
                    out[int(float(row["step"]))] = float(row[key])
    return out


def tokens_per_s(run_dir: Path, first: int = 3) -> float:
    """Median per-step tokens/s (all ranks) from step ``first`` on."""
    values = [v for s, v in sorted(series(run_dir, "perf/tokens_per_s").items()) if s >= first]
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--skip", default="", help="comma list of: 7b, resume")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(RUNS, ignore_errors=True)
    skip = set(filter(None, args.skip.split(",")))
    n, half = args.steps, args.steps // 2
    size = ["model=374M", f"trainer.max_steps={n}"]
    one = train(out, "one_gpu", [*size, "trainer=gpu", "export=false",
                                 "callbacks.checkpoint.every_n_train_steps=100000"])  # fmt: skip
    fsdp = train(out, "fsdp2", [*size, "trainer=fsdp", "trainer.devices=2",
                                f"callbacks.checkpoint.every_n_train_steps={half}",
                                "callbacks.checkpoint.save_top_k=-1"])  # fmt: skip
    a, b = tokens_per_s(one), tokens_per_s(fsdp)
    emit("one_gpu_tokens_per_s", a, "tokens/s")
    emit("fsdp2_tokens_per_s", b, "tokens/s")
    emit("fsdp2_over_one_gpu", b / a, "x")
    assert (fsdp / "hf" / "config.json").is_file(), "no transformers export"

    if "7b" not in skip:
        smi = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv", "-lms", "500"],
            stdout=open(out / "smi.csv", "w"),
        )
        try:
            big = train(out, "fsdp_7b", [
                "model=7B", "quant=bitnet", "trainer=fsdp", "trainer.devices=2",
                "gradient_checkpointing=true", "trainer.max_steps=5",
                "data.batch_size=1", "trainer.limit_val_batches=0", "callbacks.checkpoint=null",
                "export=false",
            ], timeout=400)  # fmt: skip
        finally:
            smi.terminate()
        summary = json.loads((big / "summary.json").read_text())
        emit("fsdp_7b_peak_gib", summary["peak_memory_gib"], "GiB")
        emit("fsdp_7b_tokens_per_s", tokens_per_s(big, first=2), "tokens/s")
        print(json.dumps({k: summary.get(k) for k in ("params_total", "step", "train_time_s")}))

    if "resume" not in skip:
        resumed = RUNS / "resume"
        (resumed / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.copytree(
            fsdp / "checkpoints" / f"step{half:07d}.ckpt", resumed / "checkpoints" / "last.ckpt"
        )
        train(out, "resume", [*size, "trainer=fsdp", "trainer.devices=2", "resume=true",
                              "export=false", "callbacks.checkpoint=null"])  # fmt: skip
        # the noise floor: the same uninterrupted run again (bf16 GPU kernels with atomics
        # are not bitwise reproducible, so "equal" means "within what a re-run differs by")
        twin = train(out, "rerun", [*size, "trainer=fsdp", "trainer.devices=2",
                                    "export=false", "callbacks.checkpoint=null"])  # fmt: skip
        ref, got, again = (series(r, "train/loss") for r in (fsdp, resumed, twin))
        steps = sorted(s for s in got if s >= half)
        assert steps and steps[-1] == n - 1, steps
        emit("resume_max_abs_loss_diff", max(abs(got[s] - ref[s]) for s in steps), "nats")
        emit("rerun_max_abs_loss_diff", max(abs(again[s] - ref[s]) for s in steps), "nats")
        print("step  uninterrupted  resumed  re-run")
        for s in steps:
            print(f"{s:4d}  {ref[s]:.5f}  {got[s]:.5f}  {again[s]:.5f}")


if __name__ == "__main__":
    main()
