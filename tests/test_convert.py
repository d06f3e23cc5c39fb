"""``qsparse-convert``: dense HF checkpoint -> sparse export without training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import qsparse
from qsparse.cli.convert import main
from qsparse.models.hf import load_hf_model

FAMILIES = ("llama", "mistral", "qwen2")


def _ids() -> torch.Tensor:
    return torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_matches_in_memory_sparsify(tiny_hf_checkpoint, tmp_path: Path, family: str):
    src = tiny_hf_checkpoint(family)
    dst = tmp_path / "sparse"
    report = tmp_path / "report.json"
    assert main([str(src), str(dst), "--sparsity", "0.6", "--json", str(report)]) == 0

    expected = load_hf_model(src)
    qsparse.sparsify(expected, 0.6)
    converted = qsparse.load(dst, dtype=torch.float32)
    with torch.no_grad():
        a = expected(input_ids=_ids()).logits
        b = converted(input_ids=_ids()).logits
        dense = load_hf_model(src)(input_ids=_ids()).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, dense)  # top-k changed the outputs

    summary = json.loads(report.read_text())
    assert summary["converted"] == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert "lm_head" in summary["skipped"]
    assert summary["activated_parameters"] == qsparse.activated_parameters(
        converted, measured=False
    )
    assert (dst / "tokenizer.json").is_file()
    # transformers reads the export as the dense model (weights unchanged by conversion)
    plain = load_hf_model(dst)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=_ids()).logits, dense)


def test_convert_bitnet_block_relu2(tiny_hf_checkpoint, tmp_path: Path) -> None:
    src = tiny_hf_checkpoint("llama")
    dst = tmp_path / "bitnet"
    args = [str(src), str(dst), "--sparsity", "0.5", "--pattern", "block_topk"]
    args += ["--block-size", "32", "--quant", "bitnet", "--activation", "relu2"]
    assert main(args) == 0
    settings = json.loads((dst / "config.json").read_text())["qsparse"]
    assert settings["quant"] == {"weights": "ternary", "act_bits": 8, "subln": True, "eps": 1e-5}
    assert settings["sparsity"]["pattern"] == "block_topk"
    assert settings["activation"] == "relu2"
    model = qsparse.load(dst, dtype=torch.float32)
    seen = {}
    sparsifier = model.model.layers[0].mlp.down_proj.act
    sparsifier.register_forward_hook(lambda m, a, out: seen.setdefault("x", out))
    with torch.no_grad():
        model(input_ids=_ids())
    # down_proj sees its input after block top-k: at most 16 non-zeros in every block of 32
    blocks = seen["x"].reshape(-1, 32)
    assert int((blocks != 0).sum(-1).max()) <= 16
    assert int((blocks != 0).sum(-1).max()) > 0


def test_convert_reports_missing_files(tiny_hf_checkpoint, tmp_path: Path, capsys) -> None:
    src = tiny_hf_checkpoint("mistral")
    (src / "model.safetensors").unlink()
    assert main([str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no weights" in err and "model.safetensors" in err
    assert not (tmp_path / "out").exists()
    assert main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_convert_rejects_bad_settings(tiny_hf_checkpoint, tmp_path: Path, capsys) -> None:
    src = tiny_hf_checkpoint("qwen2")
    assert main([str(src), str(tmp_path / "o"), "--sparsity", "1.2"]) == 2
    assert "sparsity.ratio=1.2" in capsys.readouterr().err
    assert main([str(src), str(src)]) == 2
    assert "DST must differ" in capsys.readouterr().err
    assert main([str(src), str(tmp_path / "o"), "--pattern", "block_topk", "--block-size", "48"])
    assert "block_size" in capsys.readouterr().err
