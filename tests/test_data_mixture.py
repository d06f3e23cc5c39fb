"""Weighted corpus mixtures with in-domain and out-of-domain validation (data/mixture.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from qsparse.data.mixture import MixedBlocks, MixtureDataModule, mixture_counts


def test_mixture_counts_largest_remainder() -> None:
    assert mixture_counts([10, 10], [1, 1]) == [10, 10]
    assert mixture_counts([10, 30], [3, 1]) == [30, 10]  # up-sample the small source
    counts = mixture_counts([7, 5, 1], [0.2, 0.3, 0.5])
    assert sum(counts) == 13 and counts == [3, 4, 6]  # 2.6, 3.9, 6.5 -> remainders decide
    assert mixture_counts([4, 4], [1, 0]) == [8, 0]


def test_mixed_blocks_counts_repeats_and_determinism() -> None:
    a = TensorDataset(torch.arange(3))
    b = TensorDataset(torch.arange(100, 109))
    mixed = MixedBlocks([a, b], [3, 1], seed=5)
    items = [int(mixed[j][0]) for j in range(len(mixed))]
    assert len(items) == 12
    from_a = [x for x in items if x < 100]
    from_b = [x for x in items if x >= 100]
    assert len(from_a) == 9 and sorted(set(from_a)) == [0, 1, 2]  # each block 3 times
    assert [from_a.count(x) for x in range(3)] == [3, 3, 3]
    assert len(from_b) == 3 and len(set(from_b)) == 3  # 3 distinct of 9
    again = MixedBlocks([a, b], [3, 1], seed=5)
    assert np.array_equal(again.index, mixed.index)
    other = MixedBlocks([a, b], [3, 1], seed=6)
    assert not np.array_equal(other.index, mixed.index)


@pytest.fixture
def tokenizer_dir(tiny_hf_checkpoint) -> Path:
    return tiny_hf_checkpoint("llama")


def _dm(tokenizer_dir: Path, cache: Path, **kw) -> MixtureDataModule:
    args = dict(
        sources={"wiki_en": 0.75, "kjv": 0.25},
        ood_val=[],
        ood_val_tokens=512,
        tokenizer=str(tokenizer_dir),
        seq_len=32,
        batch_size=4,
        max_documents=120,
        val_fraction=0.1,
        cache_dir=str(cache),
    )
    args.update(kw)
    return MixtureDataModule(**args)


def test_mixture_datamodule_sources_and_ood(tokenizer_dir: Path, tmp_path: Path) -> None:
    dm = _dm(tokenizer_dir, tmp_path, sources={"wiki_en": 1.0}, ood_val=["kjv"])
    dm.setup("fit")
    assert dm.val_set_names == ["val", "val_ood"]
    loaders = dm.val_dataloader()
    assert len(loaders) == 2
    ood_tokens = sum(b["input_ids"].numel() for b in loaders[1])
    assert ood_tokens == 512  # 16 blocks of 32 tokens from the held-out source
    # the held-out source's blocks are KJV text, not Wikipedia
    text = dm.tokenizer.decode(next(iter(loaders[1]))["input_ids"][0])
    assert "the" in text.lower()
    table = dm.mixture_table()
    assert table[0]["source"] == "wiki_en" and table[0]["per_epoch"] == table[0]["blocks"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32) and torch.equal(batch["input_ids"], batch["labels"])


def test_mixture_resume_continues_the_same_stream(tokenizer_dir: Path, tmp_path: Path) -> None:
    dm = _dm(tokenizer_dir, tmp_path)
    dm.setup("fit")
    table = dm.mixture_table()
    total = sum(r["blocks"] for r in table)
    assert [r["per_epoch"] for r in table] == mixture_counts(
        [r["blocks"] for r in table], [0.75, 0.25]
    )
    assert sum(r["per_epoch"] for r in table) == total
    it = iter(dm.train_dataloader())
    first = [next(it)["input_ids"] for _ in range(4)]
    for _ in range(2):
        dm.advance(1)
    state = dm.state_dict()
    resumed = _dm(tokenizer_dir, tmp_path)
    resumed.load_state_dict(state)
    resumed.setup("fit")
    nxt = next(iter(resumed.train_dataloader()))["input_ids"]
    assert torch.equal(nxt, first[2])


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"sources": {}}, "data.sources must map"),
        ({"sources": {"wiki_en": -1.0}}, "data.sources.wiki_en"),
        ({"sources": {"wiki_en": 0.0}}, "sum to 0"),
        ({"ood_val": ["kjv"]}, "never trains on"),
        ({"ood_val_tokens": 8}, "data.ood_val_tokens"),
    ],
)
def test_mixture_bad_settings_name_the_key(
    kw: dict, match: str, tokenizer_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=match):
        _dm(tokenizer_dir, tmp_path, **kw)


def test_mixture_shuffle_seed_draws_other_blocks_on_the_same_split(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    """``shuffle_seed`` (the run's ``seed`` in the configs) picks which blocks the down-sampled
    source contributes and their order; the validation set is ``seed``'s alone."""
    a = _dm(tokenizer_dir, tmp_path, shuffle_seed=1)
    b = _dm(tokenizer_dir, tmp_path, shuffle_seed=2)
    for dm in (a, b):
        dm.setup("fit")
    assert not np.array_equal(a._train_dataset.index, b._train_dataset.index)
    (val_a,), (val_b,) = a.val_dataloader(), b.val_dataloader()  # one loader: no ood_val
    assert torch.equal(
        torch.cat([batch["input_ids"] for batch in val_a]),
        torch.cat([batch["input_ids"] for batch in val_b]),
    )
    assert _dm(tokenizer_dir, tmp_path).shuffle_seed == 1234  # None: seed
