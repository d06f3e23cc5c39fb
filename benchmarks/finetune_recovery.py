"""Fine-tuning recovery: Q-Sparse SFT at S against dense SFT, same data, steps and LR.

    python benchmarks/finetune_recovery.py --out outputs/ft_recovery            # SmolLM2, GPU
    python benchmarks/finetune_recovery.py --recipe finetune/tiny --device cpu \\
        --out /tmp/ft -- trainer.max_steps=4                # Hydra overrides for every job

Runs ``--recipe`` (default ``finetune/smollm2``) three times, each a normal ``qsparse-train``
job in its own process (all at once with ``--parallel``):

* ``dense``: ``sparsity=none`` (plain fine-tuning, the reference);
* ``lm``: top-k at ``--sparsity``, next-token loss on the responses only (the paper);
* ``distill``: the same plus ``distill=lm_logits`` (CE + KL to the frozen dense model on the
  response tokens).

The figure of merit is the response-token loss on the recipe's held-out SFT split
(``val/loss`` of the last step, examples never trained on), printed as a ratio to dense
fine-tuning measured in the same run; the issue's goal is <= 1.05 at S = 0.4. Results go to
``<out>/finetune_recovery.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

KINDS = {
    "dense": ["sparsity=none"],
    "lm": ["distill=none"],
    "distill": ["distill=lm_logits"],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="finetune/smollm2")
    p.add_argument("--sparsity", type=float, default=0.4)
    p.add_argument("--device", default="cuda", help="cuda (trainer=gpu) or cpu (trainer=cpu)")
    p.add_argument("--parallel", action="store_true", help="run the three jobs at once")
    p.add_argument("--out", default="outputs/finetune_recovery")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trainer = "trainer=gpu" if args.device.startswith("cuda") else "trainer=cpu"
    procs: dict[str, tuple[subprocess.Popen[bytes], Path, float]] = {}
    for kind, extra in KINDS.items():
        run_dir = out / "runs" / kind
        cmd = [
            sys.executable,
            "-m",
            "qsparse.cli.train",
            f"recipe={args.recipe}",
            trainer,
            "logger=csv",
            f"sparsity.ratio={args.sparsity}",
            *extra,
            f"run_dir={run_dir}",
            *args.overrides,
        ]
        log = open(out / f"{kind}.log", "wb")  # noqa: SIM115 (closed with the process)
        procs[kind] = (
            subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT),
            run_dir,
            time.perf_counter(),
        )
        if not args.parallel:
            procs[kind][0].wait()
    results: dict[str, dict[str, object]] = {}
    for kind, (proc, run_dir, t0) in procs.items():
        rc = proc.wait()
        summary_path = run_dir / "summary.json"
        if rc != 0 or not summary_path.is_file():
            print(f"[finetune] {kind} FAILED (rc {rc}): {out / f'{kind}.log'}", flush=True)
            continue
        summary = json.loads(summary_path.read_text())
        results[kind] = {
            "val_loss": summary.get("val_loss"),
            "step": summary.get("step"),
            "wall_s": time.perf_counter() - t0,
            "overrides": KINDS[kind],
        }
    (out / "finetune_recovery.json").write_text(
        json.dumps({"args": vars(args), "results": results}, indent=1)
    )
    dense = results.get("dense", {}).get("val_loss")
    print(f"\nheld-out SFT response loss, {args.recipe}, S={args.sparsity:g}")
    for kind, r in results.items():
        ratio = f"  ({r['val_loss'] / dense:.3f}x dense)" if dense and r["val_loss"] else ""
        print(f"{kind:8s} val_loss={r['val_loss']}{ratio}")
    return 0 if len(results) == len(KINDS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
