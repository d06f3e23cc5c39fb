"""Fully sharded data parallel (FSDP2) built from config: ``trainer=fsdp`` / ``trainer=fsdp_cpu``.

:class:`FSDP2Strategy` is Lightning's ``ModelParallelStrategy`` (FSDP2, ``fully_shard``, one
DTensor shard of every parameter per rank) restricted to data parallelism: the device mesh is
one dimension over all ``W = num_nodes * devices`` ranks (``HYBRID_SHARD``: ``num_nodes x
devices``, replicated across nodes, sharded within a node). Sharding happens in
:meth:`FSDP2Strategy.shard_model`, which :meth:`qsparse.training.LMModule.configure_model`
calls after ``qsparse.sparsify`` and after the optimizer's decay/no-decay groups were decided
by parameter name (:func:`qsparse.training.optim.no_decay_names`): each decoder layer (any
module class named ``*DecoderLayer``) is one FSDP unit, the root (embeddings, final norm,
lm_head, tied or not) another.

Parameters keep their names and logical shapes (DTensors), so state dicts, ``p.ndim`` and
parameter counts read as on one device. Checkpoints: with ``save_distributed_checkpoint``
(default) ``last.ckpt`` is a folder written by every rank (``torch.distributed.checkpoint``
shards plus Lightning's ``meta.pt``), written to ``last.ckpt.tmp-<pid>`` first and swapped in
by rank zero, so an interrupted save never leaves a half-written ``last.ckpt``; otherwise a
single full file assembled on rank zero. Resume reads either. The transformers export gathers
the full state dict over all ranks (:func:`full_state_dict`) and writes it from rank zero.

Mixed precision: ``precision=bf16-mixed`` autocasts as on one GPU; parameters, gradients and
their reductions stay fp32, so a step computes what DDP computes.

Mapping of the FSDP1 settings the config keeps: ``sharding_strategy`` ``FULL_SHARD`` ->
``reshard_after_forward=True``, ``SHARD_GRAD_OP`` -> ``False`` (parameters stay gathered from
forward to backward: faster, more memory), ``HYBRID_SHARD`` -> 2-D mesh; ``cpu_offload`` ->
``CPUOffloadPolicy`` (parameters, gradients and optimizer state in host memory);
``activation_checkpointing`` -> recompute each decoder layer in backward.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from ..io import swap_in

SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD")


def _is_decoder_layer(module: nn.Module) -> bool:
    """One FSDP unit per transformer block: any module class named ``*DecoderLayer``
    (qsparse Llama, HF Llama/Mistral/Qwen2)."""
    return type(module).__name__.endswith("DecoderLayer")


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning ``ModelParallelStrategy`` doing FSDP2 data parallelism only (module docstring).

    Args:
        sharding_strategy: ``FULL_SHARD`` | ``SHARD_GRAD_OP`` | ``HYBRID_SHARD``.
        activation_checkpointing: recompute decoder layers in backward.
        cpu_offload: keep parameters, gradients and optimizer state in host memory.
        save_distributed_checkpoint: one shard per rank (a folder) instead of a full file.
        process_group_backend: ``nccl`` (GPU default) or ``gloo`` (CPU).
    """

    def __init__(
        self,
        sharding_strategy: str = "FULL_SHARD",
        activation_checkpointing: bool = False,
        cpu_offload: bool = False,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        if sharding_strategy not in SHARDING_STRATEGIES:
            hint = " (NO_SHARD is plain data parallelism: use trainer=ddp)"
            raise ValueError(
                f"trainer.strategy.sharding_strategy={sharding_strategy!r} must be one of "
                f"{SHARDING_STRATEGIES}" + (hint if sharding_strategy == "NO_SHARD" else "")
            )
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            **kwargs,
        )
        self.sharding_strategy = sharding_strategy
        self.activation_checkpointing = bool(activation_checkpointing)
        self.cpu_offload = bool(cpu_offload)
        self._shard_mesh: Any = None

    # ------------------------------------------------------------------ setup
    def setup_environment(self) -> None:
        """Process group, then a data-parallel mesh over every rank (no tensor parallelism)."""
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()
        mesh = self.device_mesh
        if self.sharding_strategy == "HYBRID_SHARD":
            from torch.distributed.device_mesh import init_device_mesh

            self._shard_mesh = init_device_mesh(
                self.root_device.type,
                (self.num_nodes, self.num_processes),
                mesh_dim_names=("replicate", "shard"),
            )
        else:
            self._shard_mesh = mesh["data_parallel"]

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Every rank is a data-parallel replica."""
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    @contextmanager
    def model_init_context(self) -> Iterator[None]:
        """Build the model on this rank's device (a 7B model initialises in seconds on a GPU,
        minutes on the CPU); :meth:`shard_model` then frees all but this rank's shard."""
        if self.root_device.type == "cuda" and not self.cpu_offload:
            with torch.device(self.root_device):
                yield
        else:
            yield

    def shard_model(self, model: nn.Module) -> nn.Module:
        """``fully_shard`` every decoder layer, then the root (in place); returns ``model``."""
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        if self._shard_mesh is None:
            raise RuntimeError("FSDP2Strategy.shard_model called before the process group exists")
        if self.activation_checkpointing:
            from ..models.checkpointing import enable_gradient_checkpointing

            enable_gradient_checkpointing(model)
        kwargs: dict[str, Any] = {
            "mesh": self._shard_mesh,
            "reshard_after_forward": self.sharding_strategy != "SHARD_GRAD_OP",
        }
        if self.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        layers = [m for m in model.modules() if _is_decoder_layer(m)]
        if not layers:
            raise ValueError(
                "trainer=fsdp shards one decoder layer per unit, but the model has no module "
                "class named *DecoderLayer; use trainer=ddp for this model"
            )
        for layer in layers:
            fully_shard(layer, **kwargs)
        # The root keeps its parameters (embeddings, final norm, lm_head) gathered from forward
        # to backward: FSDP2 re-gathers a resharded unit in a hook on the unit's outputs, and
        # the root's output (qsparse's CausalLMOutput dataclass) is not a pytree it can hook.
        # On 2 x H200 (torch 2.11) resharding the root read freed memory in backward.
        fully_shard(model, **{**kwargs, "reshard_after_forward": False})
        return model

    # ------------------------------------------------------------- checkpoints
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None
    ) -> None:
        """Write a sharded checkpoint to ``<path>.tmp-<pid>`` and swap it in (rank zero)."""
        if not self._save_distributed_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        path = Path(self.broadcast(str(filepath)))
        tmp = Path(self.broadcast(str(path.with_name(f"{path.name}.tmp-{os.getpid()}"))))
        if self.is_global_zero and tmp.exists():
            shutil.rmtree(tmp)
        self.barrier("qsparse-ckpt-tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("qsparse-ckpt-written")
        if self.is_global_zero:
            swap_in(tmp, path)
        self.barrier("qsparse-ckpt-swapped")

    def remove_checkpoint(self, filepath: Any) -> None:
        """Delete a checkpoint file or sharded folder (rank zero)."""
        if self.is_global_zero:
            path = Path(filepath)
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of an FSDP2 model on the CPU (a collective: call it on every
    rank; rank zero gets the tensors, the others an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def fsdp_strategy(
    sharding_strategy: str = "FULL_SHARD",
    activation_checkpointing: bool = False,
    cpu_offload: bool = False,
    **kwargs: Any,
) -> FSDP2Strategy:
    """The ``trainer.strategy._target_`` of ``conf/trainer/fsdp.yaml`` (kept for configs that
    name it): an :class:`FSDP2Strategy`."""
    return FSDP2Strategy(
        sharding_strategy=sharding_strategy,
        activation_checkpointing=activation_checkpointing,
        cpu_offload=cpu_offload,
        **kwargs,
    )
