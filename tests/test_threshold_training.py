"""Training with per-site thresholds (``sparsity=threshold``): each site's threshold tracks its
ratio's |x| quantile on the training batches, the sites' ratios can come from the top-k
greedy search, and the export keeps the thresholds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_train

from qsparse.nn import SparsityConfig
from qsparse.nn.linear import ActivationSparsifier
from qsparse.nn.sites import sparsifiers, track_thresholds
from qsparse.training import config as _schemas  # noqa: F401  (registers train_schema)
from qsparse.training.callbacks import SimulatedCrash
from qsparse.training.metrics_csv import read_metrics
from qsparse.training.run import train


def test_threshold_tracks_the_ratio_quantile_in_training_only() -> None:
    torch.manual_seed(0)
    sp = ActivationSparsifier(64, 0.6, pattern="threshold", threshold_momentum=0.5)
    x = torch.randn(32, 64) * torch.linspace(0.5, 2.0, 64)
    want = torch.quantile(x.abs().flatten(), 0.6, interpolation="lower")
    sp.train()
    first = sp(x)
    assert torch.equal(first, x)  # t = 0 before the first batch: nothing dropped
    model = torch.nn.Sequential(sp)
    assert track_thresholds(model) == 1
    assert float(sp.threshold) == pytest.approx(float(want))  # the first batch sets t = q
    sp(x * 2)
    track_thresholds(model)  # t = 0.5 t + 0.5 q(2x) = 1.5 q(x)
    assert float(sp.threshold) == pytest.approx(1.5 * float(want), rel=1e-6)
    assert track_thresholds(model) == 0  # nothing pending: no second move
    # the mask is |x| > t; the zero fraction follows t towards the ratio
    for _ in range(30):
        sp(x)
        track_thresholds(model)
    zeros = float((sp(x) == 0).float().mean())
    assert zeros == pytest.approx(0.6, abs=0.02)
    # gradients pass every entry (straight-through), as Q-Sparse's top-k
    xg = x.clone().requires_grad_()
    sp(xg).sum().backward()
    assert torch.equal(xg.grad, torch.ones_like(x))
    # evaluation: the threshold is read, never moved (and what the last training forward
    # left pending is dropped)
    sp.eval()
    before = sp.threshold.clone()
    sp(x * 10)
    assert track_thresholds(model) == 0 and torch.equal(sp.threshold, before)
    # a calibrated (TEAL) sparsifier has no momentum: training leaves its threshold alone
    fixed = ActivationSparsifier(64, 0.6, pattern="threshold").train()
    fixed(x)
    assert track_thresholds(torch.nn.Sequential(fixed)) == 0


def test_threshold_config_is_checked() -> None:
    cfg = SparsityConfig(ratio=0.5, pattern="threshold", allocation="greedy")
    assert cfg.threshold_momentum == 0.1
    for bad in (0, 1.5, "0.1", True):
        with pytest.raises(ValueError, match="sparsity.threshold_momentum=.* must be in"):
            SparsityConfig(ratio=0.5, pattern="threshold", threshold_momentum=bad)
    with pytest.raises(ValueError, match="needs sparsity.pattern=token_topk or threshold"):
        SparsityConfig(ratio=0.5, pattern="block_topk", allocation="greedy")


def test_continue_recipe_trains_and_exports_tracked_thresholds(
    tiny_hf_checkpoint, tmp_path: Path
) -> None:
    """recipe=continue/tiny with sparsity=threshold and the greedy site ratios: after a few
    steps every site has a positive threshold, the sites keep the greedy ratios, and the
    export reloads with the same thresholds."""
    import qsparse

    ckpt = tiny_hf_checkpoint("llama", max_position_embeddings=512)
    run_dir = tmp_path / "run"
    cfg = compose_train(
        [
            "recipe=continue/tiny",
            f"model.path={ckpt}",
            f"run_dir={run_dir}",
            "sparsity=threshold",
            "sparsity.ratio=0.5",
            "sparsity.allocation=greedy",
            "sparsity.calibration=[wiki_en]",
            "sparsity.calibration_tokens=512",
            "trainer.max_steps=4",
            "trainer.val_check_interval=4",
            "trainer.limit_val_batches=1",
            "callbacks.sparsity_warmup.steps=0",
            "logger=csv",
        ]
    )
    summary = train(cfg)
    export = Path(summary["export_dir"])
    stored = json.loads((export / "config.json").read_text())["qsparse"]["sparsity"]
    assert stored["pattern"] == "threshold" and stored["allocation"] == "greedy"
    assert stored["sites"] and len(set(stored["sites"].values())) > 1  # the searched ratios
    model = qsparse.load(str(export))
    sites = sparsifiers(model)
    assert sites and all(sp.pattern == "threshold" for sp in sites.values())
    assert all(float(sp.threshold) > 0 for sp in sites.values())
    for name, sp in sites.items():
        assert sp.ratio == pytest.approx(stored["sites"][name])


def test_finetune_recipe_trains_tracked_thresholds(tiny_hf_checkpoint, tmp_path: Path) -> None:
    """recipe=finetune/tiny with sparsity=threshold (response-token loss, padded SFT batches):
    two steps set every site's threshold, and the export reloads them."""
    import qsparse

    ckpt = tiny_hf_checkpoint("llama", max_position_embeddings=512)
    cfg = compose_train(
        [
            "recipe=finetune/tiny",
            f"model.path={ckpt}",
            f"run_dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "sparsity=threshold",
            "sparsity.ratio=0.5",
            "data.max_examples=60",
            "data.batch_size=2",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1",
            "callbacks.checkpoint.every_n_train_steps=2",
            "logger=csv",
        ]
    )
    summary = train(cfg)
    model = qsparse.load(str(summary["export_dir"]))
    sites = sparsifiers(model)
    assert sites and all(sp.pattern == "threshold" for sp in sites.values())
    assert all(float(sp.threshold) > 0 for sp in sites.values())


def test_tracked_thresholds_resume_exactly(tiny_hf_checkpoint, tmp_path: Path) -> None:
    """A run cut off after its checkpoint and resumed takes the same steps as one run: the
    checkpoint holds the thresholds as moved by the batch it was saved after."""
    ckpt = tiny_hf_checkpoint("llama", max_position_embeddings=512)
    n = 6
    common = [
        "recipe=continue/tiny",
        f"model.path={ckpt}",
        "sparsity=threshold",
        "sparsity.ratio=0.5",
        f"trainer.max_steps={n}",
        f"trainer.val_check_interval={n}",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        f"callbacks.checkpoint.every_n_train_steps={n // 2}",
        "callbacks.sparsity_warmup.steps=2",
        "export=false",
        "logger=csv",
    ]
    full = train(compose_train([*common, f"run_dir={tmp_path / 'full'}"]))
    split = tmp_path / "split"
    crash = [
        "+callbacks.crash._target_=qsparse.training.callbacks.StopAtStep",
        f"+callbacks.crash.step={n // 2 + 1}",
        "+callbacks.crash.mode=crash",
    ]
    with pytest.raises(SimulatedCrash):
        train(compose_train([*common, f"run_dir={split}", *crash]))
    resumed = train(compose_train([*common, f"run_dir={split}", "resume=true"]))
    assert resumed["val_loss"] == pytest.approx(full["val_loss"], abs=1e-6)
    a, b = dict(read_metrics(tmp_path / "full")["train/loss"]), read_metrics(split)["train/loss"]
    for step, loss in b:
        assert loss == pytest.approx(a[step], abs=1e-6), step
