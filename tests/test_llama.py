"""qsparse.models.llama: HF parity, loss, KV-cache generation, presets and config validation."""

from __future__ import annotations

import pytest
import torch
import transformers

from qsparse.models import LlamaConfig, LlamaForCausalLM
from qsparse.models.hf_config import from_hf_config, to_hf_config
from qsparse.models.kv_cache import KVCache


def _pair(**overrides) -> tuple[LlamaForCausalLM, transformers.LlamaForCausalLM, LlamaConfig]:
    """Our model holding the weights of a freshly initialised HF model of the same config."""
    cfg = LlamaConfig.from_preset("tiny", **overrides)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(to_hf_config(cfg)).eval()
    ours = LlamaForCausalLM(cfg).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours, hf, cfg


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # GQA 4 heads / 2 kv heads, tied, relu2
        dict(tie_word_embeddings=False, hidden_act="silu"),
        dict(num_key_value_heads=4, tie_word_embeddings=False),  # plain MHA
        dict(num_key_value_heads=1, rope_theta=500000.0, rms_norm_eps=1e-5),  # MQA
    ],
)
def test_hf_state_dict_loads_strictly_and_logits_match(overrides) -> None:
    ours, hf, cfg = _pair(**overrides)
    assert set(ours.state_dict()) == set(hf.state_dict())
    if cfg.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    else:
        assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    torch.manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (3, 21))
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        ref = hf(ids, labels=labels)
        out = ours(ids, labels=labels)
    assert out.logits.shape == (3, 21, cfg.vocab_size)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=0)


def test_loss_is_shifted_mean_cross_entropy() -> None:
    ours, _, cfg = _pair()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    labels = ids.clone()
    labels[1, 3:] = -100
    out = ours(ids, labels=labels)
    logp = torch.log_softmax(out.logits.double(), -1)
    terms = []
    for b in range(2):
        for t in range(8):
            y = int(labels[b, t + 1])
            if y != -100:
                terms.append(-logp[b, t, y])
    expected = torch.stack(terms).mean()
    assert abs(out.loss.item() - expected.item()) < 1e-5


def test_right_padding_matches_hf_on_real_tokens() -> None:
    ours, hf, cfg = _pair()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        out = ours(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, :7], ref[1, :7], atol=1e-5, rtol=0)
    assert torch.isfinite(out).all()
    # padding must not change the real tokens' outputs
    with torch.no_grad():
        alone = ours(ids[1:, :7]).logits
    torch.testing.assert_close(out[1:, :7], alone, atol=1e-5, rtol=0)


def test_gradients_flow_to_every_parameter() -> None:
    ours, _, cfg = _pair(tie_word_embeddings=False)
    ours.train()
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    ours(ids, labels=ids).loss.backward()
    for name, p in ours.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_kv_cache_logits_equal_full_forward() -> None:
    ours, _, cfg = _pair()
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        full = ours(ids).logits
        cache = KVCache(cfg, 2, 10, ids.device, torch.float32)
        first = ours(ids[:, :6], kv_cache=cache).logits  # prefill 6
        mid = ours(ids[:, 6:8], kv_cache=cache).logits  # 2 at once with past (explicit mask)
        last = [ours(ids[:, t : t + 1], kv_cache=cache).logits for t in (8, 9)]
    stepped = torch.cat([first, mid, *last], dim=1)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=0)
    assert cache.length == 10
    with pytest.raises(ValueError, match="KVCache overflow"):
        ours(ids[:, :1], kv_cache=cache)


def test_greedy_generation_cache_equals_no_cache_and_hf() -> None:
    ours, hf, cfg = _pair()
    prompt = torch.randint(0, cfg.vocab_size, (2, 5))
    with_cache = ours.generate(prompt, max_new_tokens=12)
    without = ours.generate(prompt, max_new_tokens=12, use_cache=False)
    assert with_cache.shape == (2, 17)
    assert torch.equal(with_cache[:, :5], prompt)
    assert torch.equal(with_cache, without)
    ref = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert torch.equal(with_cache, ref)


def test_generation_eos_sampling_and_mode_restore() -> None:
    ours, _, cfg = _pair()
    ours.train()
    prompt = torch.randint(0, cfg.vocab_size, (1, 4))
    greedy = ours.generate(prompt, max_new_tokens=6)
    eos = int(greedy[0, 5])  # the second generated token: generation must stop right there
    stopped = ours.generate(prompt, max_new_tokens=6, eos_token_id=eos)
    first_eos = int((greedy[0, 4:] == eos).nonzero()[0])
    assert torch.equal(stopped, greedy[:, : 4 + first_eos + 1])
    assert ours.training  # mode restored
    gen = torch.Generator().manual_seed(0)
    s1 = ours.generate(prompt, 8, temperature=1.0, top_k=1, generator=gen)
    assert torch.equal(s1, ours.generate(prompt, 8))  # top_k=1 sampling is greedy
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = ours.generate(prompt, 8, temperature=0.8, top_k=20, generator=gen_a)
    b = ours.generate(prompt, 8, temperature=0.8, top_k=20, generator=gen_b)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ours.generate(prompt, -1)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours.generate(prompt, cfg.max_position_embeddings)
    with pytest.raises(ValueError, match="top_k"):
        ours.generate(prompt, 2, temperature=1.0, top_k=0)


# nominal size -> (count to compare, tolerance): the paper's shapes are named by their
# non-embedding parameters; "374M" by its total (tied 32000-token embedding included)
@pytest.mark.parametrize(
    "name,nominal,exclude_embeddings,rel",
    [
        ("374M", 374e6, False, 0.005),
        ("300M", 300e6, True, 0.05),
        ("700M", 700e6, True, 0.05),
        ("1.3B", 1.3e9, True, 0.10),
        ("7B", 7e9, False, 0.05),
    ],
)
def test_preset_parameter_counts(name, nominal, exclude_embeddings, rel) -> None:
    cfg = LlamaConfig.from_preset(name)
    n = cfg.num_parameters(exclude_embeddings=exclude_embeddings)
    assert abs(n - nominal) / nominal < rel, (name, n)


@pytest.mark.parametrize("name", ["tiny", "debug"])
def test_config_count_matches_instantiated_model(name) -> None:
    for tie in (True, False):
        cfg = LlamaConfig.from_preset(name, tie_word_embeddings=tie)
        model = LlamaForCausalLM(cfg)
        assert model.num_parameters() == cfg.num_parameters()
        assert model.num_parameters(exclude_embeddings=True) == cfg.num_parameters(True)
        hf_count = sum(
            p.numel() for p in transformers.LlamaForCausalLM(to_hf_config(cfg)).parameters()
        )
        assert hf_count == cfg.num_parameters()


def test_flops_per_token_palm_formula() -> None:
    cfg = LlamaConfig.from_preset("374M")
    n = cfg.num_parameters(exclude_embeddings=True) + cfg.vocab_size * cfg.hidden_size
    assert cfg.flops_per_token(1024) == 6 * n + 12 * 6 * 2048 * 1024
    assert cfg.flops_per_token() == cfg.flops_per_token(cfg.max_position_embeddings)
    with pytest.raises(ValueError, match="seq_len"):
        cfg.flops_per_token(0)


def test_flops_formula_matches_lightning_measure_flops() -> None:
    """The analytic count (qsparse.models.flops) agrees with Lightning's measure_flops, which
    runs forward and backward under PyTorch's FlopCounterMode (on the meta device)."""
    from lightning.fabric.utilities.throughput import measure_flops

    cfg = LlamaConfig.from_preset("tiny")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
        ids = torch.zeros(2, 64, dtype=torch.long)
    measured = measure_flops(model, lambda: model(ids, labels=ids).loss, lambda loss: loss)
    assert measured / ids.numel() == pytest.approx(cfg.flops_per_token(64), rel=0.005)


def test_rope_equals_transformers() -> None:
    """The project's one RoPE (qsparse.models.rope) gives transformers' Llama tables and
    rotation, bit for bit in fp32, at positions past the training length too."""
    from transformers.models.llama import modeling_llama as hf

    from qsparse.models.rope import RotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig.from_preset("tiny", rope_theta=5e5)
    ours = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
    theirs = hf.LlamaRotaryEmbedding(to_hf_config(cfg))
    pos = torch.tensor([[0, 1, 7, 255, 4000]])
    cos, sin = ours(pos, torch.float32)
    q = torch.randn(1, cfg.num_attention_heads, 5, cfg.head_dim)
    k = torch.randn(1, cfg.num_key_value_heads, 5, cfg.head_dim)
    hcos, hsin = theirs(q, pos)
    assert torch.equal(cos, hcos) and torch.equal(sin, hsin)
    for a, b in zip(
        apply_rotary_pos_emb(q, k, cos, sin),
        hf.apply_rotary_pos_emb(q, k, hcos, hsin),
        strict=True,
    ):
        assert torch.equal(a, b)


def test_hf_config_round_trip() -> None:
    cfg = LlamaConfig.from_preset("tiny", rope_theta=1e6, hidden_act="silu")
    hf_cfg = to_hf_config(cfg)
    assert hf_cfg.rope_parameters["rope_theta"] == 1e6
    assert from_hf_config(hf_cfg) == cfg
    qwen = transformers.Qwen2Config(hidden_size=64, num_attention_heads=4, num_hidden_layers=1)
    with pytest.raises(ValueError, match="model_type"):
        from_hf_config(qwen)
    biased = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_hidden_layers=1, attention_bias=True
    )
    with pytest.raises(ValueError, match="attention_bias"):
        from_hf_config(biased)


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(num_attention_heads=5), "hidden_size"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(num_hidden_layers=2.5), "num_hidden_layers"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(hidden_size=60, num_attention_heads=20, num_key_value_heads=20), "even"),
    ],
)
def test_config_validation_names_the_field(overrides, field) -> None:
    with pytest.raises(ValueError, match=field):
        LlamaConfig.from_preset("tiny", **overrides)


def test_preset_errors() -> None:
    with pytest.raises(ValueError, match="preset"):
        LlamaConfig.from_preset("13B")
    with pytest.raises(ValueError, match="hidden_dim"):
        LlamaConfig.from_preset("tiny", hidden_dim=32)


def test_init_statistics_and_reset() -> None:
    cfg = LlamaConfig.from_preset("debug", initializer_range=0.02)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    w = model.model.layers[0].mlp.up_proj.weight
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.001
    assert torch.equal(model.model.norm.weight, torch.ones(cfg.hidden_size))
    assert model.lm_head.weight is model.model.embed_tokens.weight
