"""Unit tests of the training stack pieces that need no Trainer: optimizer groups, LR
schedules, peak-FLOPs table, config validation, atomic checkpoint writes, CSV reading."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from qsparse.io import swap_in
from qsparse.models import LlamaConfig, LlamaForCausalLM
from qsparse.models.flops import model_flops_per_token
from qsparse.training.checkpoint import atomic_torch_save
from qsparse.training.config import paper_lr, validate_config
from qsparse.training.flops import peak_flops, peak_flops_for_name, precision_dtype
from qsparse.training.metrics_csv import read_metrics
from qsparse.training.optim import TwoStageSchedule, lr_factor, param_groups, warmup_decay
from qsparse.training.plots import plot_loss_curve


def _tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig.from_preset("tiny"))


def test_param_groups_exclude_norms_and_embeddings_from_decay() -> None:
    model = _tiny()
    groups = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert "model.embed_tokens.weight" in no_decay  # tied with lm_head: counted once
    assert all("norm" in n or "embed" in n for n in no_decay)
    assert "model.layers.0.self_attn.q_proj.weight" in decay
    assert "model.layers.1.mlp.down_proj.weight" in decay
    assert not decay & no_decay
    unique = {id(p) for p in model.parameters()}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(unique)
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(model, -1.0)


def test_warmup_cosine_schedule_matches_formula() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = warmup_decay(opt, total_steps=110, warmup_steps=10, min_lr=1e-4)
    lrs = []
    for _ in range(111):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3 * 1 / 10)
    assert lrs[9] == pytest.approx(1e-3)
    mid = 10 + 50  # half-way through the decay: cos(pi/2) = 0
    assert lrs[mid] == pytest.approx(1e-4 + (1e-3 - 1e-4) * 0.5)
    assert lrs[110] == pytest.approx(1e-4)
    assert all(a >= b - 1e-12 for a, b in zip(lrs[9:], lrs[10:], strict=False))


def test_polynomial_and_constant_factors() -> None:
    assert lr_factor(5, 0, 10, 0.0, "linear") == pytest.approx(0.5)
    assert lr_factor(5, 0, 10, 0.0, "polynomial", power=2.0) == pytest.approx(0.25)
    assert lr_factor(50, 10, 100, 0.1, "constant") == 1.0
    with pytest.raises(ValueError, match="scheduler.decay"):
        lr_factor(5, 0, 10, 0.0, "step")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ValueError, match="scheduler.min_lr"):
        warmup_decay(opt, total_steps=10, min_lr=1e-2)
    with pytest.raises(ValueError, match="scheduler.total_steps"):
        warmup_decay(opt, total_steps=0)


def test_total_steps_errors_say_what_null_means() -> None:
    """``scheduler.total_steps: null`` takes Lightning's ``estimated_stepping_batches`` (what
    ``LMModule.configure_optimizers`` reads), and both checks say so."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ValueError, match=r"total_steps=0 .*null = .*estimated_stepping_batches"):
        warmup_decay(opt, total_steps=0)
    with pytest.raises(ValueError, match=r"total_steps=0 .*null = .*estimated_stepping_batches"):
        validate_config({"run_name": "x", "scheduler": {"total_steps": 0}})


def test_two_stage_schedule_switches_lr_and_weight_decay() -> None:
    a, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW(
        [{"params": [a], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], lr=1.5e-3
    )
    sched = TwoStageSchedule(opt, total_steps=100, stage2_lr=1e-3, warmup_steps=0, min_lr=0.0)
    seen = []
    for _ in range(100):
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]))
        opt.step()
        sched.step()
    assert seen[0] == (pytest.approx(1.5e-3), 0.1)
    assert seen[49][1] == 0.1 and seen[50][1] == 0.0
    assert seen[49][0] == pytest.approx(1e-3, rel=0.01)  # stage 1 ends at stage2_lr
    assert seen[50][0] == pytest.approx(1e-3)  # stage 2 restarts from stage2_lr
    assert seen[99][0] < 1e-5
    assert opt.param_groups[1]["weight_decay"] == 0.0
    state = sched.state_dict()
    assert state["last_epoch"] == 100


def test_peak_flops_table() -> None:
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops_for_name("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops_for_name("NVIDIA H200", "bf16") == 989e12
    # the names of qsparse.dtypes, canonical or alias, and what a Lightning precision maps to
    assert peak_flops_for_name("NVIDIA H200", "bfloat16") == 989e12
    assert peak_flops_for_name("NVIDIA H200", precision_dtype("bf16-mixed")) == 989e12
    assert peak_flops_for_name("NVIDIA H200", precision_dtype("32-true")) == 494e12
    assert precision_dtype(16) == "float16"
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert peak_flops_for_name("Some Unknown GPU", "bf16") is None
    assert peak_flops("cpu", "fp32") is None
    with pytest.raises(ValueError, match="dtype"):
        peak_flops_for_name("NVIDIA H100", "int8")


def test_model_flops_per_token_uses_model_helper_and_fallback() -> None:
    model = _tiny()
    cfg = model.config
    assert model_flops_per_token(model, 64) == cfg.flops_per_token(64)
    # the model's count is ~6 N (+ attention): within 1% of 6 x its linear weights + attention
    n_linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    expected = 6 * n_linear + 12 * cfg.num_hidden_layers * cfg.hidden_size * 64
    assert cfg.flops_per_token(64) == pytest.approx(expected, rel=0.01)

    class Bare(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(8, 16)
            self.emb = torch.nn.Embedding(10, 8)

    assert model_flops_per_token(Bare(), 32) == 6 * 8 * 16


def _good_cfg() -> dict:
    return {
        "run_name": "x",
        "activation": "keep",
        "sparsity": {"ratio": 0.5, "pattern": "token_topk"},
        "quant": {"weights": "none"},
        "optim": {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.95]},
        "scheduler": {"warmup_steps": 10, "min_lr": 0.0},
        "trainer": {"max_steps": 10, "gradient_clip_val": 1.0},
        "data": {"batch_size": 4, "seq_len": 32},
    }


@pytest.mark.parametrize(
    ("path", "value", "key"),
    [
        (("sparsity", "ratio"), 1.0, "sparsity.ratio"),
        (("sparsity", "ratio"), -0.1, "sparsity.ratio"),
        (("sparsity", "down"), 1.5, "sparsity.down"),
        (("sparsity", "pattern"), "topk", "sparsity.pattern"),
        (("quant", "act_bits"), 1, "quant.act_bits"),
        (("optim", "lr"), 0.0, "optim.lr"),
        (("optim", "betas"), [0.9, 1.0], "optim.betas"),
        (("optim", "weight_decay"), -0.1, "optim.weight_decay"),
        (("scheduler", "warmup_steps"), -1, "scheduler.warmup_steps"),
        (("scheduler", "min_lr"), 1.0, "scheduler.min_lr"),
        (("trainer", "max_steps"), 0, "trainer.max_steps"),
        (("trainer", "gradient_clip_val"), -1.0, "trainer.gradient_clip_val"),
        (("data", "batch_size"), 0, "data.batch_size"),
        (("activation",), "gelu", "activation"),
        (("run_name",), "", "run_name"),
    ],
)
def test_validate_config_names_the_key(path: tuple, value: object, key: str) -> None:
    cfg = _good_cfg()
    validate_config(cfg)  # the base config is valid
    node = cfg
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        validate_config(cfg)


def test_paper_lr_table() -> None:
    assert paper_lr("700M") == 2.5e-4
    assert paper_lr("7B", "fp") == 1.5e-4
    assert paper_lr("700M", "bitnet") == 1.5e-3
    assert paper_lr("700M", "bitnet2") == 1e-3
    with pytest.raises(ValueError, match="model.preset"):
        paper_lr("tiny")


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "ckpt" / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.ones(3)}, path)
    assert torch.load(path)["step"] == 1

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_torch_save({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path)["step"] == 1  # the previous checkpoint is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temp left


def test_swap_in_replaces_a_folder_or_file_and_keeps_the_old_one_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder swap of atomic_write_dir and of the sharded FSDP checkpoint."""
    path = tmp_path / "last.ckpt"

    def finished(content: str) -> Path:
        tmp = tmp_path / f"last.ckpt.tmp-{content}"
        tmp.mkdir()
        (tmp / "shard").write_text(content)
        return tmp

    path.write_text("a plain checkpoint file")  # a file is replaced by the folder
    swap_in(finished("1"), path)
    assert (path / "shard").read_text() == "1"
    swap_in(finished("2"), path)
    assert (path / "shard").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no old/tmp left

    tmp = finished("3")
    real_replace = os.replace

    def failing(src, dst):
        if Path(src) == tmp:
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="rename failed"):
        swap_in(tmp, path)
    assert (path / "shard").read_text() == "2"  # the old folder is back in place

    other = tmp_path / "export"  # a file where a folder goes is kept too when the swap fails
    other.write_text("the user's file")
    tmp = finished("4")
    with pytest.raises(OSError, match="rename failed"):
        swap_in(tmp, other)
    assert other.read_text() == "the user's file"


def test_read_metrics_keeps_latest_value_per_step_and_plots(tmp_path: Path) -> None:
    d = tmp_path / "csv"
    d.mkdir()
    (d / "metrics.csv").write_text(
        "epoch,step,train/loss,val/loss\n"
        "0,0,5.0,\n0,1,4.0,\n0,1,,4.5\n0,2,3.5,\n"
        "0,1,3.9,\n"  # a resumed run repeating step 1
    )
    series = read_metrics(tmp_path)
    assert series["train/loss"] == [(0, 5.0), (1, 3.9), (2, 3.5)]
    assert series["val/loss"] == [(1, 4.5)]
    png = plot_loss_curve(tmp_path, tmp_path / "curve.png", reference=4.2)
    assert png is not None and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_loss_curve(tmp_path / "nothing", tmp_path / "none.png") is None


def test_peak_memory_is_reported_only_on_cuda() -> None:
    from qsparse.training.callbacks import peak_memory_gib

    assert peak_memory_gib(torch.device("cpu")) is None


def test_no_transformers_progress_bars_restores_the_setting() -> None:
    from transformers.utils import logging as hf_logging

    from qsparse.training.console import no_transformers_progress_bars

    assert hf_logging.is_progress_bar_enabled()
    with no_transformers_progress_bars():
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()
