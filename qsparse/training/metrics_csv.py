"""Reading back the metrics a run logged to CSV (``<run_dir>/csv/metrics.csv`` and, for each
resumed segment, ``csv/resume-NN/metrics.csv``; see :mod:`qsparse.training.logging`)."""

from __future__ import annotations

import csv
from pathlib import Path


def read_metrics(csv_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Read Lightning CSV logs (``metrics.csv`` files under ``csv_dir``) into
    ``{metric: [(step, value), ...]}`` sorted by step; a step logged twice (a resumed run
    repeating steps after its last checkpoint) keeps the later value."""
    series: dict[str, dict[int, float]] = {}
    for path in sorted(Path(csv_dir).rglob("metrics.csv")):
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                try:
                    step = int(float(row.get("step", "") or "nan"))
                except ValueError:
                    continue
                for key, value in row.items():
                    if key in ("step", "epoch") or value in ("", None):
                        continue
                    try:
                        series.setdefault(key, {})[step] = float(value)
                    except ValueError:
                        continue
    return {k: sorted(v.items()) for k, v in series.items()}
