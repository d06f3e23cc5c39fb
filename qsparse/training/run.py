"""The training driver behind ``qsparse-train``: composed config in, trained run out.

:func:`train` checks the config, the run directory and the data before anything is written
(:func:`check_config`, :mod:`qsparse.training.rundir`), builds the datamodule, the
:class:`~qsparse.training.LMModule`, loggers, callbacks and the Trainer, fits (resuming from
``<run_dir>/checkpoints/last.ckpt`` when ``resume=true``), runs a final validation when the
last step had none, prints the run summary, writes ``loss_curve.png`` / ``summary.json`` and
exports a transformers folder to ``<run_dir>/hf``. Layout of a run directory::

    outputs/<run_name>/
      .hydra/                 composed config (Hydra's record, written once the checks pass)
      config.yaml             resolved config as trained
      wandb_run_id            wandb id (resume continues the same wandb run)
      checkpoints/last.ckpt   atomic, every N steps and at the end
      csv/metrics.csv         every logged metric
      wandb/                  offline wandb files (sync with `wandb sync`)
      loss_curve.png, summary.json, hf/
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    InterpolationToMissingValueError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

from qsparse.errors import UserError

from .callbacks import RunSummary, StepProgressBar, best_checkpoint
from .checkpoint import AtomicCheckpointIO
from .config import ConfigError, check_accelerator, validate_config
from .console import no_transformers_progress_bars, say
from .distill import check_teacher_path
from .logging import TrimResumedMetrics, build_loggers, finish_wandb, git_sha, log_run_config
from .module import LMModule
from .rundir import check_run_dir, prepare_run_dir
from .teacher_store import check_run as check_teacher_logits

_TRAINER_BUILT_IN = ("callbacks", "logger", "plugins", "default_root_dir")


def _hydra_runtime() -> tuple[str | None, bool, str | None]:
    """(output dir, is multirun, job override string) of the current Hydra job, if any."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None, False, None
        hc = HydraConfig.get()
        return hc.runtime.output_dir, hc.mode == RunMode.MULTIRUN, hc.job.override_dirname
    except (ImportError, ValueError):
        return None, False, None


def _job_tags() -> list[str]:
    """The command-line overrides of the current multirun job (``sparsity.ratio=0.5``,
    ``quant=bitnet``, ...): its wandb tags, so the points of a sweep can be told apart and
    filtered (wandb caps a tag at 64 characters)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return [str(t)[:64] for t in HydraConfig.get().overrides.task]
    except (ImportError, ValueError):
        return []


def resolve_run_dir(cfg: Mapping[str, Any]) -> Path:
    """``run_dir`` if set, else the Hydra job's output dir, else ``outputs/<run_name>``."""
    if cfg.get("run_dir"):
        return Path(cfg["run_dir"]).absolute()
    out, _, _ = _hydra_runtime()
    if out:
        return Path(out).absolute()
    return Path("outputs", cfg["run_name"]).absolute()


def _cause(exc: BaseException) -> str:
    """The message of the error Hydra's ``instantiate`` wrapped (its cause), on one line."""
    inner = exc.__cause__ or exc
    return " ".join(str(inner).split())


def _is_launcher_process() -> bool:
    """True in the job's global rank zero as started by the user (before any Lightning child):
    not a child Lightning spawned (``LOCAL_RANK`` >= 1), not a non-zero rank of ``torchrun``
    (``RANK``) or ``srun`` (``SLURM_PROCID``), not the first process of another node
    (``NODE_RANK``)."""
    env = os.environ
    if env.get("LOCAL_RANK", "0") != "0":
        return False
    for key in ("RANK", "SLURM_PROCID"):
        if key in env:
            return env[key] == "0"
    return env.get("NODE_RANK", "0") == "0"


def build_callbacks(spec: Mapping[str, Any] | None, run_dir: Path) -> list[Callback]:
    """Instantiate every ``callbacks.<name>`` entry (``null`` entries are skipped). A
    ``ModelCheckpoint`` without ``dirpath`` writes to ``<run_dir>/checkpoints``."""
    out: list[Callback] = []
    for name, entry in (spec or {}).items():
        if entry is None:
            continue
        if not isinstance(entry, Mapping) or "_target_" not in entry:
            raise ConfigError(
                f"config error: callbacks.{name} must be a mapping with a _target_ (or null)"
            )
        try:
            cb = instantiate(dict(entry), _convert_="all")
        except Exception as exc:
            raise ConfigError(
                f"config error: callbacks.{name}: could not build {entry['_target_']}: "
                f"{_cause(exc)}"
            ) from exc
        if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
            cb.dirpath = str(run_dir / "checkpoints")
        if isinstance(cb, RunSummary) and cb.run_dir is None:
            cb.run_dir = str(run_dir)
        out.append(cb)
    return out


def build_trainer(
    trainer_cfg: Mapping[str, Any],
    run_dir: Path,
    callbacks: list[Callback],
    loggers: list,
) -> L.Trainer:
    """``L.Trainer(**trainer_cfg)`` with our callbacks, loggers and atomic checkpoint IO; a
    ``strategy`` given as a ``_target_`` mapping is instantiated first."""
    kwargs = dict(trainer_cfg)
    for key in _TRAINER_BUILT_IN:
        if key in kwargs:
            raise ConfigError(
                f"config error: trainer.{key} is set by qsparse; remove it from the trainer config"
            )
    strategy = kwargs.get("strategy")
    if isinstance(strategy, Mapping):
        try:
            kwargs["strategy"] = instantiate(dict(strategy), _convert_="all")
        except Exception as exc:
            raise ConfigError(
                f"config error: trainer.strategy: could not build it: {_cause(exc)}"
            ) from exc
    if kwargs.get("enable_progress_bar", True):
        callbacks = [StepProgressBar(), *callbacks]  # closes before RunSummary prints
    try:
        return L.Trainer(
            default_root_dir=str(run_dir),
            callbacks=callbacks,
            logger=loggers or False,
            plugins=[AtomicCheckpointIO()],
            **kwargs,
        )
    except TypeError as exc:
        raise ConfigError(f"config error: trainer: {exc} (check the trainer.* keys)") from exc


def check_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Every check of a composed training config that needs neither data nor the run
    directory; return the resolved config as a plain dict. Raises :class:`ConfigError` naming
    the key: missing or out-of-range values (:func:`validate_config`), a GPU trainer on a
    machine without one, and a model the run's sparsity/quant settings cannot convert (the
    model is built on the meta device, so this is cheap at any size). ``qsparse-train -m``
    runs it on every job before the first one starts."""
    try:
        if isinstance(cfg, DictConfig):
            container = OmegaConf.to_container(cfg, resolve=True)
        else:
            container = dict(cfg)
        validate_config(container)
    except (MissingMandatoryValue, InterpolationToMissingValueError) as exc:
        # "Missing mandatory value: model.path" (possibly reached through another key)
        key = str(exc).splitlines()[0].rsplit("Missing mandatory value: ", 1)[-1].strip()
        raise ConfigError(f"config error: {key} is required (???): set {key}=...") from exc
    except (ValueError, OmegaConfBaseException) as exc:
        # OmegaConf wraps resolver errors ("... raised while resolving interpolation: <ours>")
        message = str(exc).splitlines()[0].split("resolving interpolation: ")[-1]
        raise ConfigError(message) from exc
    check_accelerator(container.get("trainer") or {})
    check_teacher_path(container)  # distill.teacher_path: a checkpoint folder, same vocabulary
    _check_conversion(container)
    return container


def _module(container: Mapping[str, Any], model_spec: Mapping[str, Any]) -> LMModule:
    return LMModule(
        model=dict(model_spec),
        sparsity=container.get("sparsity"),
        quant=container.get("quant"),
        activation=container.get("activation", "keep"),
        optim=container.get("optim"),
        scheduler=container.get("scheduler"),
        compile=bool(container.get("compile", False)),
        gradient_checkpointing=bool(container.get("gradient_checkpointing", False)),
        modules_to_not_convert=tuple(container.get("modules_to_not_convert", ("lm_head",))),
        distill=container.get("distill"),
        method=container.get("method"),
        freeze=tuple(container.get("freeze") or ()),
    )


def meta_checkpoint_model(path: str, **_: Any) -> torch.nn.Module:
    """The model of a checkpoint folder built from its ``config.json`` alone (on the current
    default device: meta in :func:`check_config`), after validating the folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qsparse.models.hf import check_hf_checkpoint

    check_hf_checkpoint(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    return AutoModelForCausalLM.from_config(config)


def _check_conversion(container: Mapping[str, Any]) -> None:
    """Build the model and apply the run's conversion on the meta device (no memory, no
    weights read): a block size that does not divide a projection, a layer the settings
    cannot convert, ... fail here as a :class:`ConfigError` instead of inside ``fit``."""
    spec = dict(container.get("model") or {})
    if "vocab_size" in spec and spec["vocab_size"] is None:
        spec["vocab_size"] = 256  # the data's size is not known yet; the checks do not use it
    if spec.get("path") is not None:  # a checkpoint folder: its config, not its weights
        spec = {"_target_": f"{__name__}.meta_checkpoint_model", "path": spec["path"]}
    try:
        module = _module(container, spec)
        with torch.device("meta"):
            module.configure_model()
    except UserError:
        raise
    except (ValueError, TypeError) as exc:
        message = " ".join(str(exc).split())
        raise ConfigError(
            message if message.startswith("config error") else f"config error: {message}"
        ) from exc


def train(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Run one training job described by a composed ``conf/train.yaml``; returns the summary
    dict (also written to ``<run_dir>/summary.json``).

    Every check that can fail on a user's mistake runs before anything is written to the run
    directory: the config (:func:`check_config`), the run directory's previous run
    (:func:`~qsparse.training.rundir.check_run_dir`), and the data (the datamodule's
    ``prepare_data``, whose files are read here)."""
    container = check_config(cfg)
    check_teacher_logits(container)  # distill.teacher_logits: the folder serves this run
    run_dir = resolve_run_dir(container)
    _, multirun, overrides = _hydra_runtime()
    launcher = _is_launcher_process()
    resume, overwrite = bool(container.get("resume")), bool(container.get("overwrite"))
    last = run_dir / "checkpoints" / "last.ckpt"
    if launcher:
        max_steps = (container.get("trainer") or {}).get("max_steps")
        ckpt_path = check_run_dir(run_dir, resume, overwrite, max_steps)
    else:  # a DDP child: rank zero checked and prepared the run directory
        ckpt_path = str(last) if resume else None

    L.seed_everything(int(container["seed"]), workers=True, verbose=False)
    torch.set_float32_matmul_precision(container.get("float32_matmul_precision", "high"))

    datamodule = _build_datamodule(container.get("data"))
    model_spec = dict(container["model"])
    if launcher and hasattr(datamodule, "prepare_data"):
        datamodule.prepare_data()  # unreadable data files fail here, before any write
        check_teacher_logits(container, datamodule)  # ... and the data it was written for
        if "vocab_size" in model_spec and model_spec["vocab_size"] is None:
            model_spec["vocab_size"] = int(datamodule.vocab_size)
    callbacks = build_callbacks(container.get("callbacks"), run_dir)
    if ckpt_path and (container.get("logger") or {}).get("csv", True):
        callbacks.append(TrimResumedMetrics(run_dir / "csv"))
    if launcher:
        prepare_run_dir(run_dir, overwrite, cfg if isinstance(cfg, DictConfig) else None)

    module = _module(container, model_spec)
    for cb in callbacks:
        if isinstance(cb, RunSummary) and cb.unigram_entropy is None:
            fn = getattr(datamodule, "unigram_entropy", None)
            if callable(fn) and _is_launcher_process():
                try:
                    cb.unigram_entropy = float(fn())
                except Exception as exc:  # a summary extra must never stop training
                    say(f"unigram entropy unavailable: {exc}")
    sweep = container.get("sweep_name") if multirun else None
    run_name = container["run_name"]
    if multirun:
        run_name = f"{container['sweep_name']}/{overrides or run_dir.name}"
    exit_code = 1
    try:
        loggers = build_loggers(
            container.get("logger") or {},
            run_dir,
            run_name,
            bool(ckpt_path),
            group=sweep,
            tags=_job_tags() if multirun else (),
        )
        trainer = build_trainer(container.get("trainer") or {}, run_dir, callbacks, loggers)
        _write_config(run_dir, container)
        log_run_config(loggers, container, git_sha())
        if ckpt_path:
            say(f"resuming {run_dir.name} from {ckpt_path}")
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        best = best_checkpoint(callbacks)
        if best is not None:
            # checkpoint choice: the monitored best weights are validated and exported
            say(f"restoring the best checkpoint by {best[1]}: {best[0]}")
            trainer.validate(module, datamodule=datamodule, ckpt_path=best[0], verbose=False)
        elif module.last_val_step != trainer.global_step and trainer.limit_val_batches != 0:
            trainer.validate(module, datamodule=datamodule, verbose=False)
        for cb in callbacks:
            if isinstance(cb, RunSummary):
                cb.flush(trainer, module)  # no validation ran: report what there is
        summary = next((c.summary for c in callbacks if isinstance(c, RunSummary)), {})
        if container.get("export", True):
            summary["export_dir"] = _export(trainer, module, datamodule, container, run_dir)
        exit_code = 0
        return summary
    finally:
        finish_wandb(exit_code)


def _build_datamodule(spec: Any) -> L.LightningDataModule:
    if not isinstance(spec, Mapping) or "_target_" not in spec:
        raise ConfigError("config error: data must be a mapping with a _target_ (e.g. data=wiki)")
    try:
        dm = instantiate(dict(spec), _convert_="all")
    except Exception as exc:
        raise ConfigError(
            f"config error: data: could not build {spec['_target_']}: {_cause(exc)}"
        ) from exc
    if not isinstance(dm, L.LightningDataModule):
        raise ConfigError(
            f"config error: data._target_={spec['_target_']!r} is not a LightningDataModule"
        )
    return dm


@rank_zero_only
def _write_config(run_dir: Path, container: Mapping[str, Any]) -> None:
    OmegaConf.save(OmegaConf.create(dict(container)), run_dir / "config.yaml")


def _export(
    trainer: L.Trainer,
    module: LMModule,
    datamodule: L.LightningDataModule,
    container: Mapping[str, Any],
    run_dir: Path,
) -> str | None:
    """Write ``<run_dir>/hf`` (transformers folder) from rank zero. Under FSDP2 every rank
    first joins in gathering the full state dict, which rank zero loads into an unsharded
    copy of the model."""
    from .strategies import FSDP2Strategy, full_state_dict

    model = module.model
    if isinstance(trainer.strategy, FSDP2Strategy):
        state = full_state_dict(model)
        if trainer.is_global_zero:
            model = unsharded_model(module, state)
    trainer.strategy.barrier("qsparse-export")
    if not trainer.is_global_zero:
        return None
    from qsparse.models.export import export

    out = run_dir / "hf"
    tokenizer = getattr(datamodule, "tokenizer", None)
    with no_transformers_progress_bars():
        export(model, out, tokenizer=tokenizer)  # settings: those sparsify() stored on the model
    say(f"exported transformers folder: {out}")
    return str(out)


def unsharded_model(module: LMModule, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """A plain (unsharded, CPU) copy of ``module``'s model holding ``state``: the same build
    and conversion (``LMModule(**hparams).configure_model()`` outside any trainer)."""
    copy = LMModule(**dict(module.hparams))
    copy.configure_model()
    assert copy.model is not None
    copy.model.load_state_dict(dict(state))
    return copy.model
