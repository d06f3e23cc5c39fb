"""``data.shuffle_seed``: the training order follows the run's ``seed``; the train/validation
split stays keyed on ``data.seed``, so runs with different seeds validate on the same text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose_train

from qsparse.data import PretrainDataModule


def _first_batches(dm: PretrainDataModule, n: int = 3) -> list[torch.Tensor]:
    batches = []
    for i, batch in enumerate(dm.train_dataloader()):
        batches.append(batch["input_ids"] if isinstance(batch, dict) else batch[0])
        if i + 1 == n:
            break
    return batches


def _module(cache: Path, **kw) -> PretrainDataModule:
    dm = PretrainDataModule(
        corpus="kjv",
        max_documents=40,
        vocab_size=400,
        seq_len=32,
        val_fraction=0.1,
        batch_size=4,
        cache_dir=str(cache),
        **kw,
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_shuffle_seed_changes_the_order_not_the_split(tmp_path: Path) -> None:
    base = _module(tmp_path)
    same = _module(tmp_path, shuffle_seed=1234)  # the default: seed
    other = _module(tmp_path, shuffle_seed=7)
    assert base.shuffle_seed == 1234 and other.shuffle_seed == 7 and other.seed == 1234
    first = _first_batches(base)
    assert all(map(torch.equal, first, _first_batches(same)))
    assert not all(map(torch.equal, first, _first_batches(other)))
    # the same blocks, in another order; the same validation set
    assert other.cache_path == base.cache_path
    val_a = torch.cat([b["input_ids"] for b in base.val_dataloader()])
    val_b = torch.cat([b["input_ids"] for b in other.val_dataloader()])
    assert torch.equal(val_a, val_b)


def test_the_run_seed_reaches_the_shuffle_not_the_split() -> None:
    for group in ("wiki", "mixture", "sft"):
        cfg = compose_train([f"data={group}", "seed=7"])
        assert cfg.data.shuffle_seed == 7 and cfg.data.seed == 1234, group
    assert compose_train(["data.shuffle_seed=3"]).data.shuffle_seed == 3


def test_a_bad_shuffle_seed_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data.shuffle_seed='x' must be an integer"):
        PretrainDataModule(corpus="kjv", shuffle_seed="x", cache_dir=str(tmp_path))
