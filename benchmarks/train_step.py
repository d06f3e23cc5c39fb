"""Training-step time of dense vs. Q-Sparse vs. BitNet b1.58 vs. both, through the full stack.

Runs :func:`benchmarks.mfu.run` (LMModule + Lightning, random tokens, bf16-mixed) for each
variant and prints tokens/s, ms/step, MFU (dense-model FLOPs) and the step-time ratio to
dense. One JSON line per variant goes to ``--out``.

    python benchmarks/train_step.py --preset 374M --batch 8 --seq 2048 --steps 20 --compile
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mfu import run  # noqa: E402

from benchmarks._figures import emit  # noqa: E402

VARIANTS = {
    "dense": {"sparsity": 0.0, "bitnet": False},
    "qsparse": {"sparsity": 0.5, "bitnet": False},
    "bitnet": {"sparsity": 0.0, "bitnet": True},
    "bitnet_qsparse": {"sparsity": 0.6, "bitnet": True},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="374M")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"--variants: unknown {name!r}; choose from {list(VARIANTS)}")
        ns = argparse.Namespace(
            preset=args.preset,
            batch=args.batch,
            seq=args.seq,
            steps=args.steps,
            warmup=args.warmup,
            compile=args.compile,
            device=device,
            **VARIANTS[name],
        )
        result = {"variant": name, **run(ns)}
        rows.append(result)
        if args.out:
            with Path(args.out).open("a") as fh:
                fh.write(json.dumps(result) + "\n")
        if device == "cuda":
            torch.cuda.empty_cache()
    base = next((r for r in rows if r["variant"] == "dense"), rows[0])
    print(f"{'variant':<16}{'tokens/s':>12}{'ms/step':>10}{'MFU':>8}{'x dense':>9}")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        ratio = r["step_time_ms"] / base["step_time_ms"]
        print(
            f"{r['variant']:<16}{r['tokens_per_s']:>12,.0f}{r['step_time_ms']:>10.1f}"
            f"{mfu:>8}{ratio:>9.2f}"
        )
        key = f"stack_step.{'compile' if args.compile else 'eager'}.{r['variant']}"
        emit(f"{key}.tokens_per_s", r["tokens_per_s"], "tokens/s")
        emit(f"{key}.ms_per_step", r["step_time_ms"], "ms")
        emit(f"{key}.ratio", ratio)
        if r["mfu"] is not None:
            emit(f"{key}.mfu", 100 * r["mfu"], "%")


if __name__ == "__main__":
    main()
