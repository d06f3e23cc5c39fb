"""qsparse-report's per-job figures: loss curves and the table under them read the jobs'
metrics.csv, label each job by the overrides that tell it apart, compare against the first
job, and stay out of large grids."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from qsparse.analysis.figures import (
    MAX_CURVE_JOBS,
    curve_table,
    figure_plots,
    grad_norm_per_layer,
    loss_curves,
)
from qsparse.analysis.sweep import read_sweep


def _job(root: Path, i: int, ratio: str, val_loss: float, train: list[float]) -> None:
    d = root / str(i)
    (d / ".hydra").mkdir(parents=True)
    overrides = [f"sparsity.ratio={ratio}", "logger=csv"]
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (d / "config.yaml").write_text(yaml.safe_dump({"sparsity": {"ratio": float(ratio)}}))
    summary = {"val_loss": val_loss, "sparsity_overall": float(ratio), "params_total": 1000}
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "csv" / "version_0").mkdir(parents=True)
    with open(d / "csv" / "version_0" / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "train/loss", "val/loss", "grad_norm/layer_10", "grad_norm/layer_9"])
        for step, loss in enumerate(train):
            w.writerow([step, loss, "", 2.0 * step, float(step)])
        w.writerow([len(train) - 1, "", val_loss, "", ""])


def _sweep(root: Path, n: int) -> Path:
    for i in range(n):
        _job(root, i, f"0.{i}", 5.0 + 0.1 * i, [6.0 - 0.01 * s + 0.1 * i for s in range(20)])
    return root


def test_curves_and_table_come_from_each_jobs_metrics(tmp_path: Path) -> None:
    sweep = read_sweep(_sweep(tmp_path / "sw", 3))
    curves = loss_curves(sweep)
    assert list(curves) == ["sparsity.ratio=0.0", "sparsity.ratio=0.1", "sparsity.ratio=0.2"]
    assert curves["sparsity.ratio=0.1"]["train/loss"][0] == (0, pytest.approx(6.1))
    assert curves["sparsity.ratio=0.2"]["val/loss"] == [(19, pytest.approx(5.2))]
    rows = curve_table(sweep)
    assert rows[2].split("|")[1:5] == [" sparsity.ratio=0.0 ", " 5.0000 ", " +0.0000 ", " 0.0% "]
    assert "+0.2000" in rows[4] and "20.0%" in rows[4]
    # layers sort by number, not by name: layer_9 before layer_10
    norms = grad_norm_per_layer(sweep)["sparsity.ratio=0.0"]
    assert norms[0] < norms[1]
    pytest.importorskip("matplotlib")
    paths = figure_plots(sweep, tmp_path)
    assert sorted(p.name for p in paths) == ["grad_norm_per_layer.png", "loss_curves.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_a_large_grid_gets_no_curve_plot(tmp_path: Path) -> None:
    sweep = read_sweep(_sweep(tmp_path / "sw", MAX_CURVE_JOBS + 1))
    assert curve_table(sweep) == []
    pytest.importorskip("matplotlib")
    names = [p.name for p in figure_plots(sweep, tmp_path)]
    assert "loss_curves.png" not in names
