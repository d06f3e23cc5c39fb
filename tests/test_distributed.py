"""Two CPU processes (gloo) under DDP and FSDP2: weight decay decided by name before sharding,
sharded checkpoints, exact resume (per-step loss equal to an uninterrupted run, final weights
bitwise equal) and the transformers export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli_train import FAST, ROOT, _cli

from qsparse.training.metrics_csv import read_metrics
from qsparse.training.optim import no_decay_names, param_groups


def test_no_decay_is_decided_by_name_before_wrapping() -> None:
    """FSDP1 flattens every parameter to 1-D; the groups taken from names recorded on the
    unwrapped model still put the matrices (not norms, biases, embeddings) in the decay group."""
    from qsparse.models.builder import llama

    model = llama("tiny", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    names = no_decay_names(model)
    matrices = {n for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n}
    assert matrices and not matrices & names
    assert any("norm" in n for n in names) and any("embed" in n for n in names)
    for module in model.modules():  # what flat-parameter wrapping leaves visible: 1-D tensors
        for key, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[key] = torch.nn.Parameter(p.detach().reshape(-1))
    by_name = {id(p): n for n, p in model.named_parameters()}
    groups = {
        g["name"]: {by_name[id(p)] for p in g["params"]} for g in param_groups(model, 0.1, names)
    }
    assert groups["decay"] == matrices
    naive = {g["name"]: g["params"] for g in param_groups(model, 0.1)}
    assert "decay" not in naive, "deciding on the wrapped model loses weight decay"


def _run(tmp: Path, name: str, trainer: str, extra: list[str]) -> Path:
    run_dir = tmp / name
    res = _cli(
        [
            *FAST,
            f"trainer={trainer}",
            f"run_dir={run_dir}",
            "sparsity=topk",
            "export=true",
            "callbacks.checkpoint.save_top_k=-1",
            *extra,
        ],
        tmp,
        pythonpath=(ROOT / "tests",),
        timeout=400,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("trainer", ["fsdp_cpu", pytest.param("ddp_cpu", marks=pytest.mark.slow)])
def test_exact_resume_and_export_on_two_processes(tmp_path: Path, trainer: str) -> None:
    """4 steps straight == 2 steps + resume from the step-2 checkpoint + 2 steps: same loss at
    every step, same exported weights; the optimizer groups hold every matrix in the decay
    group; under FSDP the checkpoint is a folder of per-rank shards."""
    probe = [
        "+callbacks.groups._target_=train_probe.GroupProbe",
        f"+callbacks.groups.out_dir={tmp_path / 'probe'}",
    ]
    full = _run(tmp_path, "full", trainer, probe)
    step2 = full / "checkpoints" / "step0000002.ckpt"
    assert step2.exists()
    if trainer == "fsdp_cpu":
        assert step2.is_dir() and len(list(step2.glob("*.distcp"))) == 2
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    copy = shutil.copytree if step2.is_dir() else shutil.copy
    copy(step2, resumed / "checkpoints" / "last.ckpt")
    # validation after the 3rd step only (logged at step 2): fit ends at step 4 without one,
    # so trainer.validate runs after fit (logged at 4), on the sharded model
    _run(tmp_path, "resumed", trainer, ["resume=true", "trainer.val_check_interval=3"])
    assert sorted(dict(read_metrics(resumed)["val/loss"])) == [2, 4]

    a, b = dict(read_metrics(full)["train/loss"]), dict(read_metrics(resumed)["train/loss"])
    assert sorted(a) == [0, 1, 2, 3] and sorted(b) == [2, 3]
    for step in (2, 3):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    wa = load_file(full / "hf" / "model.safetensors")
    wb = load_file(resumed / "hf" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    config = json.loads((full / "hf" / "config.json").read_text())
    assert "qsparse" in json.dumps(config)

    for rank in (0, 1):
        probe_out = json.loads((tmp_path / "probe" / f"groups{rank}.json").read_text())
        decay = probe_out["groups"]["decay"]
        assert decay and all(len(shape) == 2 and "embed" not in n for n, shape in decay)
        assert all(len(shape) < 2 or "embed" in n for n, shape in probe_out["groups"]["no_decay"])
        assert probe_out["wd"][0] > 0


@pytest.mark.slow
def test_fsdp_preset_starts_under_torchrun(tmp_path: Path) -> None:
    """``torchrun --nproc-per-node 2 -m qsparse.cli.train trainer=fsdp_cpu``: Lightning takes the
    ranks from torchrun's environment (no processes of its own); rank zero prepares the run
    directory, the others train beside it."""
    import os
    import subprocess
    import sys

    run_dir = tmp_path / "torchrun"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(29500 + os.getpid() % 400), "-m", "qsparse.cli.train",
         *FAST, "trainer=fsdp_cpu", f"run_dir={run_dir}", "logger=csv"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 4
    assert (run_dir / "checkpoints" / "last.ckpt" / ".metadata").is_file()
    assert (run_dir / "config.yaml").is_file()
