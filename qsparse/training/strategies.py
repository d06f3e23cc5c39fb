"""Distributed strategies built from config (``trainer=fsdp``)."""

from __future__ import annotations

import functools
from typing import Any

from torch import nn


def _is_decoder_layer(module: nn.Module) -> bool:
    """One FSDP unit per transformer block: any module class named ``*DecoderLayer``
    (qsparse Llama, HF Llama/Mistral/Qwen2)."""
    return type(module).__name__.endswith("DecoderLayer")


def fsdp_strategy(
    sharding_strategy: str = "FULL_SHARD",
    activation_checkpointing: bool = False,
    cpu_offload: bool = False,
    **kwargs: Any,
):
    """A Lightning ``FSDPStrategy`` wrapping each decoder layer in its own FSDP unit.

    ``use_orig_params=True`` keeps the original parameters visible (AdamW's decay/no-decay
    groups, ``torch.compile``); checkpoints are full state dicts written by rank 0, so resume
    and the transformers export read them like single-device checkpoints.
    """
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    valid = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")
    if sharding_strategy not in valid:
        raise ValueError(
            f"trainer.strategy.sharding_strategy={sharding_strategy!r} must be one of {valid}"
        )
    policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=_is_decoder_layer)
    extra: dict[str, Any] = {}
    if activation_checkpointing:
        extra["activation_checkpointing_policy"] = policy
    return FSDPStrategy(
        auto_wrap_policy=policy,
        sharding_strategy=sharding_strategy,
        cpu_offload=cpu_offload,
        state_dict_type="full",
        use_orig_params=True,
        **extra,
        **kwargs,
    )
