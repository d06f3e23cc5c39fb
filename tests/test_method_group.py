"""The ``method=`` group of ``qsparse-train``: LMModule calls the method's training hooks
(ProSparse's ReLU swap, lambda schedule and final FATReLU; Q-Sparse as top-k), and methods
that do not train are refused before anything is written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import compose_train

import qsparse
from qsparse.errors import UserError
from qsparse.methods import FATReLU, MethodConfigError, ProSparse, method_from_spec
from qsparse.training import config as _schemas  # noqa: F401  (registers train_schema)
from qsparse.training.module import LMModule
from qsparse.training.run import check_config, train

TWO_STEPS = [
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.checkpoint.every_n_train_steps=2",
    "logger=csv",
]


def _module(path: Path, **kwargs) -> LMModule:
    module = LMModule(
        model={"_target_": "qsparse.models.pretrained.hf_model", "path": str(path)}, **kwargs
    )
    module.configure_model()
    return module


def test_method_from_spec_builds_and_names_errors() -> None:
    assert method_from_spec(None) is None and method_from_spec({}) is None
    method = method_from_spec({"_target_": "qsparse.methods.ProSparse", "final": True})
    assert isinstance(method, ProSparse) and method.final
    with pytest.raises(MethodConfigError, match="could not build qsparse.methods.ProSparse"):
        method_from_spec({"_target_": "qsparse.methods.ProSparse", "milestones": [5, 1]})
    with pytest.raises(MethodConfigError, match="not a qsparse.methods.SparsityMethod"):
        method_from_spec({"_target_": "collections.OrderedDict"})


def test_prosparse_hooks_in_the_lightning_module(tiny_hf_checkpoint, tmp_path: Path) -> None:
    spec = {
        "_target_": "qsparse.methods.ProSparse",
        "milestones": [10, 20],
        "lambdas": [0.1, 0.3],
        "final": True,
    }
    module = _module(tiny_hf_checkpoint("llama"), method=spec)
    model = module.model
    acts = [layer.mlp.act_fn for layer in model.model.layers]
    assert all(isinstance(a, FATReLU) and a.threshold == 0.0 for a in acts)
    assert qsparse.sparsifiers(model)  # measuring sites, no top-k
    assert all(sp.ratio == 0.0 for sp in qsparse.sparsifiers(model).values())
    assert qsparse.get_settings(model)["method"] == {"name": "prosparse", "threshold": 0.0}
    # step 5 is half-way through the first stage: eta = 1/2, lambda = 0.05
    logged = module._method.on_train_step(model, 5)
    assert logged == {"prosparse/lambda": pytest.approx(0.05)}
    assert all(a.l1_coefficient == pytest.approx(0.05) for a in acts)
    module.on_fit_end()
    assert all(a.threshold == 0.01 and a.l1_coefficient == 0.0 for a in acts)
    back = qsparse.load(qsparse.export(model, tmp_path / "p"))
    assert back.model.layers[0].mlp.act_fn.threshold == 0.01
    assert module.hparams["method"] == spec  # rebuilt by load_from_checkpoint


def test_qsparse_method_trains_as_the_topk_group(tiny_hf_checkpoint) -> None:
    path = tiny_hf_checkpoint("llama")
    spec = {"_target_": "qsparse.methods.QSparse", "sparsity": 0.6}
    model = _module(path, method=spec).model
    assert {sp.ratio for sp in qsparse.sparsifiers(model).values()} == {0.6}
    assert _module(path, sparsity=0.6, method=spec).model is not None  # equal: accepted
    with pytest.raises(MethodConfigError, match="use sparsity=none"):
        _module(path, sparsity=0.5, method=spec)


def test_training_free_method_is_refused_before_anything_is_written(
    tiny_hf_checkpoint, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    for name in ("teal", "cats"):
        cfg = compose_train(
            [
                "recipe=continue/tiny",
                f"model.path={tiny_hf_checkpoint('llama')}",
                f"method={name}",
                f"run_dir={run_dir}",
            ]
        )
        with pytest.raises(UserError, match=f"method={name} is training-free"):
            check_config(cfg)
    cfg = compose_train(
        ["recipe=continue/prosparse_tiny", f"model.path={tiny_hf_checkpoint('llama')}"]
        + ["sparsity=topk", f"run_dir={run_dir}"]
    )
    with pytest.raises(UserError, match="method=prosparse makes the MLP sparse itself"):
        train(cfg)
    assert not run_dir.exists()


def test_prosparse_recipe_logs_lambda_and_exports_fatrelu(
    tiny_hf_checkpoint, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    cfg = compose_train(
        [
            "recipe=continue/prosparse_tiny",
            f"model.path={tiny_hf_checkpoint('llama')}",
            "model.dtype=float32",
            "method.milestones=[2,4]",
            "method.lambdas=[0.2,0.2]",
            "data.max_documents=200",
            "data.seq_len=32",
            "data.batch_size=2",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run_dir={run_dir}",
            *TWO_STEPS,
        ]
    )
    summary = train(cfg)
    assert summary["step"] == 2
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("prosparse/lambda") not in (None, "")]
    # lambda(step) on 0 -> 0.2 over [0, 2]: 0 at step 0, 0.1 at step 1 (eta = 1/2)
    assert [float(r["prosparse/lambda"]) for r in rows] == pytest.approx([0.0, 0.1])
    assert float(rows[1]["prosparse/l1"]) > 0
    exported = json.loads((run_dir / "hf" / "config.json").read_text())
    assert exported["qsparse"]["method"] == {"name": "prosparse", "threshold": 0.01}
    model = qsparse.load(run_dir / "hf")
    assert all(layer.mlp.act_fn.threshold == 0.01 for layer in model.model.layers)
