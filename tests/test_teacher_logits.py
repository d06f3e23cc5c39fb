"""Teacher top-K logits on disk (qsparse/training/teacher_store.py, distill.StoredTeacher,
qsparse-teacher-logits): the sparse KL against hand computations and the live teacher, the
sample key under resume, the manifest checks and a 2-step run of the continue recipe."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VOCAB, tiny_run_config

from qsparse.cli.teacher_logits import main as teacher_logits_main
from qsparse.cli.teacher_logits import write_teacher_logits
from qsparse.training.callbacks import SimulatedCrash
from qsparse.training.distill_loss import kl_distill_loss, sparse_kl_distill_loss
from qsparse.training.metrics_csv import read_metrics
from qsparse.training.module import LMModule
from qsparse.training.run import _build_datamodule, train
from qsparse.training.teacher_store import TeacherLogitsError, visited_samples


def _cfg(ckpt: Path, tmp_path: Path, *extra: str, run: str = "run"):
    """recipe=continue/tiny with distill=logits_from_disk on the tiny checkpoint."""
    return tiny_run_config(
        "continue/tiny",
        ckpt,
        tmp_path,
        "data.max_documents=200",
        "data.seq_len=32",
        "data.batch_size=4",
        "distill=logits_from_disk",
        f"distill.teacher_logits={tmp_path / 'teacher'}",
        "export=false",
        "trainer.max_steps=6",
        "trainer.val_check_interval=6",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "callbacks.checkpoint.every_n_train_steps=3",
        *extra,
        run=run,
    )


def _softmax64(row, temp: float) -> list[float]:
    zs = [float(x) / temp for x in row]
    total = sum(math.exp(z) for z in zs)
    return [math.exp(z) / total for z in zs]


def _sparse_kl_by_hand(s, t, k: int, labels, temp: float) -> float:
    """Float64: T^2 * mean over predicting positions of the KL between the teacher and the
    student distributions after merging the tokens outside the teacher's top k into one
    bucket."""
    b, n, v = s.shape
    rows = [(i, j) for i in range(b) for j in range(n - 1) if int(labels[i, j + 1]) != -100]
    kls = []
    for i, j in rows:
        p, q = _softmax64(t[i, j], temp), _softmax64(s[i, j], temp)
        top = sorted(range(v), key=lambda u: -p[u])[:k]
        rest = [u for u in range(v) if u not in top]
        buckets = [[u] for u in top] + ([rest] if rest else [])
        kl = 0.0
        for members in buckets:
            pb, qb = sum(p[u] for u in members), sum(q[u] for u in members)
            kl += pb * math.log(pb / qb)
        kls.append(kl)
    return temp**2 * sum(kls) / len(kls)


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_sparse_kl_matches_hand_computation_and_full_kl(temp: float) -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 7, generator=g) * 2
    t = torch.randn(2, 5, 7, generator=g) * 2
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, 2] = -100
    shift = 3.0  # stored logits may carry any per-position shift
    lse = torch.logsumexp((t - shift) / temp, dim=-1)
    for k in (1, 3):
        values, indices = (t - shift).topk(k, dim=-1)
        got = sparse_kl_distill_loss(s, values, indices.int(), lse, labels, temp)
        assert float(got) == pytest.approx(_sparse_kl_by_hand(s, t, k, labels, temp), rel=1e-5)
        assert 0 < float(got) < float(kl_distill_loss(s, t, labels, temp))
    # K = V: the bucket is empty and the loss is the full KL
    values, indices = (t - shift).topk(7, dim=-1)
    s.requires_grad_(True)
    full = sparse_kl_distill_loss(s, values, indices, lse, labels, temp)
    want = kl_distill_loss(s.detach(), t, labels, temp)
    assert float(full.detach()) == pytest.approx(float(want), rel=1e-5)
    full.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_full_vocab_on_disk_equals_live_teacher(tiny_hf_checkpoint, tmp_path: Path) -> None:
    """K = vocabulary: the loss of a training batch from the stored logits equals the loss
    with the teacher run live; the stored-logits module builds no teacher."""
    ckpt = tiny_hf_checkpoint("llama", max_position_embeddings=256)
    cfg = _cfg(ckpt, tmp_path, f"distill.teacher_top_k={TINY_VOCAB}")
    folder = write_teacher_logits(cfg, shard_samples=5)
    assert len(list(folder.glob("values-*.npy"))) == 5  # 24 samples in shards of 5
    dm = _build_datamodule(dict(cfg.data))
    batch = next(iter(dm.train_dataloader()))
    spec = {"_target_": "qsparse.models.pretrained.hf_model", "path": str(ckpt)}
    common = {"mode": "logits", "lm_weight": 1.0, "kl_weight": 1.0}
    live = LMModule(model=spec, sparsity=0.9, distill=common)
    stored = LMModule(
        model=spec,
        sparsity=0.9,
        distill={
            **common,
            "teacher_logits": str(folder),
            "teacher_top_k": TINY_VOCAB,
        },
    )
    live.configure_model(), stored.configure_model()
    assert stored.build_teacher() is None and stored.teacher is None
    live.build_teacher()

    def parts(module: LMModule, b: dict) -> dict[str, float]:
        forward = lambda: module(b["input_ids"], b["labels"], b.get("attention_mask"))  # noqa: E731
        loss, terms = module._teacher.loss(forward, b)
        return {"loss": float(loss.detach()), **{k: float(v) for k, v in terms.items()}}

    want, got = parts(live, batch), parts(stored, batch)
    assert want["train/kl"] > 1e-3  # the sparse student differs from its teacher
    assert got["train/kl"] == pytest.approx(want["train/kl"], rel=1e-3)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
    # an entry of another sample (wrong key) is refused by its token checksum
    other = dict(batch, sample_index=batch["sample_index"].roll(1))
    with pytest.raises(TeacherLogitsError, match="other tokens"):
        parts(stored, other)


def test_stored_samples_are_those_the_run_draws() -> None:
    """Two ranks, 3 steps, 2 accumulation steps: the union of what the two samplers yield
    is the stored sample list."""
    from qsparse.data.resumable import ResumableSampler

    n, b, world, micro = 23, 2, 2, 6
    want: set[int] = set()
    for rank in range(world):
        sampler = ResumableSampler(n, b, None, shuffle=True, seed=5, num_replicas=world, rank=rank)
        drawn: list[int] = []
        epoch = 0
        while len(drawn) < micro * b:
            sampler.set_epoch(epoch)
            drawn += list(sampler)
            epoch += 1
        want |= set(drawn[: micro * b])
    got = visited_samples(n, b, world, True, 5, micro)
    assert sorted(got.tolist()) == sorted(want) and len(set(got.tolist())) == len(got)


def test_resumed_run_reads_the_same_teacher_entries(tiny_hf_checkpoint, tmp_path: Path) -> None:
    """A run interrupted after step 4 and resumed from its step-3 checkpoint logs the same
    per-step KL (to the stored teacher) and loss as the uninterrupted run."""
    ckpt = tiny_hf_checkpoint("llama", max_position_embeddings=256)
    write_teacher_logits(_cfg(ckpt, tmp_path), shard_samples=7)
    full = train(_cfg(ckpt, tmp_path, run="full"))
    crash = [
        "+callbacks.crash._target_=qsparse.training.callbacks.StopAtStep",
        "+callbacks.crash.step=4",
        "+callbacks.crash.mode=crash",
    ]
    with pytest.raises(SimulatedCrash):
        train(_cfg(ckpt, tmp_path, *crash, run="split"))
    resumed = train(_cfg(ckpt, tmp_path, "resume=true", run="split"))
    assert full["step"] == resumed["step"] == 6
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "split")
    for key in ("train/kl", "train/loss"):
        xs, ys = dict(a[key]), dict(b[key])
        assert sorted(xs) == sorted(ys) == list(range(6))
        for step in xs:
            assert ys[step] == pytest.approx(xs[step], abs=1e-5), (key, step)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("data.seq_len=16", "data.seq_len=32"),
        ("data.max_documents=150", "data.max_documents=200"),
        ("data.corpus=kjv", "data.corpus='wiki_en'"),
        ("distill.temperature=2.0", "distill.temperature=1.0"),
        ("trainer.max_steps=7", "trainer.max_steps"),
    ],
)
def test_mismatched_run_is_refused_before_writing(
    tiny_hf_checkpoint, tmp_path: Path, override: str, named: str
) -> None:
    ckpt = tiny_hf_checkpoint("llama", max_position_embeddings=256)
    write_teacher_logits(_cfg(ckpt, tmp_path), shard_samples=64)
    with pytest.raises(TeacherLogitsError, match=named.replace(".", r"\.")) as info:
        train(_cfg(ckpt, tmp_path, override))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


def test_changed_data_is_refused_before_writing(tiny_hf_checkpoint, tmp_path: Path) -> None:
    """Same settings, other tokens (here: a stored checksum altered): refused in one line
    before the run directory is made."""
    ckpt = tiny_hf_checkpoint("llama", max_position_embeddings=256)
    folder = write_teacher_logits(_cfg(ckpt, tmp_path), shard_samples=64)
    sums = np.load(folder / "checksum-00000.npy")
    np.save(folder / "checksum-00000.npy", sums + 1)
    with pytest.raises(TeacherLogitsError, match="other tokens"):
        train(_cfg(ckpt, tmp_path))
    assert not (tmp_path / "run").exists()


def test_command_line_errors_and_restart(tiny_hf_checkpoint, tmp_path: Path, capsys) -> None:
    ckpt = tiny_hf_checkpoint("llama", max_position_embeddings=256)
    capsys.readouterr()  # the checkpoint writer's progress bar
    base = [
        "recipe=continue/tiny",
        f"model.path={ckpt}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.max_documents=200",
        "data.seq_len=32",
        "data.batch_size=4",
        "trainer.max_steps=2",
    ]
    with pytest.raises(SystemExit) as exit_:
        teacher_logits_main([*base, "distill=logits_from_disk"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qsparse-teacher-logits: ") and "distill.teacher_logits" in err
    assert len(err.splitlines()) == 1
    folder = tmp_path / "t"
    args = [*base, "distill=logits_from_disk", f"distill.teacher_logits={folder}"]
    with pytest.raises(SystemExit):
        teacher_logits_main([*args, "distill.teacher_top_k=100000"])
    assert "distill.teacher_top_k=100000" in capsys.readouterr().err
    assert not folder.exists()
    teacher_logits_main([*args, "distill.teacher_top_k=4"])
    first = np.load(folder / "values-00000.npy")
    assert first.shape == (8, 32, 4) and first.dtype == np.float16
    # a killed writer: no manifest; the same command finishes the folder
    (folder / "manifest.json").unlink()
    teacher_logits_main([*args, "distill.teacher_top_k=4"])
    assert np.array_equal(np.load(folder / "values-00000.npy"), first)
    teacher_logits_main([*args, "distill.teacher_top_k=4"])
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        teacher_logits_main([*args, "distill.teacher_top_k=8"])
    assert "other settings" in capsys.readouterr().err


def test_continue_recipe_two_steps_from_disk(tiny_hf_checkpoint, tmp_path: Path) -> None:
    """recipe=continue/tiny distill=logits_from_disk: teacher logits written, 2 steps
    trained against them (CE + KL logged)."""
    ckpt = tiny_hf_checkpoint("llama", max_position_embeddings=256)
    extra = ("trainer.max_steps=2", "trainer.val_check_interval=2")
    write_teacher_logits(_cfg(ckpt, tmp_path, *extra))
    summary = train(_cfg(ckpt, tmp_path, *extra))
    assert summary["step"] == 2 and summary["val_loss"] > 0
    metrics = read_metrics(tmp_path / "run")
    kl = dict(metrics["train/kl"])
    # step 0 is dense (sparsity warm-up from 0): the student is its teacher, KL ~ 0
    assert sorted(kl) == [0, 1] and abs(kl[0]) < 1e-4 and kl[1] > 1e-4, kl
    assert "train/lm_loss" in metrics


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["ddp_cpu", "fsdp_cpu"])
def test_two_ranks_read_their_samples(tiny_hf_checkpoint, tmp_path: Path, trainer: str) -> None:
    """trainer=ddp_cpu / fsdp_cpu (2 gloo processes): the folder covers both ranks' samples
    (3 steps x 8 x 2) and the run trains against it, its parameters replicated (DDP) or
    sharded (FSDP2) (about a minute each on 2 cores)."""
    import json

    from conftest import ddp_recovery_overrides, run_module

    ckpt = tiny_hf_checkpoint("llama", max_position_embeddings=256)
    args = [
        *ddp_recovery_overrides(ckpt, tmp_path / "run", tmp_path / "cache", 3, trainer),
        "distill=logits_from_disk",
        f"distill.teacher_logits={tmp_path / 't'}",
        "distill.teacher_top_k=16",
    ]
    for module in ("qsparse.cli.teacher_logits", "qsparse.cli.train"):
        run_module(module, args, cwd=tmp_path, timeout=600)
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["samples"] == 3 * 8 * 2
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 3
    kl = dict(read_metrics(tmp_path / "run")["train/kl"])
    assert sorted(kl) == [0, 1, 2]
    # FSDP2 writes its checkpoint sharded (a folder), DDP one file
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_dir() == (trainer == "fsdp_cpu"), sorted(p.name for p in last.parent.iterdir())


def test_finetune_recipe_padded_batches_from_disk(tiny_hf_checkpoint, tmp_path: Path) -> None:
    """SFT with padding: the command's batches and the run's are padded to other lengths;
    the entries (right-padded, checksummed over the attention mask) still match."""
    ckpt = tiny_hf_checkpoint("qwen2", max_position_embeddings=512)
    overrides = [
        "export=false",
        "sparsity.ratio=0.4",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        "distill=logits_from_disk",
        f"distill.teacher_logits={tmp_path / 't'}",
        "distill.teacher_top_k=32",
    ]
    write_teacher_logits(
        tiny_run_config("finetune/tiny", ckpt, tmp_path, *overrides), shard_samples=3
    )
    summary = train(tiny_run_config("finetune/tiny", ckpt, tmp_path, *overrides))
    assert summary["step"] == 2
    kl = dict(read_metrics(tmp_path / "run")["train/kl"])
    assert sorted(kl) == [0, 1] and all(math.isfinite(v) and v >= -1e-6 for v in kl.values())
