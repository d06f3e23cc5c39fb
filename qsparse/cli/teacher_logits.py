"""``qsparse-teacher-logits`` (or ``python -m qsparse.cli.teacher_logits``): run the dense
teacher once over a run's training samples and write its top-K logits to disk, so that the
run distills from them without loading the teacher (``distill=logits_from_disk``).

    qsparse-teacher-logits recipe=continue/mistral7b distill=logits_from_disk \\
        distill.teacher_logits=/data/t7b trainer.max_steps=2000
    qsparse-train          recipe=continue/mistral7b distill=logits_from_disk \\
        distill.teacher_logits=/data/t7b trainer.max_steps=2000

The arguments are ``qsparse-train``'s overrides, composed into the same training config, so
the samples are exactly those the run draws: ``trainer.max_steps x accumulate_grad_batches``
batches of ``data.batch_size`` on each of ``trainer.devices x trainer.num_nodes`` ranks
(:func:`~qsparse.training.teacher_store.visited_samples`), each sample written once. The
teacher is the dense ``model`` in ``distill.teacher_dtype`` on one device (the first CUDA GPU,
else the CPU). File format, sample key and checks: :mod:`qsparse.training.teacher_store`;
the loss: :func:`~qsparse.training.distill_loss.sparse_kl_distill_loss`. A killed writer is
restarted by the same command and continues after its last whole shard. A user's mistake
prints one line ``qsparse-teacher-logits: <what is wrong and how to fix it>`` (status 2)
before anything is written.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qsparse.env_flags import check_env_flags
from qsparse.errors import UserError, full_traceback_requested, report
from qsparse.io import atomic_write_text
from qsparse.training.teacher_store import (
    FORMAT,
    TeacherLogitsError,
    check_map_style,
    micro_batches,
    read_manifest,
    sample_checksum,
    store_settings,
    visited_samples,
    write_manifest,
    write_shard,
)

PROG = "qsparse-teacher-logits"


@torch.no_grad()
def teacher_top_k(
    teacher: torch.nn.Module, batch: Mapping[str, torch.Tensor], k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values [B, L, K] fp16, indices [B, L, K] int32, lse [B, L] fp32)`` of a batch:
    the K largest teacher logits minus each position's largest, their ids, and
    ``logsumexp((z - max z) / T)`` over the vocabulary; zeros where ``attention_mask`` is 0."""
    kwargs = {"input_ids": batch["input_ids"]}
    if batch.get("attention_mask") is not None:
        kwargs["attention_mask"] = batch["attention_mask"]
    logits = teacher(**kwargs).logits
    if k > logits.shape[-1]:
        raise TeacherLogitsError(
            f"distill.teacher_top_k={k} exceeds the teacher's vocabulary ({logits.shape[-1]}): "
            f"set distill.teacher_top_k={logits.shape[-1]} or less"
        )
    out: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for row in logits:  # one fp32 copy of [L, V] at a time (7B: 0.5 GB per 4k tokens)
        z = row.float()
        z = z - z.amax(-1, keepdim=True)
        values, indices = z.topk(k, dim=-1)
        out.append((values, indices, torch.logsumexp(z / temperature, dim=-1)))
    values, indices, lse = (torch.stack(x) for x in zip(*out, strict=True))
    mask = batch.get("attention_mask")
    if mask is not None:
        keep = mask.bool()
        values, lse = values * keep.unsqueeze(-1), lse * keep
        indices = indices * keep.unsqueeze(-1)
    return values.half(), indices.int(), lse


def _plan(container: Mapping[str, Any], settings: dict[str, Any], shard_samples: int) -> str:
    import json

    micro = micro_batches(container)
    return json.dumps({"settings": settings, "micro_batches": micro, "shard": shard_samples})


def write_teacher_logits(
    cfg: Any, shard_samples: int = 256, device: str | torch.device | None = None
) -> Path:
    """Write the teacher-logits folder ``distill.teacher_logits`` of the composed training
    config ``cfg`` (see the module docstring); return it. ``shard_samples``: samples per
    shard file. Every check runs before the first write."""
    from qsparse.training.distill import DistillConfig, Teacher
    from qsparse.training.run import _build_datamodule, check_config

    container = check_config(cfg)
    dcfg = DistillConfig.from_dict(container.get("distill"))
    if dcfg.teacher_logits is None:
        raise TeacherLogitsError(
            "distill.teacher_logits is not set: give the folder to write, e.g. "
            "distill=logits_from_disk distill.teacher_logits=/data/teacher"
        )
    check_map_style(container)
    folder = Path(dcfg.teacher_logits)
    settings, micro = store_settings(container), micro_batches(container)
    world = settings["trainer.devices x trainer.num_nodes"]
    plan = _plan(container, settings, shard_samples)
    if (folder / "manifest.json").is_file():
        done = read_manifest(folder)
        if done["settings"] == settings and int(done["micro_batches"]) >= micro:
            print(f"{PROG}: {folder} is complete for these settings; nothing to do")
            return folder
        raise TeacherLogitsError(
            f"distill.teacher_logits={folder} holds teacher logits of other settings: "
            "remove it or choose another folder"
        )
    if (folder / "plan.json").is_file() and (folder / "plan.json").read_text() != plan:
        raise TeacherLogitsError(
            f"distill.teacher_logits={folder} holds an unfinished folder of other settings: "
            "remove it or choose another folder"
        )
    if folder.exists() and not (folder / "plan.json").is_file() and any(folder.iterdir()):
        raise TeacherLogitsError(
            f"distill.teacher_logits={folder} exists and is not a teacher-logits folder: "
            "choose another folder"
        )

    dm = _build_datamodule(container.get("data"))
    dm.prepare_data()
    loader = dm.train_dataloader()
    dataset, collate = loader.dataset, loader.collate_fn
    spec = dict(container["model"])
    if "vocab_size" in spec and spec["vocab_size"] is None:
        spec["vocab_size"] = int(dm.vocab_size)
    order = visited_samples(len(dataset), dm.batch_size, world, dm.shuffle, dm.shuffle_seed, micro)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher = Teacher(DistillConfig(mode="logits", kl_weight=1.0, teacher_dtype=dcfg.teacher_dtype))
    model = teacher.build(spec, None, dev)
    k, temp, seq_len = dcfg.teacher_top_k, float(dcfg.temperature), int(dm.seq_len)
    # the first batch checks K against the vocabulary before anything is written
    teacher_top_k(model, _batch(dataset, collate, order[:1], dev), k, temp)

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "plan.json", plan)
    shards = []
    for start in range(0, len(order), shard_samples):
        rows = order[start : start + shard_samples]
        i = len(shards)
        shards.append({"rows": len(rows)})
        if (folder / f"samples-{i:05d}.npy").is_file():
            continue  # written whole by an earlier, interrupted call
        arrays = {
            "samples": rows,
            "checksum": np.zeros(len(rows), dtype=np.int64),
            "values": np.zeros((len(rows), seq_len, k), dtype=np.float16),
            "indices": np.zeros((len(rows), seq_len, k), dtype=np.int32),
            "lse": np.zeros((len(rows), seq_len), dtype=np.float32),
        }
        for a in range(0, len(rows), dm.batch_size):
            batch = _batch(dataset, collate, rows[a : a + dm.batch_size], dev)
            values, indices, lse = teacher_top_k(model, batch, k, temp)
            b, n = values.shape[:2]
            arrays["values"][a : a + b, :n] = values.cpu().numpy()
            arrays["indices"][a : a + b, :n] = indices.cpu().numpy()
            arrays["lse"][a : a + b, :n] = lse.cpu().numpy()
            sums = sample_checksum(batch["input_ids"], batch.get("attention_mask"))
            arrays["checksum"][a : a + b] = sums.cpu().numpy()
        write_shard(folder, i, arrays)
        print(f"{PROG}: shard {i}: {start + len(rows)}/{len(order)} samples", flush=True)
    write_manifest(
        folder,
        {
            "format": FORMAT,
            "settings": settings,
            "micro_batches": micro,
            "num_samples": len(dataset),
            "samples": len(order),
            "seq_len": seq_len,
            "top_k": k,
            "temperature": temp,
            "teacher_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "bytes_per_token": k * (2 + 4) + 4,
            "shards": shards,
        },
    )
    gb = len(order) * seq_len * (k * 6 + 4) / 1e9
    print(
        f"{PROG}: wrote {len(order)} samples x {seq_len} tokens x top-{k} ({gb:.2f} GB) to {folder}"
    )
    return folder


def _batch(
    dataset: Any, collate: Any, rows: Sequence[int], device: torch.device
) -> dict[str, torch.Tensor]:
    batch = collate([dataset[int(j)] for j in rows])
    return {key: value.to(device) for key, value in batch.items()}


def compose(overrides: Sequence[str]) -> Any:
    """The training config ``qsparse-train`` composes from ``overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from qsparse.training import config as _schemas  # noqa: F401  (registers train_schema)

    with initialize_config_module("qsparse.conf", version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides))


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry: ``qsparse-train``'s overrides in, the folder written."""
    from hydra.errors import HydraException

    from qsparse.training.console import quiet_libraries

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return
    quiet_libraries()
    try:
        check_env_flags()  # QSPARSE_KERNELS and the other on/off settings: 1 or 0
        write_teacher_logits(compose(args))
    except (UserError, HydraException) as exc:  # a bad value, or a key Hydra cannot compose
        if full_traceback_requested():
            raise
        raise SystemExit(report(PROG, exc)) from None


if __name__ == "__main__":
    main()
