"""The ``recipe=scaling/...`` grids: each is a multirun whose sweeper params span model size x
sparsity x precision, every grid point composes to a valid run (BitNet points get their own
LR), multirun jobs carry their overrides as wandb tags, and (slow) a shrunk CPU grid trains and ``qsparse-report`` fits it.
Two-step training of each recipe's default point is in ``test_recipes.py``."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose_train
from omegaconf import OmegaConf

import qsparse.training.config  # noqa: F401  (registers the schema and resolvers)
from qsparse.training.config import glu_size, validate_config

ROOT = Path(__file__).resolve().parents[1]
GRIDS = ["scaling/cpu_demo", "scaling/gpu_h200"]


@pytest.mark.parametrize("recipe", GRIDS)
def test_grid_recipe_is_a_size_sparsity_precision_multirun(recipe: str) -> None:
    cfg = compose_train([f"recipe={recipe}"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert list(params) == ["model.hidden_size", "sparsity.ratio", "quant"]
    axes = {k: str(v).split(",") for k, v in params.items()}
    assert "0.0" in axes["sparsity.ratio"] and len(axes["sparsity.ratio"]) >= 3
    assert axes["quant"] == ["none", "bitnet"] and len(axes["model.hidden_size"]) >= 3
    lrs = {}
    sizes, ratios, quants = (
        axes.values()
    )  # every size at one point, every (S, precision) at one size
    points = [(n, ratios[0], quants[0]) for n in sizes[1:]]
    for size, ratio, quant in points + list(itertools.product(sizes[:1], ratios, quants)):
        point = compose_train(
            [
                f"recipe={recipe}",
                f"model.hidden_size={size}",
                f"sparsity.ratio={ratio}",
                f"quant={quant}",
            ]  # fmt: skip
        )
        resolved = OmegaConf.to_container(point, resolve=True)
        validate_config(resolved)
        assert resolved["model"]["intermediate_size"] == glu_size(int(size))
        assert resolved["sweep_name"] == recipe.replace("/", "_").replace("gpu_", "")
        lrs[quant] = resolved["optim"]["lr"]
    assert lrs["bitnet"] > lrs["none"]  # BitNet b1.58 trains with a larger LR


def _train_sweep(args: list[str], cwd: Path) -> str:
    """``python -m qsparse.cli.train ARGS`` (a multirun recipe) in ``cwd``; fails on an error;
    returns its stdout and stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    res = subprocess.run(
        [sys.executable, "-m", "qsparse.cli.train", *args, f"data.cache_dir={cwd / 'cache'}"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout + res.stderr


def test_grid_jobs_run_in_parallel_processes_with_the_joblib_launcher(tmp_path: Path) -> None:
    """The GPU grid's launcher (Hydra's joblib plugin, separate processes) on CPU: two jobs of
    a shrunk grid run in two worker processes, each writes its summary, the report reads
    both; the GPU recipe asks for it with 8 workers."""
    cfg = compose_train(["recipe=scaling/gpu_h200"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == 8
    log = _train_sweep(["recipe=scaling/cpu_demo", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                  "quant=none", "model.hidden_size=64", "sparsity.ratio=0.0,0.5",
                  "trainer.max_steps=2", "trainer.val_check_interval=2",
                  "data.max_documents=200", "logger=csv"], tmp_path)  # fmt: skip
    from qsparse.analysis.sweep import read_sweep

    assert "Joblib.Parallel(n_jobs=2" in log
    sweep = read_sweep(tmp_path / "multirun" / "scaling_cpu_demo")
    assert [j.status for j in sweep.jobs] == ["ok", "ok"]
    assert sweep.jobs[0].summary["sparsity_overall"] < sweep.jobs[1].summary["sparsity_overall"]


@pytest.mark.slow
def test_cpu_grid_trains_and_report_fits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 3-size x 2-ratio full-precision slice of the CPU grid for 20 steps, then the report."""
    _train_sweep(["recipe=scaling/cpu_demo", "quant=none", "sparsity.ratio=0.0,0.5",
                  "trainer.max_steps=20", "trainer.val_check_interval=20", "logger=csv"], tmp_path)  # fmt: skip
    sweep = tmp_path / "multirun" / "scaling_cpu_demo"
    assert sorted(p.name for p in sweep.glob("[0-9]*")) == [str(i) for i in range(6)]
    from qsparse.cli.report import main as report_main

    assert report_main([str(sweep), "--bootstrap", "20", "--wandb", "disabled"]) == 0
    out = capsys.readouterr().out
    assert "6 ok, 0 failed, 0 missing of 6 expected" in out
    assert "full: L(N,S)" in out and "S* =" in out
    for name in ("report.md", "runs.csv", "loss_vs_activated.png", "loss_vs_sparsity.png"):
        assert (sweep / name).is_file()


@pytest.mark.slow
def test_ste_figure_recipe_logs_layer_grad_norms_and_report_plots_them(tmp_path: Path) -> None:
    """recipe=figures/ste_tiny shrunk to 2 layers x 6 steps: both jobs log grad_norm/layer_i
    and qsparse-report draws grad_norm_per_layer.png (no scaling fit: one size, one S)."""
    _train_sweep(["recipe=figures/ste_tiny", "model.num_hidden_layers=2", "model.hidden_size=64",
                  "model.intermediate_size=176", "trainer.max_steps=6",
                  "trainer.val_check_interval=6", "callbacks.grad_norm.every_n_steps=1",
                  "trainer.log_every_n_steps=1", "logger=csv", "data.max_documents=300",
                  "data.vocab_size=384", "data.seq_len=32"], tmp_path)  # fmt: skip
    from qsparse.analysis.figures import grad_norm_per_layer
    from qsparse.analysis.sweep import read_sweep
    from qsparse.cli.report import main as report_main

    sweep = tmp_path / "multirun" / "figure_ste"
    norms = grad_norm_per_layer(read_sweep(sweep))
    assert sorted(k.lower() for k in norms) == ["sparsity.ste=false", "sparsity.ste=true"]
    assert all(len(v) == 2 and min(v) > 0 for v in norms.values())
    assert report_main([str(sweep), "--wandb", "disabled"]) == 0
    assert (sweep / "grad_norm_per_layer.png").is_file()


def test_multirun_job_overrides_become_wandb_tags(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import WandbLogger

    from qsparse.training.logging import build_loggers

    cfg = {"wandb": {"tags": ["mine"], "mode": "offline"}, "csv": False}
    loggers = build_loggers(cfg, tmp_path, "run", False, group="g", tags=["quant=bitnet"])
    wb = next(lg for lg in loggers if isinstance(lg, WandbLogger))
    assert wb._wandb_init["tags"] == ["mine", "quant=bitnet"]
    assert wb._wandb_init["group"] == "g"
