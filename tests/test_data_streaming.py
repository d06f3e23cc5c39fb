"""The streaming pretraining pipeline: the same batches for every ``num_workers``, rank
sharding, resume from a cursor (with workers) that starts at the saved chunk instead of
re-tokenizing the consumed text, and ranks stopping together."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from qsparse.data import PretrainDataModule, resolve_corpus
from qsparse.data.stream_source import StreamCursor
from qsparse.data.streaming import BlockPacker


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Three jsonl files of real wiki documents (24 in all) and a cache dir."""
    root = tmp_path_factory.mktemp("stream")
    spec = resolve_corpus("wiki_en", cache_dir=root / "cache")
    with open(spec.data_files[0], encoding="utf-8") as f:
        rows = [json.loads(next(f))["text"] for _ in range(24)]
    files = []
    for i in range(3):
        path = root / f"part{i}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows[i::3]))
        files.append(str(path))
    return root, root / "cache"


def _dm(corpus, **kw) -> PretrainDataModule:
    root, cache = corpus
    args = dict(
        data_files=sorted(str(p) for p in root.glob("part*.jsonl")), vocab_size=300,
        seq_len=32, batch_size=2, val_fraction=0.1, seed=5, cache_dir=str(cache),
        streaming=True, shuffle_buffer=3,
    )  # fmt: skip
    args.update(kw)
    return PretrainDataModule(**args)


def _batches(dm: PretrainDataModule) -> list[torch.Tensor]:
    return [b["input_ids"] for b in dm.train_dataloader()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("shuffle", [False, True])
def test_order_does_not_depend_on_num_workers(corpus, shuffle: bool) -> None:
    ref = _batches(_dm(corpus, shuffle=shuffle))
    assert len(ref) >= 6
    for workers in (1, 2):
        assert _same(_batches(_dm(corpus, shuffle=shuffle, num_workers=workers)), ref), workers


def test_resume_from_cursor_with_workers(corpus) -> None:
    """Stop after k batches, save, resume in a fresh module with another worker count: the
    rest of the epoch is exactly the uninterrupted run's, and the source starts at the
    cursor's chunk (earlier chunks are not tokenized again)."""
    ref = _batches(_dm(corpus, num_workers=2))
    k = len(ref) // 2 + 1
    dm = _dm(corpus, num_workers=2)
    it = iter(dm.train_dataloader())
    for _ in range(k):
        next(it)
    dm.advance(k)
    state = dm.state_dict()
    cursor = StreamCursor.from_dict(state["cursors"][0])
    assert cursor.chunk > 0 and cursor.source_state is not None
    for workers in (0, 1):
        fresh = _dm(corpus, num_workers=workers)
        fresh.load_state_dict(json.loads(json.dumps(state)))  # survives serialisation
        assert _same(_batches(fresh), ref[k:]), workers
    fresh = _dm(corpus)
    fresh.load_state_dict(state)
    fresh.setup("fit")
    source = fresh.train_dataloader().dataset
    source.start = cursor
    chunks = [item["chunk"] for item in source]
    assert chunks[0] == cursor.chunk and chunks == list(range(cursor.chunk, chunks[-1] + 1))
    # next epoch: a new document order, every batch again
    fresh.set_epoch(1)
    e1 = _batches(fresh)
    assert len(e1) == len(ref) and not _same(e1, ref)


def test_ranks_read_disjoint_documents(corpus) -> None:
    def rank_tokens(rank: int, world: int) -> np.ndarray:
        dm = _dm(corpus, shuffle=False)
        dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
        dm.prepare_data()
        source = dm.train_dataloader().dataset
        return np.concatenate([item["tokens"] for item in source])

    def documents(tokens: np.ndarray) -> set[tuple[int, ...]]:
        return {tuple(d) for d in np.split(tokens, np.flatnonzero(tokens == eos) + 1) if len(d)}

    dm = _dm(corpus)
    dm.prepare_data()
    eos = dm.tokenizer.eos_token_id
    single = rank_tokens(0, 1)
    r0, r1 = rank_tokens(0, 2), rank_tokens(1, 2)
    assert len(r0) and len(r1) and len(r0) + len(r1) == len(single)
    d0, d1 = documents(r0), documents(r1)
    assert d0 and d1 and not d0 & d1 and d0 | d1 == documents(single)


def _lockstep_worker(rank: int, port: int, lengths: list[int], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    items = [
        {"chunk": c, "tokens": np.arange(8, dtype=np.int32), "state": None, "next_state": None}
        for c in range(lengths[rank])
    ]
    packer = BlockPacker(4, 2, StreamCursor(), lockstep=True)
    n = sum(1 for _ in packer.batches(iter(items)))
    Path(out, f"{rank}.txt").write_text(str(n))
    torch.distributed.destroy_process_group()


def test_ranks_stop_together(tmp_path: Path) -> None:
    """Rank 0 has 5 batches of data, rank 1 only 3: both yield 3 (no rank waits forever in
    a collective the other never joins)."""
    port = 29400 + os.getpid() % 500
    mp.spawn(_lockstep_worker, args=(port, [5, 3], str(tmp_path)), nprocs=2, join=True)
    assert [int((tmp_path / f"{r}.txt").read_text()) for r in (0, 1)] == [3, 3]
