"""Continued training dense -> Q-Sparse (recipe=continue/tiny) on tiny HF checkpoints, the
sparsity warm-up callback, the model=hf builder's checks and the 8-bit optimizer's CPU error."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import build_from_config, compose_train, tiny_run_config, validation_loss
from lightning.pytorch.trainer.states import TrainerFn

import qsparse
from qsparse.models.hf import CheckpointError
from qsparse.models.pretrained import hf_model
from qsparse.training import config as _schemas  # noqa: F401  (registers train_schema)
from qsparse.training.module import LMModule
from qsparse.training.optim_8bit import adamw8bit
from qsparse.training.run import train
from qsparse.training.sparsity_warmup import SparsityWarmup, warmup_fraction

FAMILIES = ("llama", "mistral", "qwen2")


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data cache for the module: the three tiny checkpoints share a tokenizer."""
    return tmp_path_factory.mktemp("qsparse-cache")


def validate_once(cfg) -> float:
    """Validation loss of the model the recipe builds *before* any training step (the dense
    checkpoint right after qsparse.sparsify), on the recipe's own validation batches."""
    dm, module = build_from_config(cfg)
    loss = validation_loss(module, dm, cfg.trainer.limit_val_batches)
    # the converted model really runs at the recipe's sparsity
    sites = qsparse.sparsifiers(module.model)
    assert sites and all(sp.ratio == pytest.approx(0.5) for sp in sites.values())
    return loss


def read_csv_metric(run_dir: Path, key: str) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key) not in (None, "")]


@pytest.mark.parametrize("family", FAMILIES)
def test_continue_recipe_lowers_val_loss_and_exports(
    family: str, tiny_hf_checkpoint, tmp_path: Path, data_cache: Path
) -> None:
    ckpt = tiny_hf_checkpoint(family, max_position_embeddings=256)
    run_dir = tmp_path / "run"
    cfg = compose_train(
        [
            "recipe=continue/tiny",
            f"model.path={ckpt}",
            f"run_dir={run_dir}",
            f"data.cache_dir={data_cache}",
            "data.max_documents=600",
            "logger=csv",
            "trainer.max_steps=30",
            "trainer.val_check_interval=30",
            "trainer.enable_progress_bar=false",
            "callbacks.checkpoint.every_n_train_steps=30",
            "callbacks.sparsity_warmup.steps=6",
        ],
    )
    before = validate_once(cfg)
    summary = train(cfg)
    after = summary["val_loss"]
    assert after < before - 0.3, (before, after)

    # sparsity warm-up: ramped 0 -> 1 from global_step, logged, ends at the target
    frac = read_csv_metric(run_dir, "sparsity/warmup_fraction")
    ratio = read_csv_metric(run_dir, "sparsity/ratio")
    assert frac[0] < 1.0 and frac == sorted(frac) and frac[-1] == 1.0
    assert ratio[-1] == pytest.approx(0.5)

    # export: a transformers folder with the settings; qsparse.load gives identical logits
    export_dir = Path(summary["export_dir"])
    config = json.loads((export_dir / "config.json").read_text())
    assert config["qsparse"]["sparsity"]["ratio"] == 0.5
    assert (export_dir / "tokenizer.json").is_file()
    trained = LMModule.load_from_checkpoint(
        str(run_dir / "checkpoints" / "last.ckpt"), map_location="cpu"
    ).model.eval()
    reloaded = qsparse.load(export_dir, dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = trained(input_ids=ids).logits
        b = reloaded(input_ids=ids).logits
    assert torch.equal(a, b)
    # the trained weights differ from the dense checkpoint: it really was trained
    dense = qsparse.load(ckpt, dtype=torch.float32)
    assert not torch.equal(
        dense.model.layers[0].mlp.down_proj.weight, reloaded.model.layers[0].mlp.down_proj.weight
    )


# --------------------------------------------------------------------------- warm-up unit


def _fake_trainer(step: int, fn: TrainerFn = TrainerFn.FITTING) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, state=SimpleNamespace(fn=fn))


def _sparsified_tiny(ratio: float = 0.6) -> torch.nn.Module:
    from qsparse.models import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig.from_preset("tiny"))
    qsparse.sparsify(model, qsparse.SparsityConfig(ratio=ratio, down=0.8))
    return model


def test_warmup_fraction_schedules() -> None:
    assert [warmup_fraction(s, 4) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert warmup_fraction(0, 0) == 1.0
    assert warmup_fraction(2, 4, "cosine") == pytest.approx(0.5)
    assert warmup_fraction(1, 4, "cosine") == pytest.approx(0.5 * (1 - 2**-0.5))
    with pytest.raises(ValueError, match="schedule"):
        warmup_fraction(1, 4, "exp")
    with pytest.raises(ValueError, match="steps"):
        SparsityWarmup(steps=-1)


def test_warmup_callback_follows_global_step_and_resumes() -> None:
    model = _sparsified_tiny()
    cb = SparsityWarmup(steps=10, log=False)
    cb.on_fit_start(_fake_trainer(0), model)
    ratios = {n: sp.ratio for n, sp in qsparse.sparsifiers(model).items()}
    assert all(r == 0.0 for r in ratios.values())
    cb.on_train_batch_start(_fake_trainer(5), model, None, 0)
    for name, sp in qsparse.sparsifiers(model).items():
        target = 0.8 if name.endswith("down_proj") else 0.6
        assert sp.ratio == pytest.approx(0.5 * target)  # per-site targets ramp proportionally
    # "resume": a fresh callback on a trainer at step 7 lands at 70% at once
    fresh = SparsityWarmup(steps=10, log=False)
    fresh.on_fit_start(_fake_trainer(7), model)
    assert qsparse.sparsifiers(model)["layers.0.self_attn.qkv"].ratio == pytest.approx(0.42)
    # validation outside fit leaves the ratio alone; end of training restores the target
    fresh.on_validation_start(_fake_trainer(1, TrainerFn.VALIDATING), model)
    assert qsparse.sparsifiers(model)["layers.0.self_attn.qkv"].ratio == pytest.approx(0.42)
    with pytest.warns(UserWarning, match="inside the sparsity warm-up"):
        fresh.on_train_end(_fake_trainer(7), model)
    assert qsparse.sparsifiers(model)["layers.1.mlp.down_proj"].ratio == pytest.approx(0.8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.on_train_end(_fake_trainer(20), model)  # ramp done: no warning


def test_warmup_callback_needs_sparsity_sites() -> None:
    from qsparse.models import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="no sparsity sites"):
        SparsityWarmup(steps=3).on_fit_start(_fake_trainer(0), dense)


# --------------------------------------------------------------------------- model=hf checks


def test_hf_builder_loads_and_applies_options(tiny_hf_checkpoint) -> None:
    ckpt = tiny_hf_checkpoint("qwen2")
    model = hf_model(ckpt, gradient_checkpointing=True)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.training and model.config.use_cache is False
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    ours = hf_model(tiny_hf_checkpoint("llama"), model_class="qsparse")
    assert type(ours).__module__ == "qsparse.models.llama"
    with pytest.raises(ValueError, match="model_class='qsparse' needs a Llama"):
        hf_model(ckpt, model_class="qsparse")
    with pytest.raises(ValueError, match="model.dtype"):
        hf_model(ckpt, dtype="float64")


def _grads(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointing_keeps_gradients_of_sparsified_hf_model(tiny_hf_checkpoint) -> None:
    """transformers' checkpointing (hf_model(gradient_checkpointing=True)) and the run-level wrapper
    (gradient_checkpointing: true) recompute the top-k layers exactly: same gradients."""
    from qsparse.models.checkpointing import enable_gradient_checkpointing

    ckpt = tiny_hf_checkpoint("llama")
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    models = [hf_model(ckpt), hf_model(ckpt, gradient_checkpointing=True), hf_model(ckpt)]
    enable_gradient_checkpointing(models[2])
    grads = []
    for m in models:
        qsparse.sparsify(m, 0.5)
        grads.append(_grads(m, ids))
    assert len(grads[0]) == len(list(models[0].parameters()))
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        for name in grads[0]:
            torch.testing.assert_close(other[name], grads[0][name], rtol=1e-5, atol=1e-7)


def _break(path: Path, what: str) -> None:
    if what == "config":
        (path / "config.json").unlink()
    elif what == "weights":
        (path / "model.safetensors").unlink()
    elif what == "tokenizer":
        for f in path.glob("tokenizer*"):
            f.unlink()
    elif what == "model_type":
        cfg = json.loads((path / "config.json").read_text())
        cfg["model_type"] = "gpt2"
        (path / "config.json").write_text(json.dumps(cfg))
    elif what == "shard":
        index = {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    "what,message",
    [
        ("config", "no config.json"),
        ("weights", "no weights"),
        ("tokenizer", "no tokenizer"),
        ("model_type", "model_type='gpt2'"),
        ("shard", "model-00002-of-00002.safetensors"),
    ],
)
def test_hf_builder_names_what_is_missing(tiny_hf_checkpoint, what: str, message: str) -> None:
    ckpt = tiny_hf_checkpoint("llama")
    _break(ckpt, what)
    with pytest.raises(CheckpointError, match=message):
        hf_model(ckpt)


def test_hf_builder_rejects_missing_path_and_oversized_tokenizer(
    tiny_hf_checkpoint, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="model.path is not set"):
        hf_model("???")
    with pytest.raises(CheckpointError, match="does not exist"):
        hf_model(tmp_path / "nowhere")
    small = tiny_hf_checkpoint("mistral", vocab_size=200)  # tokenizer has ~300 entries
    with pytest.raises(ValueError, match="overflow the embedding"):
        hf_model(small)


def test_recipe_without_model_path_fails_clearly(tmp_path: Path) -> None:
    cfg = compose_train(["recipe=continue/tiny", f"run_dir={tmp_path}", "logger=csv"])
    with pytest.raises(Exception, match="model.path"):
        train(cfg)
    shutil.rmtree(tmp_path, ignore_errors=True)


# --------------------------------------------------------------------------- adamw8bit


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_adamw8bit_errors_clearly_without_cuda(tiny_hf_checkpoint, tmp_path: Path) -> None:
    layer = torch.nn.Linear(8, 8)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*optim=adamw"):
        adamw8bit(layer.parameters(), lr=1e-3)
    # through the recipe: the run stops at optimizer creation with the same message
    cfg = tiny_run_config(
        "continue/tiny",
        tiny_hf_checkpoint("llama"),
        tmp_path,
        "data.max_documents=50",
        "optim=adamw8bit",
    )
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        train(cfg)
