"""Settings for activation sparsity and quantization, shared by code, configs and exports.

``sparsity`` always means the fraction of entries zeroed (the paper's S); ``k`` is the number
kept per token (or per block).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

PATTERNS = ("none", "token_topk", "block_topk", "threshold")
WEIGHT_QUANT = ("none", "ternary")
SITES = ("qkv", "o", "gate_up", "down")


@dataclass
class SparsityConfig:
    """Q-Sparse top-k activation sparsity (paper Eq. 1-3, 12-13).

    Args:
        ratio: S, fraction of each projection input zeroed, in [0, 1).
        pattern: ``"token_topk"`` (k largest |x| per token over the hidden dim),
            ``"block_topk"`` (k largest per block of ``block_size`` consecutive values,
            N:M-friendly), ``"threshold"`` (``x * 1[|x| > t]`` with a calibrated per-site
            magnitude threshold ``t``, TEAL/CATS, :mod:`qsparse.methods`; ``ratio`` is then the
            calibration target) or ``"none"`` (dense).
        block_size: B for ``block_topk``; must divide every sparsified input dimension.
        ste: straight-through estimator: the gradient reaches every input entry
            (``dL/dX = dL/d(X*M)``). ``False`` masks the gradient (``dL/d(X*M) * M``).
        rescale: multiply the kept entries by ``||x|| / ||x*M||`` per token (off in the
            authors' code; the paper mentions it without a formula).
        qkv, o, gate_up, down: per-site overrides of ``ratio`` (``None`` = use ``ratio``):
            the shared q/k/v input, the o_proj input, the shared gate/up input and the
            down_proj input (act(gate)*up).
    """

    ratio: float = 0.0
    pattern: str = "token_topk"
    block_size: int = 32
    ste: bool = True
    rescale: bool = False
    qkv: float | None = None
    o: float | None = None
    gate_up: float | None = None
    down: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field."""
        if self.pattern not in PATTERNS:
            raise ValueError(
                f"sparsity.pattern={self.pattern!r} is not supported; use one of {PATTERNS}"
            )
        for name in ("ratio", *SITES):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"sparsity.{name} must be a number in [0, 1), got {value!r}")
            if not (0.0 <= float(value) < 1.0) or math.isnan(float(value)):
                raise ValueError(
                    f"sparsity.{name}={value} is outside [0, 1): it is the fraction of "
                    "activations zeroed (0 = dense, 0.6 keeps 40%)"
                )
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int):
            raise ValueError(f"sparsity.block_size must be an int, got {self.block_size!r}")
        if self.block_size < 1:
            raise ValueError(f"sparsity.block_size={self.block_size} must be >= 1")

    def ratio_for(self, site: str) -> float:
        """The sparsity ratio of one site (``qkv``, ``o``, ``gate_up``, ``down``)."""
        if site not in SITES:
            raise ValueError(f"unknown sparsity site {site!r}; sites are {SITES}")
        if self.pattern == "none":
            return 0.0
        override = getattr(self, site)
        return float(self.ratio if override is None else override)

    @property
    def enabled(self) -> bool:
        return self.pattern != "none" and any(self.ratio_for(s) > 0 for s in SITES)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsityConfig:
        return cls(**_known(cls, data, "sparsity"))


@dataclass
class QuantConfig:
    """Quantization of weights and activations (paper Eq. 4-10, BitNet b1.58).

    Args:
        weights: ``"ternary"`` for absmean 1.58-bit weights ``{-a, 0, +a}``, a = mean|W|;
            ``"none"`` keeps full-precision weights.
        act_bits: per-token absmax quantization of every projection input to this many
            bits (8 for BitNet b1.58 and quantized top-k); ``None`` keeps them in float.
        subln: RMSNorm before the quantization of each projection-input site (BitNet's
            SubLN); learnable weight initialised to 1.
        eps: the epsilon of both quantizers.
    """

    weights: str = "none"
    act_bits: int | None = None
    subln: bool = False
    eps: float = 1e-5

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.weights not in WEIGHT_QUANT:
            raise ValueError(
                f"quant.weights={self.weights!r} is not supported; use one of {WEIGHT_QUANT}"
            )
        if self.act_bits is not None:
            if isinstance(self.act_bits, bool) or not isinstance(self.act_bits, int):
                raise ValueError(f"quant.act_bits must be an int or null, got {self.act_bits!r}")
            if not 2 <= self.act_bits <= 16:
                raise ValueError(
                    f"quant.act_bits={self.act_bits} must be in [2, 16] (8 for BitNet), or null"
                )
        if not (self.eps > 0):
            raise ValueError(f"quant.eps={self.eps} must be > 0")

    @property
    def enabled(self) -> bool:
        return self.weights != "none" or self.act_bits is not None or self.subln

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        return cls(**_known(cls, data, "quant"))

    @classmethod
    def preset(cls, name: str) -> QuantConfig:
        """The config of a named preset (:data:`QUANT_PRESETS`: ``none``, ``int8``,
        ``ternary``, ``bitnet``); ``ValueError`` listing them for another name."""
        if name not in QUANT_PRESETS:
            raise ValueError(
                f"quant={name!r} is not a quantization preset; use one of "
                f"{sorted(QUANT_PRESETS)} or a QuantConfig(...)"
            )
        return cls(**QUANT_PRESETS[name])


#: Named :class:`QuantConfig` settings, the one meaning of each name across the CLIs and the
#: decode modes: ``bitnet`` is BitNet b1.58 (ternary weights, int8 absmax activations, SubLN).
QUANT_PRESETS: dict[str, dict[str, Any]] = {
    "none": {"weights": "none", "act_bits": None, "subln": False},
    "int8": {"weights": "none", "act_bits": 8, "subln": False},
    "ternary": {"weights": "ternary", "act_bits": None, "subln": False},
    "bitnet": {"weights": "ternary", "act_bits": 8, "subln": True},
}


def _known(cls: type, data: dict[str, Any], prefix: str) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {prefix} setting(s) {unknown}; known: {sorted(names)}")
    return dict(data)


def keep_count(dim: int, ratio: float, name: str = "sparsity.ratio") -> int:
    """k = int((1 - S) * d), guarded against float error (0.7 * 10 = 6.999...).

    Raises ``ValueError`` when k would be 0 (nothing kept) or S is out of range.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"{name}={ratio} is outside [0, 1)")
    k = int(math.floor((1.0 - ratio) * dim + 1e-6))
    if k < 1:
        raise ValueError(
            f"{name}={ratio} keeps k=0 of d={dim} values; lower the ratio below {1 - 1 / dim:.4f}"
        )
    return min(k, dim)
