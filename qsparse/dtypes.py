"""The one table of floating-point dtype names that configs and command lines accept.

Names are torch's (``float32``, ``bfloat16``, ``float16``); the short spellings ``fp32``,
``bf16`` and ``fp16`` are accepted everywhere as aliases. ``auto`` (where a caller allows it)
means "as stored in the checkpoint" and is passed through as the string ``"auto"``, which
transformers' ``from_pretrained(dtype=...)`` understands. :func:`default_dtype` sets torch's
default dtype for a block (modules built inside draw their parameters in it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
ALIASES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def dtype_names(allow_auto: bool = False) -> list[str]:
    """Every accepted name (canonical names, aliases, and ``auto`` when allowed)."""
    return (["auto"] if allow_auto else []) + list(DTYPES) + list(ALIASES)


def torch_dtype(name: str, setting: str = "dtype", allow_auto: bool = False) -> torch.dtype | str:
    """``"bfloat16"`` / ``"bf16"`` -> ``torch.bfloat16``; ``"auto"`` -> ``"auto"`` if allowed.

    Raises:
        ValueError: an unknown name; the message names ``setting`` and the accepted names.
    """
    if allow_auto and name == "auto":
        return "auto"
    key = ALIASES.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"{setting}={name!r} must be one of {dtype_names(allow_auto)}")
    return DTYPES[key]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """``torch.set_default_dtype(dtype)`` inside the block, the previous default restored after
    (also on an exception): a model built inside draws its random weights in ``dtype``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
