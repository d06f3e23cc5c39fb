"""Self-distillation (qsparse/training/distill.py): the losses against hand computations,
the config checks, the teacher inside LMModule, and a 2-step run of the recovery recipe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_config

import qsparse
from qsparse.training import config as _schemas  # noqa: F401  (registers train_schema)
from qsparse.training.distill import (
    DistillConfig,
    LayerOutputs,
    hidden_distill_loss,
    kl_distill_loss,
)
from qsparse.training.module import LMModule
from qsparse.training.run import train


def _kl_by_hand(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, temp: float) -> float:
    """Loops in float64: T^2 * mean over predicting positions of sum_v p_t (log p_t - log p_s)."""
    total, count = 0.0, 0
    b, n, v = s.shape
    for i in range(b):
        for j in range(n - 1):
            if int(labels[i, j + 1]) == -100:
                continue
            zs = [float(x) / temp for x in s[i, j]]
            zt = [float(x) / temp for x in t[i, j]]
            ls = math.log(sum(math.exp(z) for z in zs))
            lt = math.log(sum(math.exp(z) for z in zt))
            total += sum(math.exp(zt[k] - lt) * ((zt[k] - lt) - (zs[k] - ls)) for k in range(v))
            count += 1
    return temp**2 * total / count


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_kl_loss_matches_hand_computation(temp: float) -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 7, generator=g)
    t = torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, 2] = -100  # position 1 predicts nothing
    labels[1, 4] = -100  # position 3 predicts nothing
    got = kl_distill_loss(s, t, labels, temp)
    assert float(got) == pytest.approx(_kl_by_hand(s, t, labels, temp), rel=1e-5)
    # KL(p || p) = 0 and the loss is > 0 otherwise
    assert float(kl_distill_loss(t, t, labels, temp)) == pytest.approx(0.0, abs=1e-6)
    assert float(got) > 0


def test_hidden_loss_matches_hand_computation() -> None:
    g = torch.Generator().manual_seed(1)
    hs = [torch.randn(2, 3, 4, generator=g) for _ in range(3)]
    ht = [torch.randn(2, 3, 4, generator=g) for _ in range(3)]
    want = sum(float(((a - b) ** 2).sum() / (b**2).sum()) for a, b in zip(hs, ht, strict=True)) / 3
    assert float(hidden_distill_loss(hs, ht)) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="same number of decoder layers"):
        hidden_distill_loss(hs, ht[:2])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "soft"}, "distill.mode"),
        ({"mode": "logits", "temperature": 0}, "distill.temperature"),
        ({"mode": "logits", "kl_weight": -1.0}, "distill.kl_weight"),
        ({"mode": "logits", "kl_weight": 0.0}, "LM loss only"),
        ({"mode": "logits", "kl_weight": 1.0, "hidden_weight": 1.0}, "logits\\+hidden"),
        ({"mode": "none", "kl_weight": 1.0}, "distill=logits"),
        ({"teacher_dtype": "int8"}, "distill.teacher_dtype"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DistillConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown keys"):
        DistillConfig.from_dict({"mode": "logits", "kl_weigth": 1.0})


def test_teacher_is_frozen_dense_and_outside_the_state_dict(tiny_hf_checkpoint) -> None:
    ckpt = tiny_hf_checkpoint("llama", max_position_embeddings=256)
    module = LMModule(
        model={"_target_": "qsparse.models.pretrained.hf_model", "path": str(ckpt)},
        sparsity=0.5,
        distill={"mode": "logits+hidden", "lm_weight": 0.5, "kl_weight": 1.0, "hidden_weight": 2.0},
    )
    module.configure_model()
    teacher = module.build_teacher()
    assert module.build_teacher() is teacher  # idempotent
    assert not qsparse.sparsifiers(teacher) and qsparse.sparsifiers(module.model)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not any("teacher" in k for k in module.state_dict())
    n_student = sum(1 for _ in module.parameters())
    assert n_student == sum(1 for _ in module.model.parameters())

    ids = torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = -100
    batch = {"input_ids": ids, "labels": labels}
    loss = module._distill_step(batch, 2)
    # the same loss by hand from separate forwards of student and teacher
    cfg = module.distill
    grab_s, grab_t = LayerOutputs(module.model.model.layers), LayerOutputs(teacher.model.layers)
    out = module.model(input_ids=ids, labels=labels)
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
    want = (
        cfg.lm_weight * out.loss
        + cfg.kl_weight * kl_distill_loss(out.logits, t_logits, labels, cfg.temperature)
        + cfg.hidden_weight * hidden_distill_loss(grab_s.take()[:2], grab_t.take()[:2])
    )
    grab_s.remove(), grab_t.remove()
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert module.model.model.layers[0].mlp.down_proj.weight.grad is not None


def test_student_equal_to_teacher_has_zero_kl(tiny_hf_checkpoint) -> None:
    """Dense student (no top-k): the student is the teacher, KL and hidden loss are 0."""
    ckpt = tiny_hf_checkpoint("qwen2", max_position_embeddings=256)
    module = LMModule(
        model={"_target_": "qsparse.models.pretrained.hf_model", "path": str(ckpt)},
        distill={"mode": "logits+hidden", "lm_weight": 0.0, "kl_weight": 1.0, "hidden_weight": 1.0},
    )
    module.configure_model()
    ids = torch.randint(4, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    loss = module._distill_step({"input_ids": ids, "labels": ids}, 2)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)


def test_recovery_recipe_two_steps(tiny_hf_checkpoint, tmp_path: Path) -> None:
    """recipe=continue/recovery_tiny: mixture data, out-of-domain validation, distillation,
    best checkpoint by val_ood/loss restored and exported."""
    ckpt = tiny_hf_checkpoint("llama", max_position_embeddings=256)
    run_dir = tmp_path / "run"
    cfg = tiny_run_config(
        "continue/recovery_tiny",
        ckpt,
        tmp_path,
        "data.max_documents=200",
        "trainer.max_steps=2",
        "trainer.val_check_interval=1",
        "trainer.log_every_n_steps=1",
    )
    summary = train(cfg)
    assert summary["step"] == 2
    assert summary["val_ood_loss"] > 0 and summary["val_loss"] > 0
    assert summary["selected_by"] == "val_ood/loss"
    assert Path(summary["selected_checkpoint"]).is_file()
    metrics = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    assert {"train/kl", "train/lm_loss", "val_ood/loss", "val/loss"} <= set(header)
    config = json.loads((Path(summary["export_dir"]) / "config.json").read_text())
    assert config["qsparse"]["sparsity"]["ratio"] == pytest.approx(0.4)


def test_early_stopping_on_the_out_of_domain_set(tiny_hf_checkpoint, tmp_path: Path) -> None:
    """Lightning's EarlyStopping on val_ood/loss, added from the command line, ends the run
    at the first validation that does not improve by min_delta (here: any)."""
    ckpt = tiny_hf_checkpoint("llama", max_position_embeddings=256)
    cfg = tiny_run_config(
        "continue/recovery_tiny",
        ckpt,
        tmp_path,
        "data.max_documents=200",
        "trainer.max_steps=8",
        "trainer.val_check_interval=2",
        "+callbacks.early_stopping._target_=lightning.pytorch.callbacks.EarlyStopping",
        "+callbacks.early_stopping.monitor=val_ood/loss",
        "+callbacks.early_stopping.patience=1",
        "+callbacks.early_stopping.min_delta=100.0",
    )
    summary = train(cfg)
    assert summary["step"] == 4  # validations at 2 (best) and 4 (no 100-nat gain): stop
    name = Path(summary["selected_checkpoint"]).name
    assert name in ("best-0000002.ckpt", "best-0000004.ckpt")


def test_distillation_under_ddp_on_two_cpu_processes(tiny_hf_checkpoint, tmp_path: Path) -> None:
    """Each rank builds its own frozen teacher; the run trains, validates both sets and
    restores the best checkpoint on two gloo processes."""
    from conftest import ddp_recovery_overrides, run_module

    ckpt = tiny_hf_checkpoint("llama", max_position_embeddings=256)
    run_dir = tmp_path / "ddp"
    args = ddp_recovery_overrides(ckpt, run_dir, tmp_path / "cache", steps=2)
    run_module("qsparse.cli.train", args, cwd=tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 2
    assert summary["val_ood_loss"] > 0 and summary["selected_by"] == "val_ood/loss"
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/kl" in header


def test_finetune_recipe_with_distillation(tiny_hf_checkpoint, tmp_path: Path) -> None:
    """distill= plugs into the SFT recipes: KL on response tokens beside the LM loss."""
    ckpt = tiny_hf_checkpoint("qwen2", max_position_embeddings=512)
    run_dir = tmp_path / "run"
    cfg = tiny_run_config(
        "finetune/tiny",
        ckpt,
        tmp_path,
        "distill=lm_logits",
        "sparsity.ratio=0.4",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
    )
    summary = train(cfg)
    assert summary["step"] == 2 and summary["val_loss"] > 0
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/kl", "train/lm_loss"} <= set(header)
