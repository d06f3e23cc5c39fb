"""LMModule with a real Lightning Trainer on tiny models: logged metrics, gradient clipping,
gradient checkpointing, load_from_checkpoint, vocab from the datamodule, bad input."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from qsparse.data.random_tokens import RandomTokenDataModule
from qsparse.nn.sites import sparsifiers
from qsparse.training import LMModule, SparsityMonitor, TokenThroughputMonitor
from qsparse.training.checkpoint import AtomicCheckpointIO, PeriodicCheckpoint

MODEL = {"preset": "tiny", "vocab_size": None}
OPTIM = {"_target_": "torch.optim.AdamW", "lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.1}
SCHED = {"_target_": "qsparse.training.optim.warmup_decay", "warmup_steps": 2, "min_lr": 1e-4}


def _dm() -> RandomTokenDataModule:
    return RandomTokenDataModule(vocab_size=128, seq_len=32, batch_size=4, num_train=64, num_val=8)


def _trainer(tmp_path: Path, steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        plugins=[AtomicCheckpointIO()],
        **kwargs,
    )


class _ClipProbe(L.Callback):
    """Records the logged pre-clip norm and the gradient norm the optimizer actually sees."""

    def __init__(self) -> None:
        self.pre: list[float] = []
        self.post: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.post.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        self.pre.append(float(pl_module._grad_norm))


def test_lmmodule_trains_logs_metrics_and_reloads(tmp_path: Path) -> None:
    L.seed_everything(0)
    module = LMModule(model=MODEL, sparsity=0.5, optim=OPTIM, scheduler=SCHED)
    probe = _ClipProbe()
    ckpt = PeriodicCheckpoint(
        dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=0, save_last=True
    )
    trainer = _trainer(
        tmp_path,
        4,
        gradient_clip_val=0.05,
        logger=CSVLogger(tmp_path, name="", version="csv"),
        callbacks=[
            ckpt,
            probe,
            TokenThroughputMonitor(every_n_steps=1, warmup_steps=0),
            SparsityMonitor(1),
        ],
    )
    trainer.fit(module, datamodule=_dm())
    assert module.hparams["model"]["vocab_size"] == 128  # filled from the datamodule
    assert len(sparsifiers(module.model)) == 8  # 2 layers x (qkv, o, gate_up, down)

    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    keys = set().union(*(r.keys() for r in rows))
    for key in (
        "train/loss", "train/ppl", "train/lr", "train/grad_norm", "val/loss", "val/ppl",
        "perf/tokens_per_s", "sparsity/overall", "sparsity/layers.0.mlp.down_proj",
        "params/activated", "val/sparsity",
    ):  # fmt: skip
        assert key in keys, key
    for r in rows:
        if r.get("train/loss"):
            assert float(r["train/ppl"]) == pytest.approx(
                math.exp(float(r["train/loss"])), rel=1e-5
            )
        if r.get("val/loss"):
            assert float(r["val/ppl"]) == pytest.approx(math.exp(float(r["val/loss"])), rel=1e-5)
        if r.get("sparsity/layers.0.self_attn.qkv"):
            assert float(r["sparsity/layers.0.self_attn.qkv"]) == pytest.approx(0.5, abs=1e-6)
    lrs = [float(r["train/lr"]) for r in rows if r.get("train/lr")]
    assert lrs[0] == pytest.approx(3e-3 / 2)  # warm-up step 1 of 2
    # clipping: the logged norm is the pre-clip one; the optimizer saw at most the clip value
    assert all(pre > 0.05 for pre in probe.pre)
    assert all(post <= 0.05 * 1.001 for post in probe.post)

    # the final step is checkpointed (every 3 steps + at the end) and reloads exactly
    last = tmp_path / "ck" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 4
    loaded = LMModule.load_from_checkpoint(last)
    ids = torch.randint(0, 128, (2, 16))
    module.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(module(ids).logits, loaded(ids).logits)
    assert loaded.sparsity.ratio == 0.5


def test_gradient_checkpointing_gives_identical_gradients() -> None:
    grads = []
    for gc in (False, True):
        torch.manual_seed(0)
        m = LMModule(model={"preset": "tiny"}, sparsity=0.5, gradient_checkpointing=gc)
        m.configure_model()
        ids = torch.randint(0, 256, (2, 24))
        m(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


def test_configure_model_is_idempotent_and_keeps_hf_names() -> None:
    m = LMModule(
        model={"preset": "tiny"}, sparsity=0.5, quant={"weights": "ternary", "act_bits": 8}
    )
    m.configure_model()
    first = m.model
    m.configure_model()
    assert m.model is first
    names = set(dict(m.model.named_parameters()))
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert "model.layers.1.mlp.down_proj.weight" in names


def test_lmmodule_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="activation"):
        LMModule(model={"preset": "tiny"}, activation="gelu")
    with pytest.raises(ValueError, match=r"sparsity\.ratio"):
        LMModule(model={"preset": "tiny"}, sparsity=1.0)
    with pytest.raises(ValueError, match="unknown sparsity"):
        LMModule(model={"preset": "tiny"}, sparsity={"ratoi": 0.3})
    with pytest.raises(ValueError, match="model"):
        LMModule(model={"preset": "tiny", "hiden_size": 8}).configure_model()
    m = LMModule(model={"preset": "tiny", "vocab_size": None})
    with pytest.raises(ValueError, match="vocab_size"):
        m.configure_model()  # no datamodule to take it from
    m = LMModule(model={"preset": "tiny"})
    with pytest.raises(ValueError, match="labels"):
        m.training_step({"input_ids": torch.zeros(1, 4, dtype=torch.long)}, 0)


class _CountingSparsityMonitor(SparsityMonitor):
    """Records, for each measurement it logs, the step and the values counted at one site."""

    def __init__(self) -> None:
        super().__init__(every_n_steps=1)
        self.measured: list[tuple[int, float]] = []

    def _collect(self, model: torch.nn.Module) -> dict[str, float]:
        site = sparsifiers(model)["layers.0.mlp.down_proj"]
        self.measured.append((self._trainer_step, float(site.values_seen)))
        return super()._collect(model)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._trainer_step = trainer.global_step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def test_sparsity_monitor_measures_each_step_once_under_gradient_accumulation(
    tmp_path: Path,
) -> None:
    """With ``accumulate_grad_batches=4`` a step is measured and logged once, over its four
    micro-batches (4x the values one micro-batch has), not once per micro-batch, also with a
    validation between two of its micro-batches (``val_check_interval=2`` counts batches)."""
    counted = {}
    for accumulate in (1, 4):
        L.seed_everything(0)
        monitor = _CountingSparsityMonitor()
        module = LMModule(model=MODEL, sparsity=0.5, optim=OPTIM, scheduler=SCHED)
        logs = tmp_path / f"acc{accumulate}"
        trainer = _trainer(
            logs,
            3,
            accumulate_grad_batches=accumulate,
            logger=CSVLogger(logs, name="", version="csv"),
            callbacks=[monitor],
        )
        trainer.fit(module, datamodule=_dm())
        assert [step for step, _ in monitor.measured] == [1, 2, 3]
        rows = list(csv.DictReader(open(logs / "csv" / "metrics.csv")))
        logged = [int(r["step"]) for r in rows if r.get("sparsity/overall")]
        assert logged == sorted(set(logged)) and len(logged) == 3  # one row per step
        counted[accumulate] = {values for _, values in monitor.measured}
    per_micro_batch = 4 * 32 * 176  # B x T x intermediate_size (tiny) at the down_proj input
    assert counted[1] == {per_micro_batch}
    assert counted[4] == {4 * per_micro_batch}


def test_topk_at_ratio_zero_measures_the_activation_functions_own_zeros() -> None:
    """``sparsity=topk`` with every ratio 0 keeps pass-through sparsifiers, so a dense ReLU²
    model reports its natural sparsity at the down input (and none elsewhere), while its
    output equals the plain dense model's; ``pattern: none`` installs nothing."""
    from qsparse.stats import sparsity_report

    torch.manual_seed(0)
    plain = LMModule(model={**MODEL, "vocab_size": 128, "hidden_act": "relu2"}, sparsity=None)
    plain.configure_model()
    measured = LMModule(
        model={**MODEL, "vocab_size": 128, "hidden_act": "relu2"},
        sparsity={"pattern": "token_topk", "ratio": 0.0},
    )
    measured.configure_model()
    measured.model.load_state_dict(plain.model.state_dict())
    assert not sparsifiers(plain.model) and sparsifiers(measured.model)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert torch.equal(plain.model(input_ids=ids).logits, measured.model(input_ids=ids).logits)
    sites = sparsity_report(measured.model, [ids]).sites
    down = [v for k, v in sites.items() if "down" in k]
    assert down and all(0.2 < v < 0.8 for v in down)  # ReLU² at init zeroes about half
    assert all(v == 0.0 for k, v in sites.items() if "down" not in k)
