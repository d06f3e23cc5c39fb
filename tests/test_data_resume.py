"""Exact resume of the DataModules: no repeated and no skipped batches.

Covers a hand-written loop (``advance``), DataLoader workers, rank sharding, and real
Lightning ``Trainer`` runs resumed from checkpoints mid-epoch and at an epoch boundary.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from qsparse.data import PretrainDataModule, ResumableSampler, SFTDataModule, resolve_corpus


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 6-document jsonl of real wiki text and a cache dir (about 20 blocks of 32 tokens)."""
    root = tmp_path_factory.mktemp("resume")
    spec = resolve_corpus("wiki_en", cache_dir=root / "cache")
    with open(spec.data_files[0], encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(6)]
    path = root / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    return path, root / "cache"


def _dm(corpus_file: tuple[Path, Path], **kw) -> PretrainDataModule:
    path, cache = corpus_file
    args = dict(
        data_files=str(path), vocab_size=300, seq_len=32, batch_size=2, val_fraction=0.2,
        seed=3, cache_dir=str(cache),
    )  # fmt: skip
    args.update(kw)
    return PretrainDataModule(**args)


def _epoch_batches(dm, epoch: int) -> list[torch.Tensor]:
    dl = dm.train_dataloader()
    dl.sampler.set_epoch(epoch)
    out = []
    for b in dl:
        out.append(b["input_ids"])
        dm.advance()
    return out


def test_manual_loop_resume_is_exact(corpus_file) -> None:
    ref = _dm(corpus_file)
    ref.setup("fit")
    e0, e1 = _epoch_batches(ref, 0), _epoch_batches(ref, 1)
    n = len(e0)
    assert n >= 4 and len(e1) == n
    assert not all(torch.equal(a, b) for a, b in zip(e0, e1, strict=True))  # reshuffled
    # every block exactly once per epoch
    blocks = {tuple(r.tolist()) for b in e0 for r in b}
    assert len(blocks) == n * 2

    for k in (1, n - 1, n):  # mid-epoch, before the last batch, at the epoch boundary
        dm = _dm(corpus_file)
        dm.setup("fit")
        dl = dm.train_dataloader()
        it = iter(dl)
        for _ in range(k):
            next(it)
            dm.advance()
        state = dm.state_dict()
        assert state["epoch"] == 0 and state["batches_consumed"] == k
        fresh = _dm(corpus_file)
        fresh.load_state_dict(state)
        fresh.setup("fit")
        dl2 = fresh.train_dataloader()
        got = []
        for b in dl2:
            got.append(b["input_ids"])
            fresh.advance()
        want = e0[k:] if k < n else e1
        assert len(got) == len(want)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        assert len(dl2) == n  # Lightning adds its restored batch count to this length


def test_resume_with_workers(corpus_file) -> None:
    ref = _dm(corpus_file, num_workers=2)
    ref.setup("fit")
    full = [b["input_ids"] for b in ref.train_dataloader()]
    dm = _dm(corpus_file, num_workers=2)
    dm.load_state_dict({"epoch": 0, "batches_consumed": 2})
    got = [b["input_ids"] for b in dm.train_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(got, full[2:], strict=True))
    assert len(got) == len(full) - 2


def test_sampler_rank_sharding_and_world_change() -> None:
    n, bs = 50, 3
    world = [ResumableSampler(n, bs, None, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    order = world[0].epoch_order(0)
    per_rank = [list(s) for s in world]
    assert len(per_rank[0]) == len(per_rank[1]) == len(world[0]) == (n // 6) * 3
    for g in range(n // 6):
        r0 = per_rank[0][g * bs : (g + 1) * bs]
        r1 = per_rank[1][g * bs : (g + 1) * bs]
        assert not set(r0) & set(r1)
        assert sorted(r0 + r1) == sorted(order[g * 6 : (g + 1) * 6].tolist())

    # resume after 2 global batches of 6 on one rank of batch 6: the same remaining samples
    from qsparse.data import DataPosition

    pos = DataPosition(epoch=0, batches_consumed=2, samples_consumed=12, global_batch_size=6)
    single = ResumableSampler(n, 6, pos, seed=1, num_replicas=1, rank=0)
    assert list(single) == order[12:48].tolist()
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(n, bs, None, num_replicas=2, rank=2)


def test_load_state_dict_rejects_bad_state(corpus_file) -> None:
    dm = _dm(corpus_file)
    with pytest.raises(ValueError, match=r"missing keys \['batches_consumed'\]"):
        dm.load_state_dict({"epoch": 1})


# ------------------------------------------------------------------ real Lightning runs
class _Recorder(pl.LightningModule):
    """Trivial model: records every training batch, takes optimizer steps, validates."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].clone())
        return (self.w - batch["input_ids"].float().mean() / 1000) ** 2

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", batch["input_ids"].float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp: Path, max_steps: int, ckpt: bool) -> pl.Trainer:
    callbacks = []
    if ckpt:
        callbacks.append(
            pl.callbacks.ModelCheckpoint(
                dirpath=tmp, filename="{step}", every_n_train_steps=1, save_top_k=-1
            )
        )
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        num_sanity_val_steps=1,
        val_check_interval=2,
        limit_val_batches=1,
        enable_checkpointing=ckpt,
    )


def _fit(datamodule, tmp: Path, max_steps: int, ckpt: bool = False, ckpt_path=None) -> _Recorder:
    model = _Recorder()
    _trainer(tmp, max_steps, ckpt).fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return model


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("streaming", [False, True], ids=["cached", "streaming"])
def test_lightning_resume_is_exact(corpus_file, tmp_path: Path, streaming: bool) -> None:
    dm = _dm(corpus_file, streaming=streaming)
    dm.setup("fit")
    n = sum(1 for _ in dm.train_dataloader())
    total = 2 * n + 3  # crosses two epoch boundaries
    reference = _fit(_dm(corpus_file, streaming=streaming), tmp_path / "ref", total).seen
    assert len(reference) == total
    assert not all(
        torch.equal(a, b) for a, b in zip(reference[:n], reference[n : 2 * n], strict=True)
    )

    first = _fit(_dm(corpus_file, streaming=streaming), tmp_path / "run", n + 1, ckpt=True)
    _assert_same(first.seen, reference[: n + 1])
    for step in (3, n, n + 1):  # mid-epoch, at the end of epoch 0, just after it
        ckpt = tmp_path / "run" / f"step={step}.ckpt"
        state = torch.load(ckpt, weights_only=False)["PretrainDataModule"]
        # (0, n) and (1, 0) both mean "epoch 0 done" (streaming moves on at the last batch)
        assert state["epoch"] * n + state["batches_consumed"] == step
        dm = _dm(corpus_file, streaming=streaming)
        resumed = _fit(dm, tmp_path / f"res{step}", total, ckpt_path=ckpt)
        _assert_same(resumed.seen, reference[step:])


def test_ranks_get_disjoint_equal_shards(corpus_file) -> None:
    from types import SimpleNamespace

    def rank_batches(rank: int, state=None) -> list[torch.Tensor]:
        dm = _dm(corpus_file)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        if state is not None:
            dm.load_state_dict(state)
        return [b["input_ids"] for b in dm.train_dataloader()]

    r0, r1 = rank_batches(0), rank_batches(1)
    single = _dm(corpus_file, batch_size=4)
    blocks = {tuple(x.tolist()) for b in single.train_dataloader() for x in b["input_ids"]}
    assert len(r0) == len(r1) == len(blocks) // 4
    for a, b in zip(r0, r1, strict=True):
        rows_a = {tuple(x.tolist()) for x in a}
        rows_b = {tuple(x.tolist()) for x in b}
        assert not rows_a & rows_b and rows_a | rows_b <= blocks
    state = {"epoch": 0, "batches_consumed": 1, "samples_consumed": 4, "global_batch_size": 4}
    _assert_same(rank_batches(0, state), r0[1:])
    _assert_same(rank_batches(1, state), r1[1:])


def test_streaming_manual_resume(corpus_file) -> None:
    ref = _dm(corpus_file, streaming=True)
    e0 = [b["input_ids"] for b in ref.train_dataloader()]
    dm = _dm(corpus_file, streaming=True)
    it = iter(dm.train_dataloader())
    next(it)
    next(it)
    dm.advance(2)
    fresh = _dm(corpus_file, streaming=True)
    fresh.load_state_dict(dm.state_dict())
    _assert_same([b["input_ids"] for b in fresh.train_dataloader()], e0[2:])
    fresh.set_epoch(1)
    e1 = [b["input_ids"] for b in fresh.train_dataloader()]
    assert len(e1) == len(e0) and not all(torch.equal(a, b) for a, b in zip(e0, e1, strict=True))


def test_lightning_resume_sft_padding(tmp_path: Path, corpus_file) -> None:
    _, cache = corpus_file
    kw = dict(
        corpus="wiki_qa", max_examples=24, vocab_size=300, seq_len=256, batch_size=4,
        val_fraction=0.2, cache_dir=str(cache),
    )  # fmt: skip
    dm = SFTDataModule(**kw)
    dm.setup("fit")
    n = len(dm.train_dataloader())
    reference = _fit(SFTDataModule(**kw), tmp_path / "ref", n + 2).seen
    _fit(SFTDataModule(**kw), tmp_path / "run", 3, ckpt=True)
    resumed = _fit(
        SFTDataModule(**kw), tmp_path / "res", n + 2, ckpt_path=tmp_path / "run" / "step=3.ckpt"
    )
    _assert_same(resumed.seen, reference[3:])
