"""Freeze parameters by name: the run-level ``freeze`` list of the training config.

Each entry is an ``fnmatch`` pattern matched against the full parameter names of the unwrapped
model (``model.embed_tokens.weight``, ``model.layers.3.mlp.down_proj.weight`` for a
transformers Llama); every match gets ``requires_grad = False`` before the model is wrapped
for DDP/FSDP, checkpointed or compiled, so the optimizer never sees it
(:func:`qsparse.training.optim.param_groups` takes trainable parameters only)::

    qsparse-train recipe=continue/recovery_smollm2 'freeze=[*embed_tokens*]'

A tied ``lm_head`` is the embedding's Parameter: freezing either name freezes both.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

__all__ = ["check_freeze_patterns", "freeze_parameters"]


def check_freeze_patterns(patterns: object) -> list[str]:
    """``patterns`` as a list of non-empty strings, else ``ValueError`` naming ``freeze``."""
    if patterns is None:
        return []
    if isinstance(patterns, str) or not isinstance(patterns, Sequence):
        raise ValueError(
            f"config error: freeze={patterns!r} must be a list of parameter-name patterns, "
            "e.g. 'freeze=[*embed_tokens*]'"
        )
    bad = [p for p in patterns if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(
            f"config error: freeze entries must be non-empty strings (fnmatch patterns of "
            f"parameter names), got {bad!r}"
        )
    return list(patterns)


def freeze_parameters(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Set ``requires_grad = False`` on every parameter whose name matches one of
    ``patterns``; returns the frozen names (every alias of a shared Parameter).

    Raises ``ValueError`` when a pattern matches no parameter (naming an example name) or
    when nothing would be left to train.
    """
    patterns = check_freeze_patterns(patterns)
    if not patterns:
        return []
    named = list(model.named_parameters(remove_duplicate=False))
    hits = {p: [n for n, _ in named if fnmatch.fnmatchcase(n, p)] for p in patterns}
    missing = [p for p, names in hits.items() if not names]
    if missing:
        example = next((n for n, _ in named if ".layers." in n), named[0][0] if named else "-")
        raise ValueError(
            f"config error: freeze pattern(s) {missing} match no parameter of the model "
            f"(names look like {example!r}); use fnmatch patterns such as '*embed_tokens*'"
        )
    matched = {n for names in hits.values() for n in names}
    frozen_ids = {id(p) for n, p in named if n in matched}
    if all(id(p) in frozen_ids for _, p in named):
        raise ValueError(
            f"config error: freeze={patterns} freezes every parameter; nothing would train"
        )
    frozen = []
    for name, param in named:
        if id(param) in frozen_ids:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen
