"""Every recipe in ``qsparse/conf/recipe/`` composes and trains two steps on CPU.

Tiny recipes run as written except for the data size; paper-size and real-checkpoint recipes
keep their settings but get a tiny model (shrunk shapes, or a tiny local HF checkpoint built
with transformers config classes) and CPU trainer overrides. The slow test trains the four
tiny from-scratch recipes in full and checks that validation loss falls well below the
corpus's unigram entropy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose_train
from omegaconf import OmegaConf

import qsparse.training.config  # noqa: F401  (registers the schema and resolver)
from qsparse.nn import SparsityConfig
from qsparse.training.run import train

RECIPE_ROOT = Path(__file__).resolve().parents[1] / "qsparse" / "conf" / "recipe"
RECIPES = sorted(  # _<name>.yaml: keys recipes share (their defaults list it), not a recipe
    str(p.relative_to(RECIPE_ROOT).with_suffix(""))
    for p in RECIPE_ROOT.rglob("*.yaml")
    if not p.name.startswith("_")
)
FROM_SCRATCH_TINY = [r for r in RECIPES if r.startswith("from_scratch/") and r.endswith("_tiny")]
#: recipes whose two-step run repeats a CPU-sized sibling's code path at more cost (the
#: D2DMoE conversion of the SmolLM2 recipe is d2dmoe_tiny's, on a larger router budget)
SLOW_TWINS = {"moe/d2dmoe_smollm2": "moe/d2dmoe_tiny"}

TWO_STEPS = [
    "trainer=cpu",
    "trainer.max_steps=2",
    "trainer.accumulate_grad_batches=1",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.checkpoint.every_n_train_steps=2",
    "compile=false",
    "logger=csv",
]
SHRINK = [  # paper-size shapes -> a tiny model of the same family
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_hidden_layers=2",
    "model.num_attention_heads=2",
    "model.num_key_value_heads=2",
]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qsparse_cache")


def test_recipe_list_is_complete() -> None:
    assert all(twin in RECIPES for twin in SLOW_TWINS.values())  # the fast tier covers each
    for name in ("dense", "qsparse", "bitnet", "bitnet_qsparse"):
        assert f"from_scratch/{name}" in RECIPES
        assert f"from_scratch/{name}_tiny" in RECIPES
    for path in RECIPE_ROOT.rglob("*.yaml"):
        text = path.read_text()
        assert text.startswith("# @package _global_"), path
        assert "qsparse-train recipe=" in text, f"{path}: document the command in the header"


@pytest.mark.parametrize(
    "recipe",
    [pytest.param(r, marks=pytest.mark.slow) if r in SLOW_TWINS else r for r in RECIPES],
)
def test_recipe_composes_and_trains_two_steps(
    recipe: str, tmp_path: Path, data_cache: Path, tiny_hf_checkpoint
) -> None:
    raw = compose_train([f"recipe={recipe}"])
    overrides = [f"recipe={recipe}", *TWO_STEPS, f"run_dir={tmp_path / 'run'}"]
    model_target = raw.model.get("_target_", "")
    if model_target.endswith("hf_model"):
        family = "qwen2" if "qwen" in recipe else "mistral" if "mistral" in recipe else "llama"
        overrides += [f"model.path={tiny_hf_checkpoint(family)}", "model.dtype=float32"]
    elif raw.model.preset != "tiny":
        overrides += SHRINK
    if "8bit" in str(raw.optim.get("_target_", "")):
        overrides += ["optim=adamw"]  # bitsandbytes' 8-bit AdamW needs CUDA
    data = OmegaConf.to_container(raw.data, resolve=False)  # model.path may still be ???
    overrides += [f"data.cache_dir={data_cache}", "data.batch_size=2"]
    if "qsparse.required" in str(data.get("data_files")):  # a recipe for the user's own corpus
        corpus = "wiki_qa" if data["_target_"].endswith("SFTDataModule") else "wiki_en"
        overrides += [f"data.corpus={corpus}", "data.data_files=null"]
    if data.get("streaming"):  # streaming is for corpora too big to cache; 200 docs are not
        overrides += ["data.streaming=false", "data.val_fraction=0.05"]
    if "max_examples" in data:  # instruction data: whole examples need ~300 tokens
        overrides += ["data.max_examples=60", "data.seq_len=256"]
    else:
        overrides += ["data.max_documents=200", "data.seq_len=32"]
    if data.get("tokenizer") is None:
        overrides += ["data.vocab_size=384"]
    probe_dir = tmp_path / "probe"
    overrides += ["+callbacks.probe._target_=train_probe.RankProbe"]
    overrides += [f"+callbacks.probe.out_dir={probe_dir}"]
    cfg = compose_train(overrides)
    summary = train(cfg)
    assert summary["step"] == 2
    assert summary["val_loss"] > 0
    probe = json.loads((probe_dir / "rank0.json").read_text())
    # (norm weights at 1.0 may not move in fp32 under a fine-tuning LR in its first warm-up
    # steps; the projection weights, of order 0.02, must)
    trained = [n for n in probe["initial"] if n.endswith("proj.weight")]
    unchanged = [n for n in trained if probe["final"][n] == probe["initial"][n]]
    assert trained and not unchanged, f"two optimizer steps left {unchanged} unchanged"
    # every site zeroes at least the fraction it ran at (k = int((1 - S) d) kept per token);
    # its ratio is the configured one, or a fraction of it during a sparsity warm-up
    sparsity = SparsityConfig.from_dict(OmegaConf.to_container(cfg.sparsity, resolve=True))
    warmup = (cfg.callbacks or {}).get("sparsity_warmup") is not None
    measured = summary.get("sparsity_per_site", {})
    assert set(measured) == set(probe["ratios"])
    if sparsity.allocation == "greedy":  # the table the module searched at build
        assert set(probe["sites"]) == set(probe["ratios"])
        assert len(set(probe["sites"].values())) > 1  # per-site ratios, not one S everywhere
        sparsity = SparsityConfig.from_dict({**sparsity.to_dict(), "sites": probe["sites"]})
    for site, (ratio, target) in probe["ratios"].items():
        kind = site.rsplit(".", 1)[-1].removesuffix("_proj")
        assert target == pytest.approx(sparsity.ratio_for(kind, site)), site
        assert ratio <= target + 1e-9 and (warmup or ratio == target), site
        assert measured[site] >= ratio - 1e-6, (site, measured[site], ratio)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "run" / "loss_curve.png").exists()
    if cfg.export:
        assert (tmp_path / "run" / "hf" / "config.json").exists()
        if recipe.startswith("from_scratch/"):  # plain transformers loads the export
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf")
            assert hf.config.num_hidden_layers == cfg.model.num_hidden_layers
    if cfg.sparsity.pattern != "none" and cfg.sparsity.ratio > 0:
        assert summary["sparsity_overall"] > 0


@pytest.mark.slow
def test_tiny_from_scratch_recipes_beat_unigram_entropy(tmp_path: Path) -> None:
    """All four tiny recipes, as written (400 steps on the full wiki corpus)."""
    results = {}
    for recipe in FROM_SCRATCH_TINY:
        name = recipe.split("/")[1]
        cfg = compose_train(
            [
                f"recipe={recipe}",
                f"run_dir={tmp_path / name}",
                "logger=csv",
                "trainer.enable_progress_bar=false",
            ]
        )
        results[name] = train(cfg)
    print(json.dumps({k: {m: v.get(m) for m in ("val_loss", "unigram_entropy", "sparsity_overall", "params_activated", "train_time_s")} for k, v in results.items()}, indent=1))  # fmt: skip
    assert len(results) == 4
    for name, s in results.items():
        assert s["val_loss"] < s["unigram_entropy"] - 1.0, (name, s["val_loss"])


@pytest.mark.parametrize("recipe", ["continue/mistral7b", "finetune/mistral7b", "finetune/qwen7b"])
def test_paper_recipes_demand_local_data_files(recipe):
    """A recipe that needs the user's own data fails at validation, naming the key, instead of
    silently falling back to the bundled corpus."""
    from qsparse.training.config import validate_config

    cfg = compose_train([f"recipe={recipe}", "model.path=/models/x"])
    with pytest.raises(Exception, match=r"data\.data_files is required"):
        validate_config(cfg)
    cfg = compose_train(
        [f"recipe={recipe}", "model.path=/models/x", "data.data_files=/data/a.parquet"]
    )
    assert cfg.data.data_files == "/data/a.parquet" and cfg.data.corpus is None


def test_missing_checkpoint_path_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    from qsparse.training.config import ConfigError

    cfg = compose_train(["recipe=continue/tiny", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"model\.path is required"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_recovery_mixture_and_calibration_follow_the_sources() -> None:
    """The recovery recipe trains on seven corpora and calibrates its per-site allocation on
    exactly those; dropping the unlicensed news corpus (``~data.sources.news_en``, as
    docs/corpora.md says) drops it from both, and never touches the held-out texts."""
    seven = {"wiki_en", "factbook", "recipes", "kjv", "fortunes", "news_en", "shakespeare"}
    cfg = compose_train(["recipe=continue/recovery_smollm2"])
    assert set(cfg.data.sources) == seven
    assert set(cfg.sparsity.calibration) == seven
    held_out = {"convention_speeches", "python_docs", *cfg.data.ood_val}
    assert not held_out & seven
    cfg = compose_train(["recipe=continue/recovery_smollm2", "~data.sources.news_en"])
    assert set(cfg.data.sources) == set(cfg.sparsity.calibration) == seven - {"news_en"}
    # the packaged technical-prose corpus (measured: no held-out gain at S=0.5) is one override
    cfg = compose_train(["recipe=continue/recovery_smollm2", "+data.sources.aws_docs=0.15"])
    assert cfg.data.sources.aws_docs == 0.15
    assert set(cfg.sparsity.calibration) == seven | {"aws_docs"}
    assert not held_out & set(cfg.data.sources)


def test_recovery_recipe_trains_on_the_lm_loss_and_distills_on_request() -> None:
    """The recipe ships the LM loss alone (docs/recovery.md: the KL term measured no better
    with greedy ratios); ``distill=lm_logits`` turns on CE + KL to the frozen dense copy."""
    cfg = compose_train(["recipe=continue/recovery_smollm2"])
    assert cfg.distill.mode == "none" and cfg.distill.kl_weight == 0.0
    assert cfg.sparsity.allocation == "greedy" and cfg.optim.lr == 5.0e-5
    cfg = compose_train(["recipe=continue/recovery_smollm2", "distill=lm_logits"])
    assert cfg.distill.mode == "logits"
    assert (cfg.distill.lm_weight, cfg.distill.kl_weight) == (1.0, 1.0)


def test_dense_control_of_a_warmup_recipe_is_refused_before_anything_is_written(
    tiny_hf_checkpoint, tmp_path: Path
) -> None:
    """sparsity=none on a recipe with a sparsity warm-up: a one-line config error naming the
    callback and the fix, before the run directory exists; with the fix it validates."""
    from qsparse.training.config import validate_config

    run_dir = tmp_path / "dense"
    warmup = [
        "+callbacks.sparsity_warmup._target_=qsparse.training.sparsity_warmup.SparsityWarmup",
        "+callbacks.sparsity_warmup.steps=5",
    ]
    overrides = [
        "recipe=continue/recovery_tiny",
        f"model.path={tiny_hf_checkpoint('llama')}",
        "sparsity=none",
        f"run_dir={run_dir}",
    ]
    with pytest.raises(ValueError, match=r"~callbacks\.sparsity_warmup") as err:
        train(compose_train([*overrides, *warmup]))
    assert "\n" not in str(err.value) and not run_dir.exists()
    validate_config(compose_train(overrides))
    # the GPU recipe ships the callback: its dense control drops it the same way
    validate_config(
        compose_train(
            [
                "recipe=continue/recovery_smollm2",
                "model.path=/models/smollm2",
                "sparsity=none",
                "sparsity.allocation=uniform",
                "~callbacks.sparsity_warmup",
            ]
        )
    )
