"""``qsparse.sparsify``: turn a dense Llama-family model into a Q-Sparse / BitNet one in place.

Works on any model whose decoder layers use Hugging Face Llama names: transformers'
``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` (and their base models) and
qsparse's own :class:`qsparse.models.llama.LlamaForCausalLM`. Per decoder layer it installs
four sparsification sites (docs/design.md §1):

==========  ==============================================  ===================================
site        where                                           module
==========  ==============================================  ===================================
``qkv``     shared input of q/k/v (one mask for the three)  ``self_attn.qsparse_input`` (hook)
``o``       input of o_proj                                 ``self_attn.o_proj.act``
``gate_up`` shared input of gate/up                         ``mlp.qsparse_input`` (hook)
``down``    input of down_proj, ``act(gate) * up``          ``mlp.down_proj.act``
==========  ==============================================  ===================================

Every projection becomes a :class:`~qsparse.nn.QSparseLinear` that reuses the original
Parameter objects (names, optimizer state, tied weights and loaded checkpoints survive).
The conversion is idempotent: calling it again re-applies the new settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .nn import (
    ActivationSparsifier,
    QSparseLinear,
    QuantConfig,
    SparsityConfig,
    keep_count,
    make_activation,
)
from .nn.ffn import ACTIVATIONS
from .nn.sites import (
    SETTINGS_ATTR,
    decoder_layers,
    metric_name,
)
from .stats import activated_parameters, total_parameters

SUPPORTED_CLASSES = (
    "LlamaForCausalLM",
    "LlamaModel",
    "MistralForCausalLM",
    "MistralModel",
    "Qwen2ForCausalLM",
    "Qwen2Model",
)
_SUPPORTED_MODULES = (
    "transformers.models.llama",
    "transformers.models.mistral",
    "transformers.models.qwen2",
    "qsparse.",
)
#: values of sparsify's ``activation`` (and of the training config's ``activation`` key)
ACTIVATION_CHOICES = ("keep", *ACTIVATIONS)


@dataclass
class SparsifyReport:
    """What :func:`sparsify` changed.

    ``converted``: names of projections now :class:`QSparseLinear`; ``skipped``: name ->
    reason; ``sites``: metric name -> {module, dim, ratio, k}; parameter counts follow
    :func:`qsparse.stats.activated_parameters` with the configured (not measured) ratios.
    """

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    total_parameters: int = 0
    activated_parameters: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def activated_fraction(self) -> float:
        return self.activated_parameters / max(self.total_parameters, 1)

    def __str__(self) -> str:
        lines = [
            f"qsparse.sparsify: {len(self.converted)} projections converted, "
            f"{len(self.skipped)} skipped, {len(self.sites)} sparsity sites",
            f"  parameters: {self.total_parameters:,} total, {self.activated_parameters:,} "
            f"activated per token ({100 * self.activated_fraction:.1f}%)",
        ]
        for name, reason in self.skipped.items():
            lines.append(f"  skipped {name}: {reason}")
        return "\n".join(lines)


def _matches(name: str, pattern: str) -> bool:
    """Module-boundary match: ``layers.1`` matches ``model.layers.1.mlp`` not ``layers.11``."""
    return f".{pattern}." in f".{name}."


def _check_supported(model: nn.Module) -> None:
    cls = type(model)
    if cls.__name__ in SUPPORTED_CLASSES and cls.__module__.startswith(_SUPPORTED_MODULES):
        return
    raise ValueError(
        f"qsparse.sparsify does not support {cls.__module__}.{cls.__name__}; supported: "
        f"{', '.join(SUPPORTED_CLASSES)} from transformers (Llama, Mistral, Qwen2) and "
        "qsparse.models.llama.LlamaForCausalLM"
    )


def _sparsify_input_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook: pass the module's hidden-states input through ``qsparse_input``."""
    if args:
        return (module.qsparse_input(args[0]), *args[1:]), kwargs
    if "hidden_states" in kwargs:
        kwargs["hidden_states"] = module.qsparse_input(kwargs["hidden_states"])
        return args, kwargs
    raise RuntimeError(f"{type(module).__name__} was called without hidden_states")


def _install_shared_input(module: nn.Module, sparsifier: ActivationSparsifier) -> None:
    module.qsparse_input = sparsifier
    hooks = getattr(module, "_forward_pre_hooks", {}).values()
    if not any(h is _sparsify_input_hook for h in hooks):
        module.register_forward_pre_hook(_sparsify_input_hook, with_kwargs=True)


def _make_sparsifier(
    old: ActivationSparsifier | None,
    dim: int,
    ratio: float,
    sparsity: SparsityConfig,
    quant: QuantConfig,
    where: str,
    device: torch.device,
    dtype: torch.dtype,
) -> ActivationSparsifier:
    """A new sparsifier at ``ratio``, or ``old`` when only the ratio differs (it keeps its
    SubLN weights; the caller sets its ratio once every site is validated, so a bad setting
    changes nothing). Raises ``ValueError`` prefixed with ``where``."""
    spec = dict(
        dim=dim,
        pattern=sparsity.pattern,
        block_size=sparsity.block_size,
        ste=sparsity.ste,
        rescale=sparsity.rescale,
        act_bits=quant.act_bits,
        subln=quant.subln,
        eps=quant.eps,
        threshold_momentum=(
            sparsity.threshold_momentum if sparsity.pattern == "threshold" else None
        ),
    )
    reusable = (
        old is not None
        and (old.norm is not None) == quant.subln
        and all(getattr(old, k) == v for k, v in spec.items() if k != "subln")
    )
    try:
        if reusable:
            width = old.block_size if old.pattern == "block_topk" else old.dim
            if old.pattern != "none" and ratio > 0:
                keep_count(width, ratio)
            return old
        return ActivationSparsifier(ratio=ratio, **spec).to(device=device, dtype=dtype)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _set_ratio(sp: ActivationSparsifier, ratio: float) -> None:
    sp.target_ratio = sp.ratio = float(ratio)


def _to_qsparse_linear(
    linear: nn.Linear, act: ActivationSparsifier | None, quant: QuantConfig
) -> QSparseLinear:
    if isinstance(linear, QSparseLinear):
        linear._setup(act, quant.weights, quant.eps)
        return linear
    return QSparseLinear.from_linear(linear, act=act, weight_quant=quant.weights, eps=quant.eps)


def sparsify(
    model: nn.Module,
    sparsity: SparsityConfig | float | None = None,
    quant: QuantConfig | str | None = None,
    activation: str = "keep",
    modules_to_not_convert: tuple[str, ...] | list[str] = ("lm_head",),
) -> SparsifyReport:
    """Convert ``model`` in place to Q-Sparse (and/or BitNet b1.58) and report the changes.

    Args:
        model: an HF Llama/Mistral/Qwen2 model or a qsparse Llama.
        sparsity: a :class:`SparsityConfig` or just the ratio S (fraction zeroed).
        quant: a :class:`QuantConfig`, or a preset name (``"int8"``, ``"ternary"``,
            ``"bitnet"``: :data:`~qsparse.nn.config.QUANT_PRESETS`); ``None``: no quantization.
        activation: ``"keep"`` the model's FFN activation or swap it to ``"relu2"``/``"silu"``.
        modules_to_not_convert: module names or name parts (matched at ``.`` boundaries:
            ``layers.1`` does not match ``layers.11``) left dense. The lm head stays dense by
            default; embeddings are never converted.

    Returns:
        a :class:`SparsifyReport`; the settings are also stored on ``model.qsparse_settings``
        and, for transformers models, in ``model.config.qsparse`` (saved by ``save_pretrained``).
    """
    _check_supported(model)
    if sparsity is None:
        sparsity = SparsityConfig()
    elif isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool):
        sparsity = SparsityConfig(ratio=float(sparsity))
    elif not isinstance(sparsity, SparsityConfig):
        raise ValueError(f"sparsity must be a SparsityConfig or a float, got {type(sparsity)}")
    sparsity.validate()
    if quant is None:
        quant = QuantConfig()
    elif isinstance(quant, str):
        quant = QuantConfig.preset(quant)
    elif not isinstance(quant, QuantConfig):
        raise ValueError(
            f"quant must be a QuantConfig or a preset name ('int8', 'ternary', 'bitnet'), "
            f"got {type(quant).__name__}"
        )
    quant.validate()
    if activation not in ACTIVATION_CHOICES:
        raise ValueError(f"activation={activation!r} must be one of {ACTIVATION_CHOICES}")
    excluded = tuple(modules_to_not_convert)

    layers = decoder_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no decoder layers with self_attn.{{q,k,v,o}}_proj and "
            "mlp.{gate,up,down}_proj; qsparse.sparsify supports Llama, Mistral and Qwen2"
        )
    report = SparsifyReport()
    # validate every site before touching the model, so a bad setting changes nothing
    plans = []
    for prefix, attn, mlp in layers:
        p = f"{prefix}." if prefix else ""
        sites = [
            ("qkv", attn, f"{p}self_attn", ("q_proj", "k_proj", "v_proj"), attn.q_proj.in_features),
            ("o", attn, f"{p}self_attn", ("o_proj",), attn.o_proj.in_features),
            ("gate_up", mlp, f"{p}mlp", ("gate_proj", "up_proj"), mlp.gate_proj.in_features),
            ("down", mlp, f"{p}mlp", ("down_proj",), mlp.down_proj.in_features),
        ]
        for site, parent, parent_name, names, dim in sites:
            full = [f"{parent_name}.{n}" for n in names]
            hit = [n for n in full if any(_matches(n, pat) for pat in excluded)]
            if hit:
                for n in full:
                    report.skipped[n] = (
                        "in modules_to_not_convert"
                        if n in hit
                        else f"shares its input with {hit[0]}"
                    )
                continue
            ref = getattr(parent, names[0]).weight
            shared = site in ("qkv", "gate_up")
            metric = metric_name(f"{parent_name}.{site}" if shared else full[0])
            if shared:
                old = getattr(parent, "qsparse_input", None)
            else:
                old = getattr(getattr(parent, names[0]), "act", None)
            ratio = sparsity.ratio_for(site, metric)
            sp = _make_sparsifier(
                old if isinstance(old, ActivationSparsifier) else None,
                dim,
                ratio,
                sparsity,
                quant,
                f"{parent_name} ({site} site)",
                ref.device,
                ref.dtype,
            )
            plans.append((site, parent, parent_name, names, full, sp, ratio, metric))
    unknown = sorted(set(sparsity.sites or {}) - {plan[-1] for plan in plans})
    if unknown:
        raise ValueError(
            f"sparsity.sites names {unknown[0]!r}, not a site of this model (sites are named "
            "like layers.0.self_attn.qkv, layers.0.mlp.down_proj)"
        )

    for site, parent, parent_name, names, full, sp, ratio, metric in plans:
        _set_ratio(sp, ratio)
        shared = site in ("qkv", "gate_up")
        if shared:
            _install_shared_input(parent, sp)
        for n, fname in zip(names, full, strict=True):
            setattr(
                parent, n, _to_qsparse_linear(getattr(parent, n), None if shared else sp, quant)
            )
            report.converted.append(fname)
        report.sites[metric] = {
            "module": f"{parent_name}.qsparse_input" if shared else f"{full[0]}.act",
            "dim": sp.dim,
            "ratio": sp.ratio,
            "k": sp.keep(),
        }

    # other linears (e.g. lm_head) are converted only when not excluded
    done = set(report.converted)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear) or full in done:
                continue
            if any(_matches(full, pat) for pat in excluded):
                report.skipped[full] = "in modules_to_not_convert (kept dense)"
                continue
            sp = _make_sparsifier(
                getattr(child, "act", None),
                child.in_features,
                sparsity.ratio,
                sparsity,
                quant,
                full,
                child.weight.device,
                child.weight.dtype,
            )
            _set_ratio(sp, sparsity.ratio)
            setattr(module, child_name, _to_qsparse_linear(child, sp, quant))
            report.converted.append(full)
            report.sites[metric_name(full)] = {
                "module": f"{full}.act",
                "dim": sp.dim,
                "ratio": sp.ratio,
                "k": sp.keep(),
            }

    if activation != "keep":
        for _, _, mlp in layers:
            mlp.act_fn = make_activation(activation)
    config = getattr(model, "config", None)
    if activation != "keep" and config is not None and hasattr(config, "hidden_act"):
        config.hidden_act = activation
    settings = {
        "sparsity": sparsity.to_dict(),
        "quant": quant.to_dict(),
        "activation": activation,
        "modules_to_not_convert": list(excluded),
    }
    previous = getattr(model, SETTINGS_ATTR, None)
    if activation == "keep" and previous and previous.get("activation") != "keep":
        settings["activation"] = previous["activation"]  # an earlier call swapped it
    setattr(model, SETTINGS_ATTR, settings)
    if config is not None and not isinstance(config, dict):
        try:
            config.qsparse = settings
        except (AttributeError, TypeError):  # frozen dataclass configs
            pass
    report.settings = settings

    report.total_parameters = total_parameters(model)
    report.activated_parameters = activated_parameters(model, measured=False)
    return report
