"""LightningModule for causal-LM training of (sparsified, quantized) Llama-style models.

The module is built from plain configuration (dicts or dataclasses), never from ``nn.Module``
objects, so ``LMModule.load_from_checkpoint(path)`` rebuilds the exact model:

    model spec --instantiate--> nn.Module --qsparse.sparsify--> (grad ckpt) --> (compile)

all inside :meth:`LMModule.configure_model`, i.e. before the optimizer, ``torch.compile`` and
FSDP wrapping, and only once (the hook is idempotent).

Batches are dicts with ``input_ids`` LongTensor[B, T], ``labels`` LongTensor[B, T] (unshifted,
``-100`` = no loss; the model shifts) and optionally ``attention_mask`` [B, T]. Logged:
``train/loss`` (mean next-token cross-entropy of the step), ``train/ppl = exp(train/loss)``,
``train/lr``, ``train/grad_norm`` (global L2 norm before clipping), ``val/loss`` (token-weighted
mean over the whole validation set and all ranks), ``val/ppl = exp(val/loss)``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass, replace
from typing import Any

import lightning as L
import torch
from torch import nn

from qsparse.convert import ACTIVATION_CHOICES
from qsparse.methods import method_from_spec
from qsparse.models.builder import build_model
from qsparse.models.checkpointing import enable_gradient_checkpointing
from qsparse.nn import QuantConfig, SparsityConfig
from qsparse.nn.sites import dynamic_sparsity, track_thresholds

from .distill import DistillConfig
from .freeze import check_freeze_patterns, freeze_parameters
from .optim import configure_optimization, no_decay_names, total_grad_norm
from .site_allocation import allocate_at_build, note_replaced_table
from .teacher_store import make_teacher


def _plain(value: Any) -> Any:
    """Dataclass / DictConfig / mapping -> plain ``dict`` (recursively), other values as is."""
    if value is None:
        return None
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with hydra, a dependency
        pass
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


class LMModule(L.LightningModule):
    """Causal-LM training of a model built from config, optionally sparsified/quantized.

    Args:
        model: model spec: ``{"_target_": builder, **kwargs}`` returning an ``nn.Module``
            whose ``forward(input_ids, labels=None, attention_mask=None)`` returns an object
            with ``.loss`` (mean next-token CE, labels shifted inside, -100 ignored) and
            ``.logits``; or ``{"preset": "tiny", **overrides}`` for the qsparse Llama. A
            ``vocab_size: None`` entry is filled from the datamodule's ``vocab_size``.
        sparsity: :class:`~qsparse.nn.SparsityConfig` (or its dict, or a float ratio);
            ``None``/ratio 0 = dense.
        quant: :class:`~qsparse.nn.QuantConfig` (or its dict); ``None`` = full precision.
        activation: ``"keep"`` the model's FFN activation or ``"relu2"`` (squared ReLU).
        optim: optimizer factory: a callable ``f(param_groups) -> Optimizer`` (e.g. a Hydra
            ``_partial_``) or its spec dict with ``_target_`` (and ``_partial_: true``);
            default AdamW(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1). ``weight_decay``
            applies to the decay group only (matrices; not norms, biases, embeddings).
        scheduler: LR scheduler factory ``f(optimizer, total_steps=...)`` or its spec dict;
            ``total_steps: None`` = ``trainer.estimated_stepping_batches``. Stepped per step.
        compile: ``torch.compile`` the model in place (state-dict names unchanged).
        gradient_checkpointing: recompute decoder layers in backward.
        modules_to_not_convert: module names ``sparsify`` leaves dense.
        freeze: ``fnmatch`` patterns of parameter names to keep fixed (``requires_grad``
            off before any wrapping; :mod:`qsparse.training.freeze`); empty = train all.
        distill: :class:`~qsparse.training.distill.DistillConfig` (or its dict): train
            against the frozen dense model built from the same ``model`` spec (the teacher,
            built at fit start, never checkpointed), or against its top-K logits read from
            ``distill.teacher_logits`` (no teacher built); ``None`` = LM loss only.
        method: a ``method=`` config node (``{"_target_": "qsparse.methods.ProSparse", ...}``):
            the :class:`~qsparse.methods.SparsityMethod` whose training hooks this module calls
            (its conversion settings, then ``on_train_step`` before every batch, logging what
            it returns, and ``on_fit_end``); ``None`` = no method.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        sparsity: SparsityConfig | Mapping[str, Any] | float | None = None,
        quant: QuantConfig | Mapping[str, Any] | None = None,
        activation: str = "keep",
        optim: Any = None,
        scheduler: Any = None,
        compile: bool = False,
        gradient_checkpointing: bool = False,
        modules_to_not_convert: Sequence[str] = ("lm_head",),
        distill: DistillConfig | Mapping[str, Any] | None = None,
        method: Mapping[str, Any] | None = None,
        freeze: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if activation not in ACTIVATION_CHOICES:
            raise ValueError(f"activation={activation!r} must be one of {ACTIVATION_CHOICES}")
        if not isinstance(model, Mapping) and not is_dataclass(model):
            raise ValueError("model must be a spec dict ({'_target_': ...} or {'preset': ...})")
        if isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool):
            sparsity = {"ratio": float(sparsity)}
        # validate early (ValueError naming the field), store plain dicts for the checkpoint
        self._sparsity = SparsityConfig.from_dict(_plain(sparsity) or {"pattern": "none"})
        self._quant = QuantConfig.from_dict(_plain(quant) or {})
        self._distill = DistillConfig.from_dict(_plain(distill))
        self._method = method_from_spec(_plain(method))  # training hooks (methods/base.py)
        self.save_hyperparameters(
            {
                "model": _plain(model),
                "sparsity": self._sparsity.to_dict(),
                "quant": self._quant.to_dict(),
                "activation": activation,
                "optim": optim if callable(optim) else _plain(optim),
                "scheduler": scheduler if callable(scheduler) else _plain(scheduler),
                "compile": bool(compile),
                "gradient_checkpointing": bool(gradient_checkpointing),
                "modules_to_not_convert": list(modules_to_not_convert),
                "distill": self._distill.to_dict(),
                "method": _plain(method) or None,
                "freeze": check_freeze_patterns(_plain(freeze)),
            }
        )
        self.model: nn.Module | None = None
        self.sparsify_report: Any = None
        self.no_decay_names: frozenset[str] | None = None
        self.frozen_names: list[str] = []
        self.last_val_step: int = -1
        self.last_val_loss: float | None = None
        self._grad_norm: torch.Tensor | None = None
        self.last_val_losses: dict[str, float] = {}
        self._val_sum: dict[int, torch.Tensor] = {}
        self._val_tokens: dict[int, torch.Tensor] = {}
        self._teacher = make_teacher(self._distill)  # a plain attribute (teacher_store.py)

    # ------------------------------------------------------------------ model
    @property
    def sparsity(self) -> SparsityConfig:
        return self._sparsity

    @property
    def quant(self) -> QuantConfig:
        return self._quant

    @property
    def distill(self) -> DistillConfig:
        return self._distill

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen dense teacher (built by :meth:`on_fit_start` when distilling)."""
        return self._teacher.model

    def build_teacher(self) -> nn.Module | None:
        """The dense model of the ``model`` spec, frozen, in eval mode, on this device, in
        ``distill.teacher_dtype`` (idempotent; :class:`~qsparse.training.distill.Teacher`);
        with ``distill.teacher_logits``: opens that folder instead and returns ``None``."""
        return self._teacher.build(self.hparams["model"], self.model, self.device)

    def on_fit_start(self) -> None:
        if self._distill.enabled:
            self.build_teacher()

    def on_fit_end(self) -> None:
        if self._method is not None and self.model is not None:
            self._method.on_fit_end(self.model)

    def _resolve_vocab(self) -> None:
        spec = self.hparams["model"]
        if "vocab_size" in spec and spec["vocab_size"] is None:
            trainer = self._trainer
            dm = getattr(trainer, "datamodule", None) if trainer is not None else None
            vocab = getattr(dm, "vocab_size", None)
            if vocab is None:
                raise ValueError(
                    "model.vocab_size is null (= take it from the data) but no datamodule "
                    "with a vocab_size is attached; set model.vocab_size"
                )
            spec["vocab_size"] = int(vocab)

    def configure_model(self) -> None:
        """Build the model, apply ``qsparse.sparsify``, checkpointing and compile (once)."""
        if self.model is not None:
            return
        import qsparse

        self._resolve_vocab()
        # a sharding strategy (trainer=fsdp: FSDP2Strategy) picks the build device and shards
        strategy = getattr(self._trainer, "strategy", None) if self._trainer is not None else None
        shard = getattr(strategy, "shard_model", None)
        with strategy.model_init_context() if shard is not None else contextlib.nullcontext():
            model = build_model(self.hparams["model"])
        sparsity, activation = self._sparsity, self.hparams["activation"]
        if self._method is not None:
            sparsity, activation = self._method.training_conversion(sparsity, activation)
        # top-k at ratio 0 keeps its sparsifiers (k = d passes through): they measure the
        # zeros the activation function makes by itself (a dense ReLU² model's natural sparsity)
        dense = sparsity.pattern == "none"
        if not dense or self._quant.enabled or activation != "keep" or self._method is not None:
            convert = functools.partial(
                qsparse.sparsify,
                model,
                quant=self._quant if self._quant.enabled else None,
                activation=activation,
                modules_to_not_convert=tuple(self.hparams["modules_to_not_convert"]),
            )
            searched = sparsity.allocation != "uniform" and not sparsity.sites
            # a threshold run takes its sites' ratios from the top-k search
            first = sparsity
            if searched and sparsity.pattern == "threshold":
                first = replace(sparsity, pattern="token_topk")
            self.sparsify_report = convert(sparsity=first)
            if searched:
                found = allocate_at_build(
                    model, first, self._trainer, self.hparams["model"].get("path"),
                    with_method=self._method is not None,
                )  # fmt: skip
                sparsity = replace(found, pattern=sparsity.pattern)
                self._sparsity, self.hparams["sparsity"] = sparsity, sparsity.to_dict()
                self.sparsify_report = convert(sparsity=sparsity)
            elif not next(model.parameters()).is_meta:
                note_replaced_table(self.hparams["model"].get("path"), sparsity)
        if self._method is not None:
            self._method.on_model_configured(model)
        self.frozen_names = freeze_parameters(model, self.hparams.get("freeze") or [])
        if self.frozen_names:
            from lightning.pytorch.utilities import rank_zero_info

            count = sum(p.numel() for p in model.parameters() if not p.requires_grad)
            names = self.frozen_names
            shown = ", ".join(names[:6]) + (
                f", ... {len(names) - 6} more" if len(names) > 6 else ""
            )
            rank_zero_info(f"freeze: {count:,} parameters kept fixed ({shown})")
        # weight decay is decided by name on the unwrapped model (FSDP1 flattens parameters)
        self.no_decay_names = no_decay_names(model)
        if self.hparams["gradient_checkpointing"]:
            enable_gradient_checkpointing(model)
        if shard is not None:
            shard(model)
        if self.hparams["compile"]:
            model.compile()
        self.model = model

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        hp = checkpoint.get("hyper_parameters", {})
        vocab = hp.get("model", {}).get("vocab_size")
        if vocab is not None and self.hparams["model"].get("vocab_size", vocab) is None:
            self.hparams["model"]["vocab_size"] = vocab
        self.configure_model()

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> Any:
        """``input_ids`` [B, T] -> the model's output (``.logits`` [B, T, V], ``.loss``)."""
        if self.model is None:
            self.configure_model()
        kwargs: dict[str, Any] = {"input_ids": input_ids}
        if labels is not None:
            kwargs["labels"] = labels
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        with dynamic_sparsity():  # compile=true: a warm-up's new k does not recompile
            return self.model(**kwargs)

    def _step(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if "input_ids" not in batch or "labels" not in batch:
            raise ValueError(
                f"a batch must hold 'input_ids' and 'labels'; got keys {sorted(batch)}"
            )
        out = self(batch["input_ids"], batch["labels"], batch.get("attention_mask"))
        loss = out.loss if hasattr(out, "loss") else out["loss"]
        if loss is None:
            raise ValueError("the model returned no loss: its forward must accept labels=")
        return loss

    # --------------------------------------------------------------- training
    def _distill_step(self, batch: Mapping[str, torch.Tensor], bs: int) -> torch.Tensor:
        """Student forward + frozen teacher forward; the weighted loss of distill.py."""
        self.build_teacher()
        loss, parts = self._teacher.loss(
            lambda: self(batch["input_ids"], batch["labels"], batch.get("attention_mask")), batch
        )
        for key, value in parts.items():
            self.log(key, value, on_step=True, batch_size=bs)
        return loss

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        bs = batch["input_ids"].shape[0]
        if self._method is not None:
            for key, value in self._method.on_train_step(self.model, self.global_step).items():
                self.log(key, value, on_step=True, batch_size=bs)
        if self._distill.enabled:
            loss = self._distill_step(batch, bs)
        else:
            loss = self._step(batch)
        detached = loss.detach().float()
        self.log("train/loss", detached, on_step=True, prog_bar=True, batch_size=bs)
        self.log("train/ppl", torch.exp(detached), on_step=True, batch_size=bs)
        sched = self.lr_schedulers()
        if sched is not None:
            sched = sched[0] if isinstance(sched, list) else sched
            self.log("train/lr", float(sched.get_last_lr()[0]), on_step=True, batch_size=bs)
        else:
            lr = float(self.trainer.optimizers[0].param_groups[0]["lr"])
            self.log("train/lr", lr, on_step=True, batch_size=bs)
        return loss

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by global L2 norm (FSDP2-aware) and keep the pre-clip norm for logging."""
        if gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm":
            norm = torch.nn.utils.clip_grad_norm_(
                self.parameters(), gradient_clip_val, foreach=True
            )
        else:
            norm = total_grad_norm(self.parameters())
            if gradient_clip_val:
                self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        # FSDP2: gradients are DTensor shards and the norm a DTensor; log the full value
        self._grad_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def on_after_backward(self) -> None:
        # sparsity.pattern=threshold: each site's threshold moves towards this batch's quantile
        # (the mean over data-parallel ranks, so every rank keeps the same thresholds). Here,
        # not at the batch's end: a recomputed forward (activation checkpointing) is over, and
        # a checkpoint saved at the batch's end (callbacks run first) holds the moved values.
        if self._sparsity.pattern != "threshold":
            return
        world = self.trainer.world_size if self._trainer is not None else 1
        track_thresholds(self.model, (lambda q: self.all_gather(q).mean(0)) if world > 1 else None)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._grad_norm is not None:
            bs = batch["input_ids"].shape[0]
            self.log("train/grad_norm", self._grad_norm.float(), on_step=True, batch_size=bs)
            self._grad_norm = None

    # ------------------------------------------------------------- validation
    def _val_set_names(self) -> list[str]:
        """Metric prefix of each validation loader: the datamodule's ``val_set_names``
        (e.g. ``["val", "val_ood"]``), else ``val`` for the first and ``val_<i>`` after."""
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        return list(getattr(dm, "val_set_names", None) or ["val"])

    def on_validation_epoch_start(self) -> None:
        self._val_sum = {}
        self._val_tokens = {}

    def validation_step(
        self, batch: Mapping[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        loss = self._step(batch)
        n = (batch["labels"][:, 1:] != -100).sum()
        zero = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_sum[dataloader_idx] = self._val_sum.get(dataloader_idx, zero) + (
            loss.detach().double() * n
        )
        self._val_tokens[dataloader_idx] = self._val_tokens.get(dataloader_idx, zero) + n

    def on_validation_epoch_end(self) -> None:
        """Log ``<prefix>/loss`` (token-weighted mean over the set and all ranks) and
        ``<prefix>/ppl`` per validation loader; the first is ``val``."""
        if self.trainer.sanity_checking:
            return
        names = self._val_set_names()
        n_loaders = max([len(names), *(i + 1 for i in self._val_tokens)])
        for idx in range(n_loaders):
            prefix = names[idx] if idx < len(names) else f"val_{idx}"
            zero = torch.zeros((), device=self.device, dtype=torch.float64)
            # every rank reduces every loader, also one that saw no batch on this rank
            total = self.trainer.strategy.reduce(self._val_sum.get(idx, zero), reduce_op="sum")
            tokens = self.trainer.strategy.reduce(self._val_tokens.get(idx, zero), reduce_op="sum")
            if float(tokens) == 0:
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(f"validation set {prefix!r} saw no target tokens: not logged")
                continue
            mean = (total / tokens).float()
            self.log(f"{prefix}/loss", mean, sync_dist=False, prog_bar=idx == 0)
            self.log(f"{prefix}/ppl", torch.exp(mean), sync_dist=False)
            self.last_val_losses[prefix] = float(mean)
            if idx == 0:
                self.last_val_step = self.global_step
                self.last_val_loss = float(mean)

    # -------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> dict[str, Any]:
        if self.model is None:
            self.configure_model()
        return configure_optimization(
            self.model,
            self.hparams["optim"],
            self.hparams["scheduler"],
            self.no_decay_names,
            on_cuda=self.device.type == "cuda",
            total_steps=lambda: int(self.trainer.estimated_stepping_batches),
        )
