"""qsparse-sweep: a wandb sweep file runs online through wandb agent and offline as a Hydra
multirun of qsparse-train with the same grid."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

from qsparse.sweeps.runner import SweepFileError, hydra_overrides, load_sweep, main

SHIPPED = Path(__file__).resolve().parents[1] / "qsparse" / "sweeps" / "sparsity_tiny.yaml"


def test_grid_becomes_hydra_multirun_overrides() -> None:
    spec = {
        "method": "grid",
        "parameters": {
            "recipe": {"value": "from_scratch/qsparse_tiny"},
            "sparsity.ratio": {"values": [0.0, 0.5]},
            "run_note": {"values": ["a b", "it's"]},
            "data.streaming": {"value": False},
        },
    }
    assert hydra_overrides(spec) == [
        "recipe=from_scratch/qsparse_tiny",
        "sparsity.ratio=0.0,0.5",
        "run_note='a b','it\\'s'",
        "data.streaming=false",
    ]


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"method": "bayes", "parameters": {}}, "method: bayes needs the wandb sweep controller"),
        ({"parameters": {"optim.lr": {"min": 1e-4, "max": 1e-3}}}, "parameters.optim.lr has"),
        ({"parameters": {"optim.lr": {"values": []}}}, "values must be a non-empty list"),
    ],
)
def test_offline_refuses_what_needs_the_controller(spec: dict, needle: str) -> None:
    with pytest.raises(SweepFileError, match=needle):
        hydra_overrides(spec)


def test_sweep_file_checks(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: grid\nparameters:\n  a: {value: 1}\ncommand: [python, train.py]\n")
    with pytest.raises(SweepFileError, match="args_no_hyphens"):
        load_sweep(bad)
    with pytest.raises(SweepFileError, match="no such sweep file"):
        load_sweep(tmp_path / "nope.yaml")
    assert load_sweep("sparsity_tiny")["name"] == "sparsity_tiny"  # shipped by name


def test_shipped_sweep_jobs_compose_and_pass_the_checks() -> None:
    """Every grid point of the shipped file is a valid qsparse-train config (what the wandb
    agent would launch): compose each job and run the same checks as qsparse-train."""
    from hydra import compose, initialize_config_module

    from qsparse.training.run import check_config

    spec = yaml.safe_load(SHIPPED.read_text())
    assert spec["command"][-1] == "${args_no_hyphens}"
    fixed = [f"{k}={p['value']}" for k, p in spec["parameters"].items() if "value" in p]
    axes = [
        [f"{k}={v}" for v in p["values"]] for k, p in spec["parameters"].items() if "values" in p
    ]
    jobs = list(itertools.product(*axes))
    assert len(jobs) == 6
    with initialize_config_module("qsparse.conf", version_base="1.3"):
        for job in jobs:
            cfg = compose("train", overrides=[*fixed, *job, "logger=csv"])
            check_config(cfg)
            ratio = float(dict(o.split("=") for o in job)["sparsity.ratio"])
            assert cfg.sparsity.ratio == ratio


def test_dry_run_prints_the_multirun(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(SHIPPED), "--dry-run", "trainer=cpu"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("-m qsparse.cli.train -m recipe=from_scratch/qsparse_tiny")
    assert "sparsity.ratio=0.0,0.4,0.6 quant=none,bitnet" in line
    assert line.endswith("trainer=cpu sweep_name=sparsity_tiny")


def test_bad_file_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("method: random\nparameters:\n  a: {values: [1, 2]}\n")
    assert main([str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "method: random" in err


@pytest.mark.slow
def test_offline_sweep_runs_and_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole shipped grid offline (6 tiny jobs, 2 steps each), then qsparse-report."""
    from qsparse.cli.report import main as report

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main([str(SHIPPED), "trainer.max_steps=2", "--name", "t"]) == 0
    assert len(list((tmp_path / "multirun" / "t").glob("*/summary.json"))) == 6
    report(["multirun/t", "--wandb", "disabled", "--bootstrap", "0"])
