"""The one dtype-name table (qsparse/dtypes.py), the settings that use it, and its default-dtype
block."""

from __future__ import annotations

import pytest
import torch

from qsparse.dtypes import default_dtype, dtype_names, torch_dtype
from qsparse.models.pretrained import hf_model
from qsparse.training.distill import DistillConfig


def test_names_and_aliases_map_to_the_same_dtype() -> None:
    for long, short in (("bfloat16", "bf16"), ("float16", "fp16"), ("float32", "fp32")):
        assert torch_dtype(long) is torch_dtype(short) is getattr(torch, long)
    assert torch_dtype("auto", allow_auto=True) == "auto"
    assert "auto" not in dtype_names() and "auto" in dtype_names(allow_auto=True)


def test_unknown_name_names_the_setting() -> None:
    with pytest.raises(ValueError, match=r"model\.dtype='int8' must be one of"):
        torch_dtype("int8", "model.dtype", allow_auto=True)
    with pytest.raises(ValueError, match="--dtype='auto'"):
        torch_dtype("auto", "--dtype")


def test_every_dtype_setting_takes_the_same_spellings(tiny_hf_checkpoint) -> None:
    path = tiny_hf_checkpoint("llama")
    assert next(hf_model(path, dtype="bf16").parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="model.dtype"):
        hf_model(path, dtype="half")
    assert DistillConfig(mode="logits", kl_weight=1.0, lm_weight=0.0, teacher_dtype="bf16")


def test_default_dtype_sets_it_for_the_block_and_restores_it_on_error():
    with default_dtype(torch.bfloat16):
        assert torch.nn.Linear(2, 2).weight.dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32
    with pytest.raises(RuntimeError), default_dtype(torch.float16):
        raise RuntimeError("inside")
    assert torch.get_default_dtype() == torch.float32
