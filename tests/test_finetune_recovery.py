"""The fine-tuning recovery levers: another checkpoint as the frozen teacher
(``distill.teacher_path``), the per-site table of a continued-trained export kept by a
fine-tuning run, and a two-stage run of ``benchmarks/finetune_recovery.py``."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_tokenizer, compose_train

import qsparse
from qsparse.nn import SparsityConfig
from qsparse.training import config as _schemas  # noqa: F401  (registers train_schema)
from qsparse.training.distill import DistillConfig, TeacherPathError, kl_distill_loss
from qsparse.training.module import LMModule
from qsparse.training.run import train

ROOT = Path(__file__).resolve().parents[1]
HF_MODEL = "qsparse.models.pretrained.hf_model"


def test_teacher_path_loads_that_checkpoint_as_the_teacher(tiny_hf_checkpoint) -> None:
    """Student from checkpoint A, teacher_path = checkpoint B (other seed): the teacher holds
    B's weights, not A's, and the distilled loss is CE + KL against B's logits."""
    from transformers import AutoModelForCausalLM

    a = tiny_hf_checkpoint("llama", seed=0, max_position_embeddings=256)
    b = tiny_hf_checkpoint("llama", seed=1, max_position_embeddings=256, tokenizer=False)
    module = LMModule(
        model={"_target_": HF_MODEL, "path": str(a)},
        sparsity=0.5,
        distill={"mode": "logits", "lm_weight": 1.0, "kl_weight": 1.0, "teacher_path": str(b)},
    )
    module.configure_model()
    teacher = module.build_teacher()
    want = AutoModelForCausalLM.from_pretrained(b).eval()
    other = AutoModelForCausalLM.from_pretrained(a).eval()
    for name, p in want.state_dict().items():
        assert torch.equal(teacher.state_dict()[name], p), name
    w = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(teacher.state_dict()[w], other.state_dict()[w])
    assert not qsparse.sparsifiers(teacher) and qsparse.sparsifiers(module.model)

    ids = torch.randint(4, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    loss = module._distill_step(batch, 2)
    out = module.model(input_ids=ids, labels=ids)
    with torch.no_grad():
        kl = kl_distill_loss(out.logits, want(input_ids=ids).logits, ids)
    assert float(loss.detach()) == pytest.approx(float((out.loss + kl).detach()), rel=1e-5)
    assert float(kl) > 1e-3  # another model: the KL is not the student's own


def test_bad_teacher_path_fails_before_the_run_writes(tiny_hf_checkpoint, tmp_path: Path) -> None:
    ckpt = tiny_hf_checkpoint("llama", max_position_embeddings=512)
    wide = tiny_hf_checkpoint("llama", vocab_size=600, tokenizer=False)
    run_dir = tmp_path / "run"
    common = [
        "recipe=finetune/tiny",
        f"model.path={ckpt}",
        f"run_dir={run_dir}",
        "distill=lm_logits",
        "trainer.max_steps=1",
    ]
    for path, match in (
        (tmp_path / "missing", r"distill.teacher_path=.*missing does not exist; give a"),
        (wide, r"distill.teacher_path=.* has vocab_size 600, the student"),
    ):
        with pytest.raises(TeacherPathError, match=match):
            train(compose_train([*common, f"distill.teacher_path={path}"]))
        assert not run_dir.exists()
    with pytest.raises(ValueError, match="teacher_path is set but distill.mode='none'"):
        DistillConfig(teacher_path=str(ckpt))


def test_finetune_keeps_the_table_of_a_greedy_export(tiny_hf_checkpoint, tmp_path: Path) -> None:
    """model.path = an export trained with a per-site table: allocation=greedy at the same S
    takes the stored table (no search, no calibration text needed); at another S it would
    search; uniform top-k replaces it and says so."""
    from transformers import AutoModelForCausalLM

    ckpt = tiny_hf_checkpoint("llama", max_position_embeddings=256)
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    sites = {f"layers.{i}.{s}": 0.1 * (i + 1) + r for i in range(2) for s, r in
             (("self_attn.qkv", 0.0), ("self_attn.o_proj", 0.05), ("mlp.gate_up", 0.2),
              ("mlp.down_proj", 0.3))}  # fmt: skip
    qsparse.sparsify(model, sparsity=SparsityConfig(ratio=0.4, allocation="greedy", sites=sites))
    export = tmp_path / "export"
    qsparse.export(model, export, tokenizer=build_tiny_tokenizer())

    def built(**sparsity) -> LMModule:
        module = LMModule(model={"_target_": HF_MODEL, "path": str(export)}, sparsity=sparsity)
        module.configure_model()
        return module

    greedy = built(ratio=0.4, pattern="token_topk", allocation="greedy", calibration=["nope"])
    assert greedy.sparsity.sites == pytest.approx(sites)
    assert greedy.hparams["sparsity"]["sites"] == pytest.approx(sites)
    with pytest.raises(ValueError, match="sparsity.calibration: 'nope'"):
        built(ratio=0.5, pattern="token_topk", allocation="greedy", calibration=["nope"])
    with pytest.raises(ValueError, match="sparsity.calibration: 'nope'"):  # another allocation
        built(ratio=0.4, pattern="token_topk", allocation="cross_layer", calibration=["nope"])
    assert built(ratio=0.4, pattern="token_topk").sparsity.sites == {}


@pytest.mark.slow
def test_two_stage_study_on_the_tiny_recipe(tiny_hf_checkpoint, tmp_path: Path) -> None:
    """finetune_recovery.py: dense and greedy at once, then the {dense_hf} variants distilling
    from the dense run's export (one of them greedy too); every job in the JSON with a finite
    val_loss, the teacher the dense export (about a minute on 2 cores)."""
    ckpt = tiny_hf_checkpoint("llama", max_position_embeddings=512)
    out = tmp_path / "ft"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "finetune_recovery.py"),
        "--recipe=finetune/tiny",
        "--device=cpu",
        "--parallel",
        "--kinds",
        "dense",
        f"--out={out}",
        "--variant=kd=distill=lm_logits distill.teacher_path={dense_hf}",
        "--variant=greedy@0.5=sparsity.allocation=greedy",
        "--variant=gkd@0.5=sparsity.allocation=greedy distill=lm_logits "
        "distill.teacher_path={dense_hf}",
        "--",
        f"model.path={ckpt}",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "data.max_examples=64",
        "trainer.enable_progress_bar=false",
        "sparsity.calibration_tokens=512",
        "sparsity.allocation_step=0.25",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QSPARSE_CACHE": str(tmp_path / "cache")}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads((out / "finetune_recovery.json").read_text())["results"]
    assert set(results) == {"dense", "kd", "greedy_S0.5", "gkd_S0.5"}
    assert all(math.isfinite(r["val_loss"]) for r in results.values())
    dense_hf = str(out / "runs" / "dense" / "hf")
    assert results["kd"]["teacher_path"] == dense_hf and results["kd"]["S"] == 0.4
    assert results["gkd_S0.5"]["teacher_path"] == dense_hf
    assert results["gkd_S0.5"]["site_ratios"] == results["greedy_S0.5"]["site_ratios"]
    assert results["dense"]["teacher_path"] is None
    assert results["greedy_S0.5"]["S"] == 0.5 and results["greedy_S0.5"]["site_ratios"]
    assert "(1.000x dense)" in res.stdout and "greedy table at S=0.5" in res.stdout
    for name in ("greedy_S0.5", "gkd_S0.5"):  # both found the table the parent searched
        line = re.search(r"site ratios in .* \((\d+\.\d) s\)", (out / f"{name}.log").read_text())
        assert line and float(line.group(1)) < 2.0, name  # a cache hit; searching takes seconds
    for name in results:  # each job's export stays (the teacher of the second stage)
        assert (out / "runs" / name / "hf" / "config.json").is_file(), name
        assert not (out / "runs" / name / "checkpoints").exists(), name
