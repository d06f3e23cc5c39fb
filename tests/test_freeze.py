"""``freeze``: parameters matched by name stay fixed through training and into the export;
bad patterns are one-line config errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose_train, tiny_run_config
from safetensors.torch import load_file
from torch import nn

from qsparse.training.config import validate_config
from qsparse.training.freeze import freeze_parameters
from qsparse.training.run import train


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def test_frozen_embeddings_are_exported_unchanged(tiny_hf_checkpoint, tmp_path: Path) -> None:
    ckpt = tiny_hf_checkpoint("llama", max_position_embeddings=256)
    cfg = tiny_run_config(
        "continue/tiny",
        ckpt,
        tmp_path,
        "freeze=[*embed_tokens*,*layers.0.*norm*]",
        "trainer.max_steps=3",
        "optim.lr=1e-2",
        "data.max_documents=200",
    )
    summary = train(cfg)
    before, after = _weights(ckpt), _weights(Path(summary["export_dir"]))
    key = "model.embed_tokens.weight"
    assert torch.equal(before[key], after[key].to(before[key].dtype))
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(before[norm], after[norm].to(before[norm].dtype))
    moved = "model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(before[moved], after[moved].to(before[moved].dtype))


def test_freeze_errors_name_the_setting() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"freeze pattern\(s\) \['\*embed\*'\] match no"):
        freeze_parameters(model, ["*embed*"])
    with pytest.raises(ValueError, match="freezes every parameter"):
        freeze_parameters(model, ["*"])
    assert freeze_parameters(model, ["0.*"]) == ["0.weight", "0.bias"]
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True]
    with pytest.raises(Exception, match="override freeze=embed"):  # the schema: a list
        compose_train(["freeze=embed"])
    with pytest.raises(ValueError, match="non-empty strings"):
        validate_config(compose_train(["freeze=['']"]))


def test_a_tied_head_is_frozen_with_its_embedding() -> None:
    emb = nn.Embedding(8, 4)
    model = nn.ModuleDict({"embed_tokens": emb, "lm_head": nn.Linear(4, 8, bias=False)})
    model["lm_head"].weight = emb.weight
    model["norm"] = nn.LayerNorm(4)
    assert freeze_parameters(model, ["lm_head.*"]) == ["embed_tokens.weight", "lm_head.weight"]
    assert not emb.weight.requires_grad and model["norm"].weight.requires_grad


def test_frozen_embeddings_under_fsdp_on_two_cpu_processes(
    tiny_hf_checkpoint, tmp_path: Path
) -> None:
    """FSDP2 shards a model whose frozen and trained parameters share units: the run trains,
    and its export keeps the frozen embedding as loaded."""
    from conftest import ddp_recovery_overrides, run_module

    ckpt = tiny_hf_checkpoint("llama", max_position_embeddings=256)
    run_dir = tmp_path / "fsdp"
    args = ddp_recovery_overrides(ckpt, run_dir, tmp_path / "cache", 2, trainer="fsdp_cpu")
    run_module("qsparse.cli.train", [*args, "freeze=[*embed_tokens*]", "optim.lr=1e-2"], tmp_path)
    before, after = _weights(ckpt), _weights(run_dir / "hf")
    key = "model.embed_tokens.weight"
    assert torch.equal(before[key], after[key].to(before[key].dtype))
    moved = "model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(before[moved], after[moved].to(before[moved].dtype))
