"""Fine-tuning recovery: Q-Sparse SFT at S against dense SFT, same data, steps and LR.

    python benchmarks/finetune_recovery.py --out outputs/ft_recovery            # SmolLM2, GPU
    python benchmarks/finetune_recovery.py --parallel --kinds dense lm \\
        --variant 'kd=distill=lm_logits distill.teacher_path={dense_hf}' \\
        --variant 'greedy=sparsity.allocation=greedy' -- trainer.max_steps=300
    python benchmarks/finetune_recovery.py --recipe finetune/tiny --device cpu \\
        --out /tmp/ft -- model.path=/tmp/tiny trainer.max_steps=4   # overrides for every job

Runs ``--recipe`` (default ``finetune/smollm2``) once per job, each a normal ``qsparse-train``
job in its own process (all at once with ``--parallel``). The fixed kinds (``--kinds``, all
three by default):

* ``dense``: ``sparsity=none`` (plain fine-tuning, the reference);
* ``lm``: top-k at ``--sparsity``, next-token loss on the responses only (the paper);
* ``distill``: the same plus ``distill=lm_logits`` (CE + KL to the frozen dense model before
  fine-tuning, on the response tokens).

and every ``--variant NAME[@S1,S2]=OVERRIDES`` (space-separated Hydra overrides on top of
top-k at ``--sparsity``, or at each S after ``@``; as in ``benchmarks/recovery.py``). Two
stages: a variant whose overrides contain ``{dense_hf}`` starts when the ``dense`` job has
finished, with ``{dense_hf}`` replaced by that job's export folder, so
``distill=lm_logits distill.teacher_path={dense_hf}`` distills from the dense *fine-tuned*
model; every other job starts at once (``--parallel``). With ``--parallel``, the per-site
tables of the variants with ``sparsity.allocation=greedy`` are searched once, in this
process, before those jobs start (they find them in the cache), and the tokenized data is
prepared once.

The figure of merit is the response-token loss on the recipe's held-out SFT split
(``val/loss`` of the last step, examples never trained on), printed as a ratio to dense
fine-tuning measured in the same run; the issue's goal is <= 1.05 at S = 0.4. Results
(``val_loss``, the loss at every validation, wall time, the job's overrides and teacher) go to
``<out>/finetune_recovery.json``.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

KINDS = {
    "dense": ["sparsity=none"],
    "lm": ["distill=none"],
    "distill": ["distill=lm_logits"],
}
DENSE_HF = "{dense_hf}"
GREEDY = "sparsity.allocation=greedy"


@dataclass
class Job:
    """One training run of the study: ``name``, its S and its overrides."""

    name: str
    sparsity: float
    overrides: list[str]
    proc: subprocess.Popen[bytes] | None = None
    start: float = 0.0
    resolved: list[str] = field(default_factory=list)

    @property
    def second_stage(self) -> bool:
        return any(DENSE_HF in o for o in self.overrides)

    @property
    def greedy(self) -> bool:
        return GREEDY in self.overrides


def plan_jobs(kinds: list[str], variants: list[str], sparsity: float) -> list[Job]:
    """The fixed ``kinds`` at ``sparsity`` and every ``--variant`` (at its S or ``sparsity``;
    named ``NAME_S<S>`` when it lists S values)."""
    from recovery import _parse_variant

    jobs = [Job(k, 0.0 if k == "dense" else sparsity, list(KINDS[k])) for k in kinds]
    for text in variants:
        name, (values, overrides) = _parse_variant(text)
        for s in values or [sparsity]:
            jobs.append(Job(f"{name}_S{s:g}" if values else name, s, overrides))
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise SystemExit(f"job names must differ, got {names}")
    if any(j.second_stage for j in jobs) and "dense" not in kinds:
        raise SystemExit(f"a variant uses {DENSE_HF}: keep 'dense' in --kinds")
    return jobs


def validation_curve(run_dir: Path) -> dict[int, float]:
    """``{step: val/loss}`` of every validation in the run's CSV log (``csv/metrics.csv``;
    empty before the first): :func:`recovery.val_curves` for ``val/loss``."""
    from recovery import val_curves

    return val_curves(run_dir, ("val/loss",)).get("val/loss", {})


def job_result(job: Job, run_dir: Path, rc: int) -> dict[str, Any] | None:
    """The record of a finished job (``None`` when it failed): val_loss, the curve, the
    overrides it ran with and the teacher it distilled from (its ``config.yaml``)."""
    from omegaconf import OmegaConf

    from qsparse.training.site_allocation import stored_sites

    summary_path = run_dir / "summary.json"
    if rc != 0 or not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    distill = OmegaConf.load(run_dir / "config.yaml").get("distill") or {}
    stored = stored_sites(str(run_dir / "hf"))  # the table a greedy run searched at build
    sites = stored[1] if stored else {}
    return {
        "S": job.sparsity,
        "val_loss": summary.get("val_loss"),
        "val_curve": validation_curve(run_dir),
        "step": summary.get("step"),
        "wall_s": time.perf_counter() - job.start,
        "overrides": job.resolved,
        "distill": distill.get("mode"),
        "teacher_path": distill.get("teacher_path") if distill.get("mode") != "none" else None,
        "site_ratios": [min(sites.values()), max(sites.values())] if sites else None,
        "export_dir": str(run_dir / "hf"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="finetune/smollm2")
    p.add_argument("--sparsity", type=float, default=0.4)
    p.add_argument("--kinds", nargs="*", choices=list(KINDS), default=list(KINDS))
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=OVERRIDES",
        help="an extra job: top-k at --sparsity (or NAME@S1,S2=...) plus these overrides; "
        f"{DENSE_HF} = the dense job's export, the job then waits for it (repeatable)",
    )
    p.add_argument("--device", default="cuda", help="cuda (trainer=gpu) or cpu (trainer=cpu)")
    p.add_argument("--parallel", action="store_true", help="run the jobs at once")
    p.add_argument("--out", default="outputs/finetune_recovery")
    p.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep each job's checkpoints/ (by default removed once the job is recorded; "
        "its export hf/ stays, the start of a later fine-tuning or a teacher)",
    )
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = plan_jobs(args.kinds, args.variant, args.sparsity)
    trainer = "trainer=gpu" if args.device.startswith("cuda") else "trainer=cpu"
    common = [trainer, "logger=csv", *args.overrides]

    def run_dir(job: Job) -> Path:
        return out / "runs" / job.name

    def launch(job: Job, dense_hf: str | None) -> None:
        job.resolved = [o.replace(DENSE_HF, dense_hf or DENSE_HF) for o in job.overrides]
        cmd = [
            sys.executable,
            "-m",
            "qsparse.cli.train",
            f"recipe={args.recipe}",
            f"sparsity.ratio={job.sparsity}",
            *common,
            *job.resolved,
            f"run_dir={run_dir(job)}",
        ]
        log = open(out / f"{job.name}.log", "wb")  # noqa: SIM115 (closed with the process)
        job.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        job.start = time.perf_counter()
        print(f"[finetune] started {job.name}: {' '.join(job.resolved)}", flush=True)
        if not args.parallel:
            job.proc.wait()

    results: dict[str, dict[str, Any]] = {}
    failed: dict[str, dict[str, Any]] = {}

    def record() -> None:  # after every job: a study stopped early keeps what it measured
        (out / "finetune_recovery.json").write_text(
            json.dumps({"args": vars(args), "results": results, "failed": failed}, indent=1)
        )

    def reap(job: Job) -> None:
        assert job.proc is not None
        rc = job.proc.wait()
        result = job_result(job, run_dir(job), rc)
        if result is None:
            print(f"[finetune] {job.name} FAILED (rc {rc}): {out / f'{job.name}.log'}", flush=True)
            failed[job.name] = {"rc": rc, "val_curve": validation_curve(run_dir(job))}
        else:
            results[job.name] = result
            print(f"[finetune] {job.name} val_loss={result['val_loss']}", flush=True)
            if not args.keep_checkpoints:
                from recovery import prune_checkpoints

                prune_checkpoints(run_dir(job))
        record()

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(f"[finetune] stopped by signal {signum}")

    signal.signal(signal.SIGTERM, stop)  # e.g. `timeout`: stop the jobs, keep the record
    try:
        schedule(jobs, args.parallel, launch, reap, lambda: "dense" in results, args, common)
    finally:
        for job in jobs:
            if job.proc is not None and job.proc.poll() is None:
                job.proc.terminate()
                try:
                    job.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    job.proc.kill()
                failed[job.name] = {"rc": "stopped", "val_curve": validation_curve(run_dir(job))}
        record()
        print_table(results, f"{args.recipe}, S={args.sparsity:g}")
    return 0 if len(results) == len(jobs) else 1


def schedule(
    jobs: list[Job],
    parallel: bool,
    launch: Callable[[Job, str | None], None],
    reap: Callable[[Job], None],
    dense_done: Callable[[], bool],
    args: argparse.Namespace,
    common: list[str],
) -> None:
    """Run ``jobs`` in two stages: the first (every job without ``{dense_hf}``), then, once
    ``dense`` has ended, the second with ``{dense_hf}`` filled in (skipped if it failed).
    With ``parallel`` every job of a stage starts at once, the greedy tables are searched
    once, in a thread of this process, while the other jobs train (the greedy jobs start when
    it is done), and each job is recorded when it ends."""
    first = [j for j in jobs if not j.second_stage]
    second = [j for j in jobs if j.second_stage]
    dense_hf = str(Path(args.out) / "runs" / "dense" / "hf")
    if not parallel:
        for job in first:
            launch(job, None)  # waits for the job
            reap(job)
        for job in second:
            if not dense_done():
                print(f"[finetune] {job.name} SKIPPED: the dense job failed", flush=True)
                continue
            launch(job, dense_hf)
            reap(job)
        return
    if len(jobs) > 1:
        _prepare_once(args.recipe, [*common, *KINDS["dense"]])
    waiting = [j for j in jobs if j.greedy or j.second_stage]
    for job in first:
        if job not in waiting:
            launch(job, None)

    def search() -> None:
        try:
            for s in sorted({j.sparsity for j in jobs if j.greedy}):
                one = next(j for j in jobs if j.greedy and j.sparsity == s)
                _search_table(args.recipe, [*common, *one.overrides, f"sparsity.ratio={s}"], args)
        except Exception as exc:  # the greedy jobs then search for themselves (and say why)
            print(f"[finetune] greedy table search failed: {exc}", flush=True)

    searching = threading.Thread(target=search, daemon=True)
    if any(j.greedy for j in jobs):
        searching.start()
    reaped: set[str] = set()
    dense = next((j for j in jobs if j.name == "dense"), None)
    while True:
        for job in jobs:
            if job.proc is not None and job.name not in reaped and job.proc.poll() is not None:
                reap(job)
                reaped.add(job.name)
        dense_ended = dense is None or dense.name in reaped
        for job in list(waiting):
            if job.greedy and searching.is_alive():
                continue
            if job.second_stage and not dense_ended:
                continue
            waiting.remove(job)
            if job.second_stage and not dense_done():
                print(f"[finetune] {job.name} SKIPPED: the dense job failed", flush=True)
            else:
                launch(job, dense_hf if job.second_stage else None)
        if not waiting and all(j.proc is None or j.name in reaped for j in jobs):
            return
        time.sleep(1.0)


def print_table(results: dict[str, dict[str, Any]], title: str) -> None:
    """One line per job: S, held-out response loss, ratio to dense, loss curve, wall time."""
    dense = results.get("dense", {}).get("val_loss")
    print(f"\nheld-out SFT response loss, {title}")
    for name, r in results.items():
        ratio = f" ({r['val_loss'] / dense:.3f}x dense)" if dense and r["val_loss"] else ""
        curve = " ".join(f"{v:.3f}" for _, v in sorted(r["val_curve"].items()))
        teacher = f"  teacher={r['teacher_path']}" if r.get("teacher_path") else ""
        val = "n/a" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
        print(
            f"{name:16s} S={r['S']:.2f} val_loss={val}{ratio}  curve [{curve}]  "
            f"{r['wall_s']:.0f}s{teacher}"
        )


def _prepare_once(recipe: str, overrides: list[str]) -> None:
    """The tokenized SFT data, built once before the parallel jobs read it from the cache."""
    from recovery import _prepare_data

    _prepare_data(recipe, overrides)


def _search_table(recipe: str, overrides: list[str], args: argparse.Namespace) -> None:
    """Search and cache the greedy per-site table of these overrides on the recipe's
    ``model.path`` (:func:`recovery._allocated_sparsity`), where the jobs look it up."""
    from recovery import _allocated_sparsity, _compose

    overrides = [o for o in overrides if DENSE_HF not in o]
    base = str(_compose(recipe, overrides).model.path)
    t0 = time.perf_counter()
    ns = argparse.Namespace(base=base, device=args.device)
    table = _allocated_sparsity(recipe, overrides, ns, "greedy")
    ratios = table["sites"].values()
    print(
        f"[finetune] greedy table at S={table['ratio']:g}: {len(ratios)} sites in "
        f"{min(ratios):.3f}..{max(ratios):.3f} ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
