"""Per-site sparsity allocation for continued training (sparsity.allocation=greedy,
qsparse/methods/allocation.py): the budget, the table reaching the layers and the export,
the config checks and the recipe."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_hf_model, build_tiny_tokenizer, tiny_run_config

import qsparse
from qsparse.errors import UserError
from qsparse.methods.allocation import corpus_batches, layer_sites, topk_site_ratios
from qsparse.nn import SparsityConfig
from qsparse.nn.sites import sparsifiers
from qsparse.stats import activated_parameters
from qsparse.training.run import check_config, train


@pytest.fixture(scope="module")
def batches() -> list[torch.Tensor]:
    return corpus_batches(build_tiny_tokenizer(), ["wiki_en", "kjv"], 512, seq_len=64)


def test_greedy_topk_keeps_the_activated_parameter_budget(batches) -> None:
    assert [tuple(b.shape) for b in batches] == [(8, 64)]  # 4 windows of each corpus, stacked
    model = build_tiny_hf_model("llama")
    qsparse.sparsify(model, SparsityConfig(ratio=0.5))
    uniform = activated_parameters(model, measured=False)
    table = topk_site_ratios(model, batches, 0.5, step=0.25)
    assert all(sp.ratio == 0.5 for sp in sparsifiers(model).values())  # left as it was
    assert set(table) == set(sparsifiers(model))
    for _, sites, weights, prefix in layer_sites(model):
        names = {k: n for n, sp in sparsifiers(model).items() for k, s in sites.items() if s is sp}
        s = {k: table[names[k]] for k in sites}
        # every layer: weight-averaged S = 0.5 (so the model's budget is uniform S's)
        assert sum(s[k] * weights[k] for k in s) / sum(weights.values()) == pytest.approx(0.5)
        assert len(set(s.values())) > 1, prefix
    qsparse.sparsify(model, SparsityConfig(ratio=0.5, sites=table))
    allocated = activated_parameters(model, measured=False)
    # k = floor((1 - s) d) per site: at most one input column per site below the budget
    assert uniform - 8 * 128 <= allocated <= uniform


def test_site_table_reaches_every_layer_and_the_export(batches, tmp_path: Path) -> None:
    model = build_tiny_hf_model("llama")
    table = {"layers.0.mlp.gate_up": 0.75, "layers.1.self_attn.o_proj": 0.125}
    qsparse.sparsify(model, SparsityConfig(ratio=0.5, sites=table))
    named = sparsifiers(model)
    for name, sp in named.items():
        want = table.get(name, 0.5)
        assert sp.ratio == sp.target_ratio == want, name
        assert sp.keep() == int((1 - want) * sp.dim)
    measured = qsparse.measure(model, *[b[:1] for b in batches])
    assert measured["layers.0.mlp.gate_up"] == pytest.approx(0.75, abs=1e-6)
    assert measured["layers.1.self_attn.o_proj"] == pytest.approx(0.125, abs=1e-6)
    assert measured["layers.0.self_attn.o_proj"] == pytest.approx(0.5, abs=1e-6)
    # the warm-up ramps every site toward its own target
    qsparse.set_sparsity_ratio(model, fraction=0.5)
    assert named["layers.0.mlp.gate_up"].ratio == pytest.approx(0.375)
    qsparse.set_sparsity_ratio(model, fraction=1.0)
    qsparse.export(model, tmp_path / "out", tokenizer=build_tiny_tokenizer())
    loaded = qsparse.load(tmp_path / "out")
    assert {n: sp.ratio for n, sp in sparsifiers(loaded).items()} == {
        n: sp.ratio for n, sp in named.items()
    }


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"allocation": "best"}, "sparsity.allocation='best' is not supported"),
        ({"allocation": "greedy", "pattern": "block_topk"}, "needs sparsity.pattern=token_topk"),
        ({"allocation": "greedy", "qkv": 0.3}, "drop sparsity.qkv"),
        ({"allocation": "greedy", "calibration": []}, "needs sparsity.calibration"),
        ({"calibration": "wiki_en"}, "must be a list of corpus names"),
        ({"calibration_tokens": 10}, "calibration_tokens=10 must be an integer >= 64"),
        ({"allocation_step": 0.0}, r"allocation_step=0.0 must be in \(0, 1\]"),
        ({"sites": {"layers.0.mlp.gate_up": 1.0}}, r"sites.layers.0.mlp.gate_up=1.0 is outside"),
        ({"allocation": "cross_layer", "down": 0.3}, "allocation=cross_layer computes"),
        ({"allocation": "cross_layer", "layer_cap": 0.4}, "layer_cap=0.4 is below sparsity"),
        ({"layer_cap": 1.0}, r"sparsity.layer_cap=1.0 must be in \(0, 1\)"),
    ],
)
def test_bad_allocation_settings_raise(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        SparsityConfig(ratio=0.5, **kwargs)


def _recipe(ckpt: Path, tmp_path: Path, *extra: str):
    return tiny_run_config(
        "continue/recovery_tiny", ckpt, tmp_path, "data.max_documents=200", *extra
    )


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("sparsity.calibration=[no_such_corpus]", "sparsity.calibration: 'no_such_corpus'"),
        ("++sparsity.sites={layers.9.mlp.gate_up:0.5}", "'layers.9.mlp.gate_up', not a site"),
        ("sparsity.allocation=greedy_please", "sparsity.allocation='greedy_please'"),
        ("sparsity.allocation=cross_layer sparsity.layer_cap=0.3", "sparsity.layer_cap=0.3 is"),
    ],
)
def test_bad_settings_fail_before_the_run_dir_is_written(
    tiny_hf_checkpoint, tmp_path: Path, override: str, match: str
) -> None:
    ckpt = tiny_hf_checkpoint("llama", max_position_embeddings=256)
    cfg = _recipe(ckpt, tmp_path, "sparsity.allocation=greedy", *override.split())
    with pytest.raises(UserError, match=match) as err:
        train(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_recipe_composes_with_the_training_corpora_as_calibration(tiny_hf_checkpoint, tmp_path):
    ckpt = tiny_hf_checkpoint("llama", max_position_embeddings=256)
    container = check_config(_recipe(ckpt, tmp_path, "+data.sources.kjv=0.5"))
    assert container["sparsity"]["allocation"] == "uniform"
    assert container["sparsity"]["calibration"] == ["wiki_en", "kjv"]


@pytest.mark.parametrize("allocation", ["greedy", "cross_layer"])
def test_recipe_trains_at_the_allocated_ratios(
    tiny_hf_checkpoint, tmp_path: Path, allocation: str
) -> None:
    """Two steps of recipe=continue/recovery_tiny with sparsity.allocation=greedy or
    cross_layer: the table is calibrated before the first step, trained at, checkpointed and
    exported, at uniform S's activated parameters."""
    ckpt = tiny_hf_checkpoint("llama", max_position_embeddings=256)
    cfg = _recipe(
        ckpt,
        tmp_path,
        f"sparsity.allocation={allocation}",
        "sparsity.ratio=0.5",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
    )
    summary = train(cfg)
    assert summary["step"] == 2
    config = json.loads((Path(summary["export_dir"]) / "config.json").read_text())
    assert config["qsparse"]["sparsity"]["allocation"] == allocation
    table = config["qsparse"]["sparsity"]["sites"]
    assert len(table) == 8 and len(set(table.values())) > 1
    loaded = qsparse.load(summary["export_dir"])
    assert {n: sp.ratio for n, sp in sparsifiers(loaded).items()} == pytest.approx(table)
    dense = build_tiny_hf_model("llama")
    qsparse.sparsify(dense, SparsityConfig(ratio=0.5))
    budget = activated_parameters(dense, measured=False)
    assert budget - 8 * 128 <= activated_parameters(loaded, measured=False) <= budget
    ckpt_hp = torch.load(summary["selected_checkpoint"], weights_only=False)["hyper_parameters"]
    assert ckpt_hp["sparsity"]["sites"] == pytest.approx(table)


def _cached_tiny(tiny_hf_checkpoint, tmp_path: Path, monkeypatch):
    """A tiny checkpoint folder and its model top-k'ed at S=0.5, the cache under tmp_path."""
    monkeypatch.setenv("QSPARSE_CACHE", str(tmp_path / "cache"))
    ckpt = tiny_hf_checkpoint("llama", max_position_embeddings=256)
    model = qsparse.load(ckpt)
    qsparse.sparsify(model, SparsityConfig(ratio=0.5))
    return ckpt, model


def test_allocation_is_cached_per_checkpoint_and_settings(
    tiny_hf_checkpoint, tmp_path: Path, monkeypatch
) -> None:
    from qsparse.methods import site_table as allocation

    ckpt, model = _cached_tiny(tiny_hf_checkpoint, tmp_path, monkeypatch)
    settings = SparsityConfig(
        ratio=0.5, allocation="greedy", calibration_tokens=512, allocation_step=0.5
    )
    first = allocation.allocate(model, settings, str(ckpt), checkpoint=str(ckpt))
    assert len(list((tmp_path / "cache" / "allocation").glob("*.json"))) == 1

    def no_search(*args, **kwargs):
        raise AssertionError("searched again")

    monkeypatch.setattr(allocation, "topk_site_ratios", no_search)
    again = allocation.allocate(model, settings, str(ckpt), checkpoint=str(ckpt))
    assert again.sites == first.sites
    with pytest.raises(AssertionError, match="searched again"):  # another S: another entry
        allocation.allocate(model, replace(settings, ratio=0.4), str(ckpt), checkpoint=str(ckpt))
    with pytest.raises(AssertionError, match="searched again"):  # no checkpoint: no cache
        allocation.allocate(model, settings, str(ckpt))


def test_cache_keys_differ_from_greedy_and_curves_are_shared(
    tiny_hf_checkpoint, tmp_path: Path, monkeypatch
) -> None:
    from qsparse.methods import layer_allocation
    from qsparse.methods import site_table as allocation

    ckpt, model = _cached_tiny(tiny_hf_checkpoint, tmp_path, monkeypatch)
    settings = SparsityConfig(
        ratio=0.5,
        allocation="cross_layer",
        calibration_tokens=256,
        allocation_step=0.5,
        layer_cap=0.7,
    )
    greedy = replace(settings, allocation="greedy")
    key = allocation._cache_path
    assert key(model, settings, str(ckpt)) != key(model, greedy, str(ckpt))
    assert key(model, settings, str(ckpt)) != key(
        model, replace(settings, layer_cap=0.8), str(ckpt)
    )
    curves = key(model, settings, str(ckpt), curves=True)
    assert curves == key(model, replace(settings, ratio=0.4), str(ckpt), curves=True)
    assert curves != key(model, settings, str(ckpt))
    first = allocation.allocate(model, settings, str(ckpt), checkpoint=str(ckpt))
    assert curves.is_file() and key(model, settings, str(ckpt)).is_file()

    def no_search(*args, **kwargs):
        raise AssertionError("searched again")

    monkeypatch.setattr(layer_allocation, "layer_curves", no_search)
    assert (
        allocation.allocate(model, settings, str(ckpt), checkpoint=str(ckpt)).sites == first.sites
    )
    other = allocation.allocate(
        model, replace(settings, ratio=0.4), str(ckpt), checkpoint=str(ckpt)
    )
    assert other.sites != first.sites  # another S from the same cached curves, no search
