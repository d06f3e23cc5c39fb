"""Settings for activation sparsity and quantization, shared by code, configs and exports.

``sparsity`` always means the fraction of entries zeroed (the paper's S); ``k`` is the number
kept per token (or per block).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

PATTERNS = ("none", "token_topk", "block_topk", "threshold")
ALLOCATIONS = ("uniform", "greedy", "cross_layer")
WEIGHT_QUANT = ("none", "ternary")
SITES = ("qkv", "o", "gate_up", "down")


def check_choice(setting: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming ``setting`` (``"sparsity.pattern"``) when ``value`` is not
    one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{setting}={value!r} is not supported; use one of {choices}")


@dataclass
class SparsityConfig:
    """Q-Sparse top-k activation sparsity (paper Eq. 1-3, 12-13).

    Args:
        ratio: S, fraction of each projection input zeroed, in [0, 1).
        pattern: ``"token_topk"`` (k largest |x| per token over the hidden dim),
            ``"block_topk"`` (k largest per block of ``block_size`` consecutive values,
            N:M-friendly), ``"threshold"`` (``x * 1[|x| > t]`` with a per-site magnitude
            threshold ``t``: calibrated by a method, TEAL/CATS, :mod:`qsparse.methods`, or
            tracked to ``ratio`` while training, ``threshold_momentum``; ``ratio`` is then
            the target on average, not per token) or ``"none"`` (dense).
        block_size: B for ``block_topk``; must divide every sparsified input dimension.
        ste: straight-through estimator: the gradient reaches every input entry
            (``dL/dX = dL/d(X*M)``). ``False`` masks the gradient (``dL/d(X*M) * M``).
        rescale: multiply the kept entries by ``||x|| / ||x*M||`` per token (off in the
            authors' code; the paper mentions it without a formula).
        qkv, o, gate_up, down: per-site overrides of ``ratio`` (``None`` = use ``ratio``):
            the shared q/k/v input, the o_proj input, the shared gate/up input and the
            down_proj input (act(gate)*up).
        sites: per-site ratio table, site metric name (``layers.3.mlp.gate_up``,
            :func:`qsparse.nn.sites.sparsifiers`) -> S; a listed site takes its value, the
            others ``ratio_for`` their kind. Exports record it, so a loaded model gets it back.
        allocation: how training fills ``sites``: ``"uniform"`` (leave it as given) or
            ``"greedy"``: when ``sites`` is empty, before the first step, TEAL's greedy
            per-layer allocation with top-k at each site (also for ``pattern="threshold"``,
            whose sites then track those ratios)
            (:func:`qsparse.methods.allocation.topk_site_ratios`) at the same activated
            parameters as every site at ``ratio``, calibrated on
            ``calibration_tokens`` tokens of the ``calibration`` corpora (names or files,
            :func:`qsparse.data.read_documents`: the training corpora, never the evaluation
            text), in steps of ``allocation_step`` (TEAL's 0.05; in d² units of weight, so
            a site of weight share ``w`` moves ``step / w``). ``"cross_layer"``: the same
            budget, but the layers' own sparsities differ too (each at most ``layer_cap``;
            :mod:`qsparse.methods.layer_allocation`), each layer's sites then split by the
            greedy. :func:`qsparse.sparsify` itself applies ``sites`` and ignores these five.
        layer_cap: the largest sparsity ``cross_layer`` gives one layer, in (ratio, 1).
        threshold_momentum: with ``pattern="threshold"``, in training: after every training
            batch each site's threshold moves to ``(1 - m) t + m q``, ``q`` the ``ratio``
            quantile of that batch's |x| at the site (the first batch sets ``t = q``), so the
            threshold tracks the site's ratio on the training text while each token keeps as
            many inputs as exceed it. Outside training (and for calibrated methods) the
            thresholds stay as they are. In (0, 1].
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
    sites: dict[str, float] = field(default_factory=dict)
    allocation: str = "uniform"
    calibration: list[str] = field(default_factory=lambda: ["wiki_en"])
    calibration_tokens: int = 4096
    allocation_step: float = 0.05
    layer_cap: float = 0.9
    threshold_momentum: float = 0.1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field."""
        check_choice("sparsity.pattern", self.pattern, PATTERNS)
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
        self._validate_allocation()

    def _validate_allocation(self) -> None:
        for name, value in (self.sites or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"sparsity.sites.{name} must be a number in [0, 1), got {value!r}")
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"sparsity.sites.{name}={value} is outside [0, 1)")
        check_choice("sparsity.allocation", self.allocation, ALLOCATIONS)
        overrides = [k for k in SITES if getattr(self, k) is not None]
        searched = self.allocation != "uniform"
        if searched and overrides:
            raise ValueError(
                f"sparsity.allocation={self.allocation} computes the per-site ratios itself; "
                f"drop sparsity.{overrides[0]} (or set sparsity.allocation=uniform)"
            )
        if searched and self.pattern not in ("token_topk", "threshold"):
            raise ValueError(
                f"sparsity.allocation={self.allocation} needs sparsity.pattern=token_topk or "
                f"threshold, not {self.pattern!r} (sparsity=topk)"
            )
        m = self.threshold_momentum
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m <= 1:
            raise ValueError(f"sparsity.threshold_momentum={m!r} must be in (0, 1], e.g. 0.1")
        cap = self.layer_cap
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 < cap < 1:
            raise ValueError(f"sparsity.layer_cap={cap!r} must be in (0, 1)")
        if self.allocation == "cross_layer" and self.ratio > cap:
            raise ValueError(
                f"sparsity.layer_cap={cap} is below sparsity.ratio={self.ratio}: no layer may "
                "exceed the cap, so the budget cannot be met; raise sparsity.layer_cap"
            )
        if isinstance(self.calibration, str) or not all(
            isinstance(c, str) and c for c in self.calibration
        ):
            raise ValueError(
                f"sparsity.calibration must be a list of corpus names or files, e.g. "
                f"[wiki_en], got {self.calibration!r}"
            )
        if searched and not self.calibration:
            raise ValueError(
                f"sparsity.allocation={self.allocation} needs sparsity.calibration: the "
                "training corpora, e.g. [wiki_en]"
            )
        tokens = self.calibration_tokens
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 64:
            raise ValueError(f"sparsity.calibration_tokens={tokens!r} must be an integer >= 64")
        step = self.allocation_step
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= 1:
            raise ValueError(f"sparsity.allocation_step={step!r} must be in (0, 1] (TEAL: 0.05)")

    def ratio_for(self, site: str, name: str | None = None) -> float:
        """The sparsity ratio of one site kind (``qkv``, ``o``, ``gate_up``, ``down``); with
        the site's metric ``name``, its entry in ``sites`` when there is one."""
        if site not in SITES:
            raise ValueError(f"unknown sparsity site {site!r}; sites are {SITES}")
        if self.pattern == "none":
            return 0.0
        if self.sites and name in self.sites:
            return float(self.sites[name])
        override = getattr(self, site)
        return float(self.ratio if override is None else override)

    @property
    def enabled(self) -> bool:
        table = any(v > 0 for v in (self.sites or {}).values())
        return self.pattern != "none" and (table or any(self.ratio_for(s) > 0 for s in SITES))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["calibration"] = list(self.calibration)
        out["sites"] = dict(self.sites)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsityConfig:
        data = _known(cls, data, "sparsity")
        if isinstance(data.get("calibration"), (list, tuple)):  # a ListConfig from Hydra too
            data["calibration"] = [str(c) for c in data["calibration"]]
        if "sites" in data:  # a mapping (a DictConfig from Hydra) or null: no table
            data["sites"] = {str(k): v for k, v in dict(data["sites"] or {}).items()}
        return cls(**data)


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
        check_choice("quant.weights", self.weights, WEIGHT_QUANT)
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
