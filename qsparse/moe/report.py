"""``python -m qsparse.moe.report SSD_RUN DENSE_RUN --out PREFIX``: an SSD run beside its dense
control at equal tokens.

Reads each run directory's ``summary.json`` (final validation loss), ``csv/metrics.csv``
(``train/loss`` per logged step) and the SSD run's ``ssd.json`` (switch events, FLOPs per
phase, the final model's validation loss dense and as an MoE); writes ``PREFIX.md`` (a table)
and ``PREFIX.png`` (both training-loss curves, sparse phases shaded).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path


def _curve(run: Path) -> list[tuple[int, float]]:
    path = run / "csv" / "metrics.csv"
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return [(int(r["step"]), float(r["train/loss"])) for r in rows]


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _phases(events: list[dict], end: int) -> list[tuple[int, int]]:
    spans, start = [], None
    for e in events:
        if e["to"] == "sparse":
            start = e["step"]
        elif start is not None:
            spans.append((start, e["step"]))
            start = None
    if start is not None:
        spans.append((start, end))
    return spans


def report(ssd_run: Path, dense_run: Path, out: Path) -> str:
    """Write ``out.md`` and ``out.png``; return the markdown."""
    ssd = json.loads((ssd_run / "ssd.json").read_text())
    s_sum = json.loads((ssd_run / "summary.json").read_text())
    d_sum = json.loads((dense_run / "summary.json").read_text())
    flops = ssd["flops"]
    lines = [
        "| run | steps | val loss | final model on the first val batches: dense / as MoE "
        "| training FLOPs vs dense |",
        "|---|---|---|---|---|",
        f"| dense control | {d_sum['step']} | {d_sum['val_loss']:.4f} | - | 1.000 |",
        f"| SSD | {s_sum['step']} | {s_sum['val_loss']:.4f} | "
        f"{_fmt(ssd.get('final_dense_loss'), '.4f')} / {_fmt(ssd.get('final_moe_loss'), '.4f')} "
        f"| {flops['vs_dense']:.3f} |",
        "",
        "| switch at step | to | stability | activation sparsity | k-means inertia | "
        "probe loss before | after |",
        "|---|---|---|---|---|---|---|",
    ]
    f = _fmt
    for e in ssd["events"]:
        lines.append(
            f"| {e['step']} | {e['to']} | {f(e['stability'])} | {f(e['activation_sparsity'])} "
            f"| {f(e['kmeans_inertia'], '.1f')} | {e['loss_before']:.4f} | {e['loss_after']:.4f} |"
        )
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for run, label in ((dense_run, "dense control"), (ssd_run, "SSD")):
        pts = _curve(run)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
    for i, (a, b) in enumerate(_phases(ssd["events"], s_sum["step"])):
        ax.axvspan(a, b, color="orange", alpha=0.15, label="SSD sparse phase" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qsparse.moe.report", description=__doc__)
    p.add_argument("ssd_run", type=Path)
    p.add_argument("dense_run", type=Path)
    p.add_argument("--out", type=Path, required=True, help="output prefix (.md, .png)")
    args = p.parse_args(argv)
    try:
        print(report(args.ssd_run, args.dense_run, args.out))
    except (FileNotFoundError, KeyError, json.JSONDecodeError) as err:
        print(f"qsparse.moe.report: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
