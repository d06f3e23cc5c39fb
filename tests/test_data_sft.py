"""SFT data: generated real-data sets, exact response-only loss masks, padding vs packing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CHATML

from qsparse.data import IGNORE_INDEX, SFTDataModule, resolve_corpus, sft_corpus_file
from qsparse.data.sft_synth import first_sentence, split_verse
from qsparse.data.tokenizer import train_bpe_tokenizer

# a template whose end-of-turn marker is the EOS token itself
EOS_TURNS = (
    "{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}<|endoftext|>\n"
    "{% endfor %}{% if add_generation_prompt %}[assistant]: {% endif %}"
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sft_cache")


@pytest.fixture(scope="module")
def rows(cache: Path) -> list[dict]:
    """First 40 generated wiki_qa rows (OpenOrca layout)."""
    path = sft_corpus_file("wiki_qa", cache)
    with open(path, encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(40)]


@pytest.fixture(scope="module")
def tok_dir(cache: Path, rows: list[dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained BPE with a ChatML jinja chat_template, saved as a local folder."""
    texts = [r["system_prompt"] + "\n" + r["question"] + "\n" + r["response"] for r in rows]
    tok = train_bpe_tokenizer(texts, vocab_size=400, chat_template=CHATML)
    out = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(str(out))
    return out


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _spans(labels: torch.Tensor) -> list[list[int]]:
    """Contiguous runs of trained label ids."""
    runs: list[list[int]] = []
    prev = False
    for x in labels.tolist():
        if x != IGNORE_INDEX:
            if not prev:
                runs.append([])
            runs[-1].append(x)
        prev = x != IGNORE_INDEX
    return runs


# ----------------------------------------------------------------------- generated data
def test_generated_sets_are_deterministic_and_from_the_corpus(cache: Path) -> None:
    p1 = sft_corpus_file("wiki_qa", cache)
    p2 = sft_corpus_file("wiki_qa", cache)
    assert p1 == p2
    qa = [json.loads(x) for x in p1.read_text(encoding="utf-8").splitlines()]
    wiki = [
        json.loads(x)
        for x in Path(resolve_corpus("wiki_en", cache_dir=cache).data_files[0])
        .read_text(encoding="utf-8")
        .splitlines()
    ]
    by_title = {w["title"]: w for w in wiki}
    what = [r for r in qa if r["id"].endswith(".what")]
    assert len(what) == len(wiki)
    for r in what:
        art = by_title[r["question"][len("What is ") : -1]]
        assert art["text"].startswith(r["response"])
        assert r["response"][-1] in ".!?" or r["response"] == art["text"].strip()
    assert {"id", "system_prompt", "question", "response"} == set(qa[0])
    chat = [json.loads(x) for x in sft_corpus_file("wiki_qa_chat", cache).read_text().splitlines()]
    assert len(chat) == len(qa)
    assert [m["role"] for m in chat[0]["messages"]] == ["system", "user", "assistant"]
    assert chat[0]["messages"][2]["content"] == qa[0]["response"]
    kjv = sft_corpus_file("kjv_continue", cache).read_text().splitlines()
    first = json.loads(kjv[0])
    assert first["question"].endswith("And God said, Let there be light:")
    assert first["response"] == "and there was light."


def test_sentence_and_verse_splitting() -> None:
    text = "Washington, D.C. is the capital of the U.S. and a city. It lies on the Potomac."
    assert first_sentence(text) == "Washington, D.C. is the capital of the U.S. and a city."
    assert first_sentence("No boundary here") == "No boundary here"
    assert split_verse("Jesus wept.") is None
    first, second = split_verse("And he said unto them, Go ye into all the world, and preach.")
    assert first.endswith(",") and (first + " " + second).startswith("And he said")


# ------------------------------------------------------------------------ loss masks
def test_plain_template_mask_is_exactly_the_response(tmp_path: Path, rows, tok_dir) -> None:
    data = _write(tmp_path / "orca.jsonl", rows[:12])
    dm = SFTDataModule(
        data_files=str(data), tokenizer=str(tok_dir), template="plain", seq_len=512,
        val_fraction=0.0, cache_dir=str(tmp_path / "c"),
    )  # fmt: skip
    dm.setup("fit")
    tok = dm.tokenizer
    assert dm.use_chat_template is False and dm.num_train_examples == 12
    for r, (ids, labels) in zip(rows[:12], dm._train_examples, strict=True):
        assert tok.decode(ids) == (
            f"### System:\n{r['system_prompt']}\n### User:\n{r['question']}\n"
            f"### Assistant:\n{r['response']}<|endoftext|>"
        )
        spans = _spans(torch.from_numpy(labels))
        assert len(spans) == 1
        assert tok.decode(spans[0]) == r["response"] + "<|endoftext|>"
        trained = labels != IGNORE_INDEX
        assert (labels[trained] == ids[trained]).all()
        assert trained.sum() == len(tok(r["response"], add_special_tokens=False)["input_ids"]) + 1


@pytest.mark.parametrize(
    "template,suffix", [(CHATML, "<|im_end|>\n<|endoftext|>"), (EOS_TURNS, "<|endoftext|>\n")]
)
def test_chat_template_mask_multi_turn(tmp_path: Path, rows, tok_dir, template, suffix) -> None:
    # two-turn chats assembled from consecutive generated rows
    chats = []
    for a, b in zip(rows[0:16:2], rows[1:16:2], strict=True):
        chats.append(
            {
                "messages": [
                    {"role": "system", "content": a["system_prompt"]},
                    {"role": "user", "content": a["question"]},
                    {"role": "assistant", "content": a["response"]},
                    {"role": "user", "content": b["question"]},
                    {"role": "assistant", "content": b["response"]},
                ]
            }
        )
    data = _write(tmp_path / "chat.jsonl", chats)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tok.chat_template = template
    dm = SFTDataModule(
        data_files=str(data), tokenizer=tok, seq_len=512, val_fraction=0.0,
        cache_dir=str(tmp_path / "c"),
    )  # fmt: skip
    dm.setup("fit")
    assert dm.use_chat_template is True
    for chat, (ids, labels) in zip(chats, dm._train_examples, strict=True):
        msgs = chat["messages"]
        assert tok.decode(ids).startswith(tok.apply_chat_template(msgs, tokenize=False))
        spans = [tok.decode(s) for s in _spans(torch.from_numpy(labels))]
        turn_end = "<|im_end|>\n" if template == CHATML else "<|endoftext|>\n"
        assert spans == [msgs[2]["content"] + turn_end, msgs[4]["content"] + suffix]


def test_template_choice_and_errors(tmp_path: Path, rows, tok_dir) -> None:
    data = _write(tmp_path / "orca.jsonl", rows[:6])
    from transformers import AutoTokenizer

    plain_tok = AutoTokenizer.from_pretrained(str(tok_dir))
    plain_tok.chat_template = None
    with pytest.raises(ValueError, match="template='chat' but the tokenizer has no chat_template"):
        SFTDataModule(
            data_files=str(data), tokenizer=plain_tok, template="chat", cache_dir=str(tmp_path)
        ).setup("fit")
    auto = SFTDataModule(data_files=str(data), tokenizer=str(tok_dir), cache_dir=str(tmp_path))
    auto.setup("fit")
    assert auto.use_chat_template is True

    with pytest.raises(
        ValueError,
        match=r"fields \['prompt'\] not found.*columns: \['id', 'question', 'response', 'system_prompt'\]",
    ):
        SFTDataModule(
            data_files=str(data), tokenizer=str(tok_dir), format="openorca",
            question_field="prompt", cache_dir=str(tmp_path),
        ).setup("fit")  # fmt: skip
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        SFTDataModule(data_files=str(tmp_path / "nothere.jsonl"), cache_dir=str(tmp_path)).setup()
    bad = _write(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(ValueError, match="example 0: messages has no assistant message"):
        SFTDataModule(data_files=str(bad), tokenizer=str(tok_dir), cache_dir=str(tmp_path)).setup()
    odd = _write(tmp_path / "odd.jsonl", [{"prompt": "a", "answer": "b"}])
    with pytest.raises(ValueError, match="cannot find SFT fields"):
        SFTDataModule(data_files=str(odd), tokenizer=str(tok_dir), cache_dir=str(tmp_path)).setup()
    with pytest.raises(ValueError, match="unknown SFT corpus 'nope'"):
        SFTDataModule(corpus="nope", cache_dir=str(tmp_path)).setup()
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        SFTDataModule(data_files=str(data), tokenizer=str(tmp_path / "none")).setup()


# ---------------------------------------------------------------- padding vs packing
def test_padding_and_packing_batches(tmp_path: Path, rows, tok_dir) -> None:
    data = _write(tmp_path / "orca.jsonl", rows)
    kw = dict(
        data_files=str(data), tokenizer=str(tok_dir), seq_len=512, batch_size=4,
        val_fraction=0.0, shuffle=False, cache_dir=str(tmp_path / "c"),
    )  # fmt: skip
    padded = SFTDataModule(packing=False, **kw)
    padded.setup("fit")
    examples = padded._train_examples
    pad_id = padded.tokenizer.pad_token_id
    batch = next(iter(padded.train_dataloader()))
    lengths = [len(examples[i][0]) for i in range(4)]
    assert batch["input_ids"].shape == (4, max(lengths))
    for i, n in enumerate(lengths):
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert batch["input_ids"][i, :n].tolist() == examples[i][0].tolist()
        assert (batch["input_ids"][i, n:] == pad_id).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert batch["labels"][i, :n].tolist() == examples[i][1].tolist()

    packed = SFTDataModule(packing=True, **kw)
    packed.setup("fit")
    blocks = [packed._train_dataset[i] for i in range(len(packed._train_dataset))]
    assert all(b["input_ids"].shape == (512,) for b in blocks)
    assert len(blocks) < len(examples)  # several examples share a block
    # the real tokens of all blocks, in order, are exactly the examples, none split
    ids = torch.cat([b["input_ids"][b["attention_mask"] == 1] for b in blocks])
    labels = torch.cat([b["labels"][b["attention_mask"] == 1] for b in blocks])
    assert ids.tolist() == [t for e in examples for t in e[0].tolist()]
    assert labels.tolist() == [t for e in examples for t in e[1].tolist()]
    for b in blocks:
        m = b["attention_mask"]
        assert m.tolist() == sorted(m.tolist(), reverse=True)  # padding only at the end
        assert (b["labels"][m == 0] == IGNORE_INDEX).all()
    batch = next(iter(packed.train_dataloader()))
    assert batch["input_ids"].shape == (4, 512) and batch["attention_mask"].shape == (4, 512)


def test_truncation_keeps_prompt_and_drops_empty(tmp_path: Path, rows, tok_dir) -> None:
    data = _write(tmp_path / "orca.jsonl", rows[:20])
    kw = dict(
        data_files=str(data), tokenizer=str(tok_dir), template="plain", val_fraction=0.0,
        cache_dir=str(tmp_path / "c"),
    )  # fmt: skip
    full = SFTDataModule(seq_len=1024, **kw)
    full.setup("fit")
    prompt_lens = sorted(int((lab != IGNORE_INDEX).argmax()) for _, lab in full._train_examples)
    cut = prompt_lens[len(prompt_lens) // 2] + 1  # about half keep a response token
    dm = SFTDataModule(seq_len=cut, **kw)
    with pytest.warns(UserWarning, match="no response token left"):
        dm.setup("fit")
    assert dm.num_dropped > 0 and dm.num_train_examples > 0
    assert dm.num_train_examples + dm.num_dropped == 20
    kept = iter(dm._train_examples)
    for ids_full, labels_full in full._train_examples:
        if (labels_full[:cut] != IGNORE_INDEX).any():
            ids, labels = next(kept)
            assert ids.tolist() == ids_full[:cut].tolist()
            assert labels.tolist() == labels_full[:cut].tolist()
    assert next(kept, None) is None


def test_val_split_deterministic_and_cached(tmp_path: Path, rows, tok_dir) -> None:
    data = _write(tmp_path / "orca.jsonl", rows)
    kw = dict(
        data_files=str(data),
        tokenizer=str(tok_dir),
        val_fraction=0.25,
        cache_dir=str(tmp_path / "c"),
    )
    a = SFTDataModule(**kw)
    a.setup("fit")
    mtime = a.cache_path.stat().st_mtime_ns
    b = SFTDataModule(**kw)
    b.setup("fit")
    assert b.cache_path == a.cache_path and b.cache_path.stat().st_mtime_ns == mtime
    assert 0 < a.num_val_examples < 40 and a.num_train_examples + a.num_val_examples == 40
    va = [x[0].tolist() for x in a._val_examples]
    assert va == [x[0].tolist() for x in b._val_examples]
    c = SFTDataModule(**{**kw, "seed": 99})
    c.setup("fit")
    assert [x[0].tolist() for x in c._val_examples] != va


# ---------------------------------------------------------------- memory bound
def test_memory_does_not_grow_with_the_number_of_examples(
    tmp_path: Path, rows, tok_dir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tokenizing (``datasets.map`` into Arrow), packing and one epoch of batches: the peak of
    Python-tracked memory is about the same for 4x the rows (one map batch, not the data
    set, is in memory; the 1M-row figure: benchmarks/sft_memory.py)."""
    import tracemalloc

    from qsparse.data import sft_tokenized

    monkeypatch.setattr(sft_tokenized, "MAP_BATCH", 100)

    def peak(n: int) -> tuple[int, int]:
        data = _write(tmp_path / f"rows{n}.jsonl", [rows[i % 40] | {"id": i} for i in range(n)])
        kw = dict(
            data_files=str(data), tokenizer=str(tok_dir), template="plain", seq_len=256,
            packing=True, val_fraction=0.0, cache_dir=str(tmp_path / f"c{n}"),
        )  # fmt: skip
        SFTDataModule(**kw)._rows()  # datasets' own json -> Arrow conversion, untraced
        tracemalloc.start()
        dm = SFTDataModule(**kw)
        dm.setup("fit")
        seen = sum(len(b["input_ids"]) for b in dm.train_dataloader())
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert dm.num_train_examples == n and seen == len(dm._train_dataset) // 8 * 8
        return top, data.stat().st_size

    (small, raw_small), (large, raw_large) = peak(500), peak(2000)
    per_row_raw = (raw_large - raw_small) / 1500
    # the rows themselves held as Python objects would add several times their raw size
    assert (large - small) / 1500 < 0.25 * per_row_raw, (small, large, per_row_raw)
