"""HF interop: sparsify() on tiny Llama/Mistral/Qwen2, export -> from_pretrained -> qsparse.load
round trips (bit-exact), and checkpoint validation errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import HF_FAMILIES, TINY_VOCAB
from transformers import AutoModelForCausalLM, AutoTokenizer

import qsparse
from qsparse.models import LlamaConfig, LlamaForCausalLM
from qsparse.models.export import export
from qsparse.models.hf import (
    EXTRA_WEIGHTS_NAME,
    CheckpointError,
    check_hf_checkpoint,
    load,
    load_hf_model,
)
from qsparse.nn import QSparseLinear, QuantConfig, SparsityConfig


def _ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, TINY_VOCAB, (batch, length), generator=g)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_sparsify_dense_setting_keeps_logits(family, tiny_hf_checkpoint) -> None:
    path = tiny_hf_checkpoint(family)
    ref_model = load_hf_model(path)
    model = load_hf_model(path)
    ids = _ids()
    ref = _logits(ref_model, ids)
    report = qsparse.sparsify(model, sparsity=0.0)
    assert len(report.converted) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert isinstance(model.model.layers[0].self_attn.q_proj, QSparseLinear)
    torch.testing.assert_close(_logits(model, ids), ref, atol=1e-5, rtol=0)


# each case: (sparsity, quant, activation)
ROUND_TRIPS = [
    (SparsityConfig(ratio=0.5), None, "keep"),
    (SparsityConfig(ratio=0.5), QuantConfig(weights="ternary", act_bits=8, subln=True), "relu2"),
]


@pytest.mark.parametrize("family", HF_FAMILIES)
@pytest.mark.parametrize("case", range(len(ROUND_TRIPS)))
def test_export_from_pretrained_and_load_round_trip(family, case, tiny_hf_checkpoint, tmp_path):
    sparsity, quant, activation = ROUND_TRIPS[case]
    src = tiny_hf_checkpoint(family)
    model = load_hf_model(src)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    qsparse.sparsify(model, sparsity=sparsity, quant=quant, activation=activation)
    subln = quant is not None and quant.subln
    if subln:  # SubLN weights start at 1: make them distinct so losing them would show
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".norm." in name and ("qsparse_input" in name or ".act." in name):
                    p.uniform_(0.5, 1.5)
    ids = _ids()
    expected = _logits(model, ids)
    # the sparse model differs from the dense one
    assert not torch.allclose(expected, _logits(load_hf_model(src), ids), atol=1e-3)

    out = export(model, tmp_path / "export", tokenizer=AutoTokenizer.from_pretrained(src))
    config = json.loads((out / "config.json").read_text())
    entry = config["qsparse"]
    assert entry["sparsity"] == sparsity.to_dict()
    assert entry["quant"] == (quant or QuantConfig()).to_dict()
    assert entry["model_class"] == "transformers"
    assert (entry["extra_weights"] == EXTRA_WEIGHTS_NAME) == subln
    assert (out / EXTRA_WEIGHTS_NAME).is_file() == subln
    check_hf_checkpoint(out, require_tokenizer=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]  # temp dirs gone

    # plain transformers loads the dense weights unchanged (parameter names kept)
    plain = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert type(plain).__name__ == type(model).__name__
    plain_state = plain.state_dict()
    for key, value in dense_state.items():
        assert torch.equal(plain_state[key], value), key

    restored = load(out)
    assert type(restored).__name__ == type(model).__name__
    assert torch.equal(_logits(restored, ids), expected)
    if subln:
        extra_a = {k: v for k, v in model.state_dict().items() if k not in dense_state}
        extra_b = restored.state_dict()
        assert extra_a and all(torch.equal(extra_b[k], v) for k, v in extra_a.items())


def test_own_model_export_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig.from_preset("tiny", vocab_size=TINY_VOCAB)
    model = LlamaForCausalLM(cfg).eval()
    ids = _ids()
    dense = _logits(model, ids)

    # dense export: transformers' LlamaForCausalLM reproduces our logits
    hf_path = export(model, tmp_path / "dense")
    hf_model = AutoModelForCausalLM.from_pretrained(hf_path, local_files_only=True)
    torch.testing.assert_close(_logits(hf_model, ids), dense, atol=1e-5, rtol=0)
    assert hf_model.config.tie_word_embeddings
    again = load(hf_path)
    assert isinstance(again, LlamaForCausalLM) and torch.equal(_logits(again, ids), dense)
    assert again.lm_head.weight is again.model.embed_tokens.weight

    qsparse.sparsify(model, sparsity=0.6, quant=QuantConfig(act_bits=8, subln=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "qsparse_input.norm" in name:
                p.uniform_(0.5, 1.5)
    expected = _logits(model, ids)
    # a torch.compile wrapper (not run) must not leak "_orig_mod." into the export
    wrapped = torch.compile(model)
    assert any("_orig_mod." in k for k in wrapped.state_dict())
    out = export(wrapped, tmp_path / "sparse")
    restored = load(out)
    assert isinstance(restored, LlamaForCausalLM)
    assert torch.equal(_logits(restored, ids), expected)
    as_hf = load(out, model_class="transformers")
    assert type(as_hf).__name__ == "LlamaForCausalLM" and not isinstance(as_hf, LlamaForCausalLM)
    assert torch.equal(_logits(as_hf, ids), expected)


def test_nested_compiled_module_keys_are_stripped(tmp_path) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_preset("tiny", tie_word_embeddings=False)).eval()
    ids = torch.randint(0, 256, (1, 8))
    expected = _logits(model, ids)
    model.model.layers[0] = torch.compile(model.model.layers[0])
    assert any("layers.0._orig_mod." in k for k in model.state_dict())
    out = export(model, tmp_path / "ckpt")
    restored = load(out)
    torch.testing.assert_close(_logits(restored, ids), expected, atol=0, rtol=0)


def test_tied_hf_llama_round_trip(tiny_hf_checkpoint, tmp_path) -> None:
    src = tiny_hf_checkpoint("llama", tie_word_embeddings=True)
    model = load_hf_model(src)
    qsparse.sparsify(model, sparsity=SparsityConfig(ratio=0.5, pattern="block_topk", block_size=16))
    ids = _ids()
    expected = _logits(model, ids)
    restored = load(export(model, tmp_path / "tied"))
    assert restored.lm_head.weight.data_ptr() == restored.model.embed_tokens.weight.data_ptr()
    assert torch.equal(_logits(restored, ids), expected)


def test_export_overwrites_checkpoint_but_not_other_folders(tiny_hf_checkpoint, tmp_path) -> None:
    model = load_hf_model(tiny_hf_checkpoint("llama"))
    target = tmp_path / "out"
    export(model, target)
    (target / "stale.txt").write_text("from an older export")
    export(model, target)
    assert not (target / "stale.txt").exists() and (target / "config.json").is_file()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        export(model, precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="export supports"):
        export(torch.nn.Linear(2, 2), tmp_path / "x")


def test_check_hf_checkpoint_errors(tiny_hf_checkpoint, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        check_hf_checkpoint(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        check_hf_checkpoint(empty)

    good = tiny_hf_checkpoint("qwen2")
    assert check_hf_checkpoint(good, require_tokenizer=True)["model_type"] == "qwen2"

    def variant(name: str, edit=None, drop: tuple[str, ...] = ()):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        for f in drop:
            (folder / f).unlink()
        if edit is not None:
            cfg = json.loads((folder / "config.json").read_text())
            edit(cfg)
            (folder / "config.json").write_text(json.dumps(cfg))
        return folder

    bad_type = variant("gpt2", edit=lambda c: c.update(model_type="gpt2"))
    with pytest.raises(CheckpointError, match="model_type='gpt2'.*llama, mistral, qwen2"):
        check_hf_checkpoint(bad_type)
    bad_arch = variant(
        "arch", edit=lambda c: c.update(architectures=["Qwen2ForSequenceClassification"])
    )
    with pytest.raises(CheckpointError, match="architectures.*Qwen2ForCausalLM"):
        check_hf_checkpoint(bad_arch)
    no_weights = variant("noweights", drop=("model.safetensors",))
    with pytest.raises(CheckpointError, match="no weights"):
        check_hf_checkpoint(no_weights)
    no_tok = variant("notok", drop=("tokenizer.json",))
    check_hf_checkpoint(no_tok)  # fine when no tokenizer is needed
    with pytest.raises(CheckpointError, match="no tokenizer"):
        check_hf_checkpoint(no_tok, require_tokenizer=True)
    no_extra = variant(
        "noextra", edit=lambda c: c.update(qsparse={"extra_weights": EXTRA_WEIGHTS_NAME})
    )
    with pytest.raises(CheckpointError, match="extra weights"):
        check_hf_checkpoint(no_extra)
    with pytest.raises(CheckpointError, match="model_type='gpt2'"):
        load(bad_type)


def test_sharded_checkpoint_missing_shard(tmp_path) -> None:
    from conftest import build_tiny_hf_model

    sharded = tmp_path / "sharded"
    build_tiny_hf_model("mistral").save_pretrained(sharded, max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    reloaded = load(sharded)  # a complete sharded folder loads
    assert type(reloaded).__name__ == "MistralForCausalLM"
    (sharded / shards[-1]).unlink()
    with pytest.raises(CheckpointError, match=f"missing: \\['{shards[-1]}'\\]"):
        check_hf_checkpoint(sharded)


def test_load_bad_model_class(tiny_hf_checkpoint) -> None:
    path = tiny_hf_checkpoint("qwen2", tokenizer=False)
    with pytest.raises(ValueError, match="model_class"):
        load(path, model_class="jax")
    with pytest.raises(ValueError, match="needs a llama checkpoint"):
        load(path, model_class="qsparse")


def test_bf16_export_and_lightning_style_wrapper(tmp_path) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_preset("tiny")).to(torch.bfloat16).eval()
    qsparse.sparsify(model, sparsity=0.5)

    class Wrapper(torch.nn.Module):  # what a LightningModule looks like to export()
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.model = inner

    ids = torch.randint(0, 256, (2, 10))
    expected = _logits(model, ids)
    out = export(Wrapper(torch.compile(model)), tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    restored = load(out)
    assert restored.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(_logits(restored, ids), expected)
    assert load(out, dtype=torch.float32).lm_head.weight.dtype == torch.float32


def test_sparsified_own_model_generation_cache_equals_no_cache() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_preset("tiny")).eval()
    prompt = torch.randint(0, 256, (2, 6))
    dense = model.generate(prompt, 10)
    qsparse.sparsify(model, sparsity=0.7, quant=QuantConfig(act_bits=8))
    cached = model.generate(prompt, 10)
    assert torch.equal(cached, model.generate(prompt, 10, use_cache=False))
    # the sparsifier hooks are active on our attention/MLP calling convention
    sparse_logits = _logits(model, prompt)
    qsparse.set_sparsity_ratio(model, 0.0)
    assert not torch.equal(sparse_logits, _logits(model, prompt))
    assert dense.shape == cached.shape
