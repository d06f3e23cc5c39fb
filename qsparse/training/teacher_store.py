"""Teacher top-K logits on disk: the file format, the settings that must match, the reader
and the teacher that reads them.

``qsparse-teacher-logits`` (:mod:`qsparse.cli.teacher_logits`) runs the dense teacher once
over every training sample a run will draw and writes, per token position, its K largest
logits; a run with ``distill.teacher_logits=PATH`` then reads them instead of running the
teacher (:class:`StoredTeacher`, the loss :func:`~qsparse.training.distill_loss.
sparse_kl_distill_loss`).

Sample key: the dataset index ``sample_index`` that every map-style training batch carries
(:mod:`qsparse.data.resumable`). The teacher's output for a sample depends on its tokens
only, so one entry serves every epoch, rank, accumulation step and restart that draws it.
Every entry also stores a checksum of its tokens (:func:`sample_checksum`), compared on
every read.

Layout of ``PATH`` (shard ``i`` = rows ``[i*S, (i+1)*S)`` of the samples in first-use order;
``N`` rows in a shard, ``T`` = ``data.seq_len``, ``K`` = ``distill.teacher_top_k``)::

    samples-<i>.npy   int64 [N]       dataset index of each row
    checksum-<i>.npy  int64 [N]       sample_checksum of its tokens
    values-<i>.npy    float16 [N,T,K] top-K teacher logits minus the position's largest
    indices-<i>.npy   int32 [N,T,K]   their token ids
    lse-<i>.npy       float32 [N,T]   log sum_v exp(z_v / T_distill) of the same shifted logits
    manifest.json     written last: format, settings, coverage, shard list

Positions past a sample's length (padded SFT rows) hold zeros. Disk per token:
``K * (2 + 4) + 4`` bytes (388 at K = 64; 1.6 MB per 4,096-token sample). Every file is
written with :mod:`qsparse.io` (atomic), so a killed writer leaves whole shards and no
manifest; it restarts after the last whole shard.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qsparse.errors import UserError
from qsparse.io import atomic_save_npy, atomic_write_text

from .distill import DistillConfig, Teacher
from .distill_loss import sparse_kl_distill_loss

__all__ = [
    "FORMAT",
    "StoredTeacher",
    "TeacherLogits",
    "TeacherLogitsError",
    "check_manifest",
    "check_map_style",
    "check_run",
    "make_teacher",
    "micro_batches",
    "read_manifest",
    "sample_checksum",
    "store_settings",
    "visited_samples",
    "world_size",
    "write_manifest",
    "write_shard",
]

FORMAT = "qsparse-teacher-logits-1"
# data keys that change neither the training samples nor their order
_DATA_KEYS_IGNORED = ("num_workers", "cache_dir", "val_batch_size", "ood_val", "ood_val_tokens")
_MODEL_KEYS_IGNORED = ("gradient_checkpointing",)  # recomputation, same outputs
_ARRAYS = ("samples", "checksum", "values", "indices", "lse")


class TeacherLogitsError(UserError):
    """A teacher-logits folder that does not serve this run: names the setting and the fix."""


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for key in sorted(value):
            _flatten(f"{prefix}.{key}", value[key], out)
    else:
        out[prefix] = list(value) if isinstance(value, (list, tuple)) else value


def world_size(trainer: Mapping[str, Any]) -> int:
    """Processes of the run: ``trainer.devices`` (an int or a list) x ``trainer.num_nodes``."""
    devices = trainer.get("devices", 1)
    if isinstance(devices, (list, tuple)):
        devices = len(devices)
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise TeacherLogitsError(
            f"trainer.devices={devices!r}: teacher logits on disk need the number of devices "
            "to know the data order; set trainer.devices to a number"
        )
    return devices * int(trainer.get("num_nodes", 1) or 1)


def micro_batches(container: Mapping[str, Any]) -> int:
    """Batches each rank draws in the run: ``trainer.max_steps x accumulate_grad_batches``."""
    trainer = container.get("trainer") or {}
    steps = trainer.get("max_steps", -1)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise TeacherLogitsError(
            f"trainer.max_steps={steps!r}: teacher logits on disk cover a fixed number of "
            "steps; set trainer.max_steps"
        )
    return steps * int(trainer.get("accumulate_grad_batches") or 1)


def store_settings(container: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that fix the samples, their order and the stored values, flattened to
    ``{"data.seq_len": 64, "model.path": ..., ...}``: the ``data`` and ``model`` nodes
    (without keys that change neither samples nor outputs), ``distill.temperature``,
    ``distill.teacher_top_k``, ``distill.teacher_path`` when set, and the world size (``trainer.devices x trainer.num_nodes``)."""
    out: dict[str, Any] = {}
    for group, ignored in (("data", _DATA_KEYS_IGNORED), ("model", _MODEL_KEYS_IGNORED)):
        node = container.get(group) or {}
        _flatten(group, {k: v for k, v in node.items() if k not in ignored}, out)
    distill = container.get("distill") or {}
    out["distill.temperature"] = float(distill.get("temperature", 1.0))
    out["distill.teacher_top_k"] = int(distill.get("teacher_top_k", 64))
    if distill.get("teacher_path") is not None:  # another teacher's logits (distill.py)
        out["distill.teacher_path"] = str(distill["teacher_path"])
    out["trainer.devices x trainer.num_nodes"] = world_size(container.get("trainer") or {})
    return out


def sample_checksum(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """LongTensor[B]: ``sum_t m_t (x_t + 1) (t + 1)`` over the tokens ``x`` of each row
    (``m`` the attention mask, 1 without one): independent of right padding."""
    pos = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device, dtype=torch.long)
    weighted = (input_ids.long() + 1) * pos
    if attention_mask is not None:
        weighted = weighted * attention_mask.long()
    return weighted.sum(-1)


def visited_samples(
    n: int, batch_size: int, world: int, shuffle: bool, seed: int, micro: int
) -> np.ndarray:
    """Dataset indices a run draws in ``micro`` batches per rank, each once, in first-use
    order: the first ``micro * batch_size * world`` entries of the resumable sampler's
    global order, epoch after epoch (:class:`~qsparse.data.resumable.ResumableSampler`)."""
    from qsparse.data.resumable import ResumableSampler

    sampler = ResumableSampler(n, batch_size, None, shuffle=shuffle, seed=seed, num_replicas=world)
    need, parts, epoch = micro * batch_size * world, [], 0
    while need > 0 and sampler.total_size > 0:
        order = sampler.epoch_order(epoch).numpy()[:need]
        parts.append(order)
        need -= len(order)
        epoch += 1
    drawn = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    _, first = np.unique(drawn, return_index=True)
    return drawn[np.sort(first)].astype(np.int64)


def write_shard(folder: Path, shard: int, arrays: Mapping[str, np.ndarray]) -> list[str]:
    """Write shard ``shard``'s arrays (``samples``, ``checksum``, ``values``, ``indices``,
    ``lse``), each atomically, ``samples`` last (its presence marks a whole shard); return
    the file names."""
    names = []
    for key in (*_ARRAYS[1:], _ARRAYS[0]):
        name = f"{key}-{shard:05d}.npy"
        atomic_save_npy(folder / name, arrays[key])
        names.append(name)
    return names


def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> None:
    """``folder/manifest.json`` (atomic; its presence marks a complete folder)."""
    atomic_write_text(folder / "manifest.json", json.dumps(dict(manifest), indent=1))


def read_manifest(path: str | Path, setting: str = "distill.teacher_logits") -> dict[str, Any]:
    """The manifest of a complete folder, or :class:`TeacherLogitsError` naming ``setting``."""
    file = Path(path) / "manifest.json"
    if not file.is_file():
        raise TeacherLogitsError(
            f"{setting}={path}: no manifest.json there (missing or unfinished); write it with "
            "qsparse-teacher-logits and the run's overrides"
        )
    manifest = json.loads(file.read_text())
    if manifest.get("format") != FORMAT:
        raise TeacherLogitsError(
            f"{setting}={path}: format {manifest.get('format')!r} is not {FORMAT!r}; rewrite it "
            "with this version's qsparse-teacher-logits"
        )
    return manifest


def check_manifest(path: Path, manifest: Mapping[str, Any], container: Mapping[str, Any]) -> None:
    """Raise :class:`TeacherLogitsError` naming the first setting of the run (``container``,
    resolved) that differs from the manifest's, or ``trainer.max_steps`` when the run draws
    more batches than the folder covers."""
    stored, mine = manifest["settings"], store_settings(container)
    for key in sorted(set(stored) | set(mine)):
        if stored.get(key, "<unset>") != mine.get(key, "<unset>"):
            raise TeacherLogitsError(
                f"distill.teacher_logits={path} was written with {key}="
                f"{stored.get(key, '<unset>')!r}, this run has {key}="
                f"{mine.get(key, '<unset>')!r}: rerun qsparse-teacher-logits with this run's "
                "overrides, or use the same setting"
            )
    need, have = micro_batches(container), int(manifest["micro_batches"])
    if need > have:
        raise TeacherLogitsError(
            f"distill.teacher_logits={path} covers {have} batches per rank, this run draws "
            f"{need} (trainer.max_steps x accumulate_grad_batches): lower trainer.max_steps "
            "or rerun qsparse-teacher-logits with this run's overrides"
        )


def check_map_style(container: Mapping[str, Any]) -> None:
    """Streaming data has no sample index to key stored logits by: refuse it."""
    if (container.get("data") or {}).get("streaming"):
        raise TeacherLogitsError(
            "distill.teacher_logits needs training samples with a stable index and "
            "data.streaming=true has none: set data.streaming=false"
        )


def check_run(container: Mapping[str, Any], datamodule: Any = None) -> None:
    """The checks :func:`qsparse.training.train` runs before writing anything when
    ``distill.teacher_logits`` is set: the manifest against the run's settings
    (:func:`check_manifest`) and, given the (prepared) ``datamodule``, its training data:
    the number of samples and the tokens of the first stored sample."""
    path = (container.get("distill") or {}).get("teacher_logits")
    if path is None:
        return
    check_map_style(container)
    manifest = read_manifest(path)
    check_manifest(Path(path), manifest, container)
    if datamodule is None:
        return
    loader = datamodule.train_dataloader()
    n = len(loader.dataset)
    if n != int(manifest["num_samples"]) or not manifest["shards"]:
        raise TeacherLogitsError(
            f"distill.teacher_logits={path} was written for {manifest['num_samples']} training "
            f"samples, this run's data has {n}: the data changed; rerun qsparse-teacher-logits"
        )
    first = int(np.load(Path(path) / "samples-00000.npy", mmap_mode="r")[0])
    want = int(np.load(Path(path) / "checksum-00000.npy", mmap_mode="r")[0])
    batch = loader.collate_fn([loader.dataset[first]])
    if int(sample_checksum(batch["input_ids"], batch.get("attention_mask"))[0]) != want:
        raise TeacherLogitsError(
            f"distill.teacher_logits={path}: training sample {first} has other tokens than "
            "when the folder was written (data files or tokenizer changed); rerun "
            "qsparse-teacher-logits"
        )


class TeacherLogits:
    """Read side of a teacher-logits folder (memory-mapped shards).

    Args:
        path: the folder.
        container: the run's resolved config: :meth:`check` compares its settings with the
            manifest's (``None``: no check).
    """

    def __init__(self, path: str | Path, container: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if container is not None:
            self.check(container)
        self._shards = [
            {key: np.load(self.path / f"{key}-{i:05d}.npy", mmap_mode="r") for key in _ARRAYS}
            for i in range(len(self.manifest["shards"]))
        ]
        samples = [np.asarray(s["samples"]) for s in self._shards]
        where = [(np.full(len(x), i), np.arange(len(x))) for i, x in enumerate(samples)]
        keys = np.concatenate(samples) if samples else np.zeros(0, dtype=np.int64)
        self._order = np.argsort(keys, kind="stable")
        self._keys = keys[self._order]
        self._shard_of = np.concatenate([w[0] for w in where])[self._order]
        self._row_of = np.concatenate([w[1] for w in where])[self._order]

    @property
    def top_k(self) -> int:
        return int(self.manifest["top_k"])

    def check(self, container: Mapping[str, Any]) -> None:
        """:func:`check_manifest` of this folder against ``container``."""
        check_manifest(self.path, self.manifest, container)

    def lookup(
        self, sample_index: torch.Tensor, checksum: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(values float16 [B, L, K], indices int32 [B, L, K], lse float32 [B, L])`` of the
        samples ``sample_index`` [B], first ``length`` positions, on the CPU. Raises
        :class:`TeacherLogitsError` for a sample that is not stored or whose tokens differ."""
        idx = sample_index.cpu().numpy()
        pos = np.searchsorted(self._keys, idx)
        found = (pos < len(self._keys)) & (self._keys[np.minimum(pos, len(self._keys) - 1)] == idx)
        if not found.all():
            missing = int(idx[~found][0])
            raise TeacherLogitsError(
                f"distill.teacher_logits={self.path} holds no entry for training sample "
                f"{missing}: the run's data order differs from the one it was written for; "
                "rerun qsparse-teacher-logits with this run's overrides"
            )
        sums = checksum.cpu().numpy()
        out: dict[str, list[np.ndarray]] = {"values": [], "indices": [], "lse": []}
        for j, p in enumerate(pos):
            shard, row = self._shards[int(self._shard_of[p])], int(self._row_of[p])
            if int(shard["checksum"][row]) != int(sums[j]):
                raise TeacherLogitsError(
                    f"distill.teacher_logits={self.path}: training sample {int(idx[j])} has "
                    "other tokens than when the folder was written (data files or tokenizer "
                    "changed); rerun qsparse-teacher-logits"
                )
            for key in out:
                out[key].append(np.asarray(shard[key][row, :length]))
        return tuple(torch.from_numpy(np.stack(out[k])) for k in ("values", "indices", "lse"))


class StoredTeacher(Teacher):
    """The teacher read from disk (``distill.teacher_logits``): the same loss as
    :class:`Teacher` with :func:`sparse_kl_distill_loss` on the stored top-K of each batch's
    samples (keyed by the batch's ``sample_index``); no teacher model is built."""

    def __init__(self, cfg: DistillConfig) -> None:
        super().__init__(cfg)
        self.store: TeacherLogits | None = None

    def build(
        self, spec: Mapping[str, Any], student: nn.Module | None, device: torch.device
    ) -> None:  # type: ignore[override]
        """Open the folder (once) and check that it was written with this temperature and K."""
        if self.store is not None:
            return
        store = TeacherLogits(str(self.cfg.teacher_logits))
        stored = store.manifest["settings"]
        for key, mine in (
            ("distill.temperature", float(self.cfg.temperature)),
            ("distill.teacher_top_k", int(self.cfg.teacher_top_k)),
        ):
            if stored[key] != mine:
                raise TeacherLogitsError(
                    f"distill.teacher_logits={store.path} was written with {key}={stored[key]!r}"
                    f", this run has {key}={mine!r}: use the same value or rerun "
                    "qsparse-teacher-logits"
                )
        self.store = store

    def _kl(self, student_logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.store is None:
            self.build({}, None, student_logits.device)
        if "sample_index" not in batch:
            raise TeacherLogitsError(
                "distill.teacher_logits needs batches that name their samples (map-style "
                "training data): set data.streaming=false"
            )
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        values, indices, lse = self.store.lookup(
            batch["sample_index"], sample_checksum(ids, mask), ids.shape[1]
        )
        dev = student_logits.device
        return sparse_kl_distill_loss(
            student_logits,
            values.to(dev, non_blocking=True),
            indices.to(dev, non_blocking=True),
            lse.to(dev, non_blocking=True),
            batch["labels"],
            self.cfg.temperature,
        )


def make_teacher(cfg: DistillConfig) -> Teacher:
    """:class:`StoredTeacher` with ``distill.teacher_logits`` set, else :class:`Teacher`."""
    return StoredTeacher(cfg) if cfg.teacher_logits is not None else Teacher(cfg)
