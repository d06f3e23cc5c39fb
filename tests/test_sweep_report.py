"""qsparse-report: the fit recovers a known law and S* from noisy points, a sweep directory
with a failed and a missing job is reported (exit status = their number), the outputs exist,
and the scaling recipes expand to the grid they document."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from qsparse.analysis import ScalingLaw, bootstrap_scaling_law, fit_scaling_law
from qsparse.analysis.precision_fit import PAPER_S_STAR, parse_params
from qsparse.analysis.report import make_report
from qsparse.analysis.sweep import expected_jobs, read_sweep
from qsparse.cli.report import main as report_main

#: the paper's full-precision constants as printed (docs/design.md §1)
PAPER = ScalingLaw(E=1.86, B=0.01, C=1.89, alpha=0.10, beta=0.05)
SIZES = [1e7, 1e8, 1e9, 1e10]
RATIOS = [0.0, 0.3, 0.5, 0.7, 0.8, 0.9]


def _noisy_points(law: ScalingLaw, sigma: float, seed: int = 0):
    n = np.repeat(SIZES, len(RATIOS))
    s = np.tile(RATIOS, len(SIZES))
    rng = np.random.default_rng(seed)
    return n, s, law.loss(n, s) * np.exp(rng.normal(0.0, sigma, n.size))


def test_fit_recovers_paper_law_and_s_star_from_noisy_points() -> None:
    """0.05% multiplicative noise: E, alpha, beta within a few percent, A(S) within 3% over
    the grid's S, S* within 0.02; the truth lies inside the bootstrap intervals. (B and C
    trade off against each other when B << C, as in the paper's constants: only their sum
    with the exponential, A(S), is pinned down.)"""
    n, s, y = _noisy_points(PAPER, sigma=5e-4)
    fit = fit_scaling_law(n, s, y)
    assert fit.E == pytest.approx(PAPER.E, rel=0.02)
    assert fit.alpha == pytest.approx(PAPER.alpha, rel=0.05)
    assert fit.beta == pytest.approx(PAPER.beta, rel=0.15)
    grid = np.array(RATIOS)
    a_true = PAPER.B + PAPER.C * np.exp(PAPER.beta / (1 - grid))
    a_fit = fit.B + fit.C * np.exp(fit.beta / (1 - grid))
    assert np.allclose(a_fit, a_true, rtol=0.03)
    assert fit.optimal_sparsity() == pytest.approx(PAPER.optimal_sparsity(), abs=0.02)
    boot = bootstrap_scaling_law(n, s, y, fit=fit, n_boot=20, level=0.95)
    assert boot.samples.shape == (20, 6)
    for name, true in (("E", PAPER.E), ("alpha", PAPER.alpha), ("S*", PAPER.optimal_sparsity())):
        lo, hi = boot.interval(name)
        assert lo - 1e-3 <= true <= hi + 1e-3, (name, lo, true, hi)


def test_fit_recovers_all_constants_of_a_well_conditioned_law() -> None:
    true = ScalingLaw(E=2.0, B=0.2, C=3.0, alpha=0.3, beta=0.4)
    n, s, y = _noisy_points(true, sigma=2e-4, seed=1)
    fit = fit_scaling_law(n, s, y)
    for k in ("E", "C", "alpha", "beta"):
        assert getattr(fit, k) == pytest.approx(getattr(true, k), rel=0.05), k
    assert fit.optimal_sparsity() == pytest.approx(true.optimal_sparsity(), abs=0.02)


def _job(root: Path, i: int, overrides: list[str], cfg: dict, summary: dict | None) -> None:
    d = root / str(i)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))


def _fake_sweep(root: Path, fail: int | None = 4, drop_last: bool = True) -> int:
    """A multirun dir of 4 sizes x 3 ratios x 2 precisions whose losses follow two known
    laws; job ``fail`` has no summary.json, the last job has no directory. Returns the job
    count multirun.yaml describes."""
    laws = {"none": PAPER, "ternary": ScalingLaw(E=1.9, B=0.05, C=2.1, alpha=0.1, beta=0.09)}
    sizes, ratios, quants = [2e6, 2e7, 2e8, 2e9], [0.0, 0.5, 0.8], ["none", "bitnet"]
    params = {
        "model.hidden_size": ",".join(str(int(x)) for x in sizes),
        "sparsity.ratio": ",".join(map(str, ratios)),
        "quant": ",".join(quants),
    }
    multirun = {
        "sweep_name": "fake",
        "logger": {"wandb": {"project": "qsparse", "group": None}},
        "hydra": {"sweeper": {"params": params}, "overrides": {"task": ["recipe=scaling/x"]}},
    }
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text(yaml.safe_dump(multirun, sort_keys=False))
    i, total = 0, len(sizes) * len(ratios) * len(quants)
    for n in sizes:
        for ratio in ratios:
            for quant in quants:
                if drop_last and i == total - 1:
                    break
                weights = "ternary" if quant == "bitnet" else "none"
                cfg = {
                    "sweep_name": "fake",
                    "model": {"hidden_size": int(n), "num_hidden_layers": 2},
                    "sparsity": {"pattern": "token_topk", "ratio": ratio},
                    "quant": {"weights": weights},
                }
                overrides = [f"model.hidden_size={int(n)}", f"sparsity.ratio={ratio}",
                             f"quant={quant}", "recipe=scaling/x"]  # fmt: skip
                loss = float(laws[weights].loss(n, ratio))
                summary = {"val_loss": loss, "params_total": int(n),
                           "params_activated": int(round((1 - ratio) * n)), "step": 2}  # fmt: skip
                _job(root, i, overrides, cfg, None if i == fail else summary)
                if i == fail:
                    (root / str(i) / "error.txt").write_text("Traceback ...\nRuntimeError: boom\n")
                i += 1
    return total


def test_expected_jobs_follow_hydra_order(tmp_path: Path) -> None:
    total = _fake_sweep(tmp_path / "s")
    jobs = expected_jobs(tmp_path / "s")
    assert jobs is not None and len(jobs) == total == 24
    assert jobs[1] == ["model.hidden_size=2000000", "sparsity.ratio=0.0", "quant=bitnet",
                       "recipe=scaling/x"]  # fmt: skip


def test_report_names_failed_and_missing_jobs_and_fits_both_precisions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "multirun" / "fake"
    _fake_sweep(root)
    status = report_main([str(root), "--bootstrap", "10", "--wandb", "disabled", "--budget", "1e8"])
    out = capsys.readouterr().out
    assert status == 2  # one failed + one missing job
    assert "22 ok, 1 failed, 1 missing of 24 expected" in out
    assert (
        "FAILED job 4 [model.hidden_size=2000000 sparsity.ratio=0.8 quant=none]: RuntimeError: boom"
        in out
    )
    assert "MISSING job 23 [model.hidden_size=2000000000 sparsity.ratio=0.8 quant=bitnet]" in out
    # noiseless points of the paper's law: its S* comes back (overall S = the ratio here)
    s_star = PAPER.optimal_sparsity()
    assert f"S* = {100 * s_star:.2f}%" in out or f"S* = {100 * s_star - 0.01:.2f}%" in out
    assert "1.58-bit: L(N,S)" in out and f"paper: {100 * PAPER_S_STAR['1.58-bit']:.2f}%" in out
    for name in ("report.md", "runs.csv", "loss_vs_activated.png", "loss_vs_sparsity.png"):
        assert (root / name).is_file(), name
    rows = list(csv.DictReader((root / "runs.csv").open()))
    assert len(rows) == 24
    assert {r["status"] for r in rows} == {"ok", "failed", "missing"}
    assert rows[4]["status"] == "failed" and rows[4]["error"] == "RuntimeError: boom"
    md = (root / "report.md").read_text()
    assert "FAILED job 4" in md and "MISSING job 23" in md and "![loss_vs_sparsity]" in md


def test_report_exit_zero_when_all_jobs_finished_and_fit_matches(tmp_path: Path) -> None:
    root = tmp_path / "s"
    _fake_sweep(root, fail=None, drop_last=False)
    report = make_report(read_sweep(root), n_boot=0, wandb_mode="disabled", sparsity_mode="ratio")
    assert report.problems == 0
    full = next(f for f in report.fits if f.precision == "full")
    assert full.s_star == pytest.approx(PAPER.optimal_sparsity(), abs=0.01)


def test_report_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report_main([str(tmp_path / "nope"), "--wandb", "disabled"]) == 2
    (tmp_path / "empty").mkdir()
    assert report_main([str(tmp_path / "empty"), "--wandb", "disabled"]) == 2
    assert "no job directories" in capsys.readouterr().err
    assert parse_params("2.9B") == 2.9e9 and parse_params("350M") == 3.5e8
    with pytest.raises(ValueError):
        parse_params("-1")


@pytest.mark.slow
def test_real_multirun_with_a_failing_job_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """qsparse-train -m where the first job is invalid: the job records its error, the sweep
    stops, and the report names the failed job (with the reason) and the missing one."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    train = subprocess.run(
        [sys.executable, "-m", "qsparse.cli.train", "-m", "sparsity=topk",
         "sparsity.ratio=1.2,0.5", "sweep_name=bad", "logger=csv"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert train.returncode != 0
    sweep = tmp_path / "multirun" / "bad"
    assert (sweep / "0" / "error.txt").is_file()
    assert report_main([str(sweep), "--wandb", "disabled"]) == 2
    out = capsys.readouterr().out
    assert "0 ok, 1 failed, 1 missing of 2 expected" in out
    assert "FAILED job 0 [sparsity.ratio=1.2]" in out
    assert "outside [0, 1)" in out
    assert "MISSING job 1 [sparsity.ratio=0.5]" in out
    assert (sweep / "runs.csv").is_file() and (sweep / "report.md").is_file()


@pytest.mark.slow  # wandb's service start dominates (tens of seconds on a busy machine)
def test_report_logs_table_and_plots_to_the_sweep_group_offline(tmp_path: Path) -> None:
    from test_cli_train import _wandb_run_record

    root = tmp_path / "s"
    _fake_sweep(root, fail=None, drop_last=False)
    report = make_report(read_sweep(root), n_boot=0, wandb_mode="offline")
    assert report.wandb_dir is not None
    runs = list(Path(report.wandb_dir).glob("run-*.wandb"))
    assert len(runs) == 1
    assert _wandb_run_record(runs[0])[1] == "fake"  # the sweep's group
    media = list(Path(report.wandb_dir).rglob("*.png"))
    assert sorted("_".join(p.name.split("_")[:3]) for p in media) == [
        "loss_vs_activated",
        "loss_vs_sparsity",
    ]
    assert list(Path(report.wandb_dir).rglob("*.table.json"))  # the job table


def test_sparsity_plot_ylim_clips_the_extrapolated_blow_up():
    from qsparse.analysis.report_plots import sparsity_plot_ylim

    grid = np.linspace(0.0, 0.9, 10)
    flat = np.full(10, 3.0)
    flat[2] = 2.8  # the minimum, at S=0.2
    exploding = np.array([3.4, 3.3, 3.35, 3.5, 3.9, 5.0, 9.0, 50.0, 1e4, 1e6])
    lo, hi = sparsity_plot_ylim(grid, [flat, exploding], [0.5, 0.4])
    # lowest predicted loss 2.8; highest inside the measured range (S <= 0.5 / 0.4): 3.9 at S=0.4
    assert lo == pytest.approx(2.8 - 0.05 * 1.1)
    assert hi == pytest.approx(3.9 + 0.05 * 1.1)
    assert sparsity_plot_ylim(grid, [np.full(10, np.nan)], [0.5]) is None
