"""qsparse.data.generated: text sampled from the dense model, usable as a mixture source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qsparse.data.generated import GenerationError, generate_corpus, sample_prompts


def _rows(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_generate_corpus_is_seeded_and_prompted(tiny_hf_checkpoint, tmp_path: Path) -> None:
    ckpt = tiny_hf_checkpoint()
    kw = dict(tokens=96, prompts=["kjv"], prompt_tokens=4, new_tokens=6, batch_size=8, seed=3)
    a = generate_corpus(ckpt, tmp_path / "a.jsonl", device="cpu", **kw)
    b = generate_corpus(ckpt, tmp_path / "b.jsonl", device="cpu", **kw)
    # 96 tokens / (6 per document x 8 per batch) -> 2 batches of 8 documents
    assert a["documents"] == b["documents"] == 16
    assert 0 < a["generated_tokens"] <= 96
    assert _rows(tmp_path / "a.jsonl") == _rows(tmp_path / "b.jsonl")
    generate_corpus(ckpt, tmp_path / "c.jsonl", device="cpu", **{**kw, "seed": 4})
    assert _rows(tmp_path / "c.jsonl") != _rows(tmp_path / "a.jsonl")
    # every document starts with the first tokens of a kjv document
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ckpt))
    heads = sample_prompts(tok, ["kjv"], 16, 4, seed=3)
    for row, head in zip(_rows(tmp_path / "a.jsonl"), heads.tolist(), strict=True):
        assert row.startswith(tok.decode(head, skip_special_tokens=True).strip()[:3])


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"tokens": 0}, "tokens=0"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"out_name": "gen.txt"}, "must be a .jsonl"),
        ({"prompt_tokens": 100000}, "no document has 100000 tokens"),
    ],
)
def test_generate_corpus_refuses_bad_settings(
    tiny_hf_checkpoint, tmp_path: Path, kwargs: dict, needle: str
) -> None:
    out = tmp_path / kwargs.pop("out_name", "gen.jsonl")
    args = {"tokens": 8, "prompts": ["kjv"], "new_tokens": 2, "batch_size": 2, **kwargs}
    with pytest.raises(GenerationError, match=needle):
        generate_corpus(tiny_hf_checkpoint(), out, device="cpu", **args)
    assert not out.exists()


def test_generate_corpus_never_overwrites(tiny_hf_checkpoint, tmp_path: Path) -> None:
    out = tmp_path / "gen.jsonl"
    out.write_text('{"text": "keep me"}\n')
    with pytest.raises(GenerationError, match="exists"):
        generate_corpus(tiny_hf_checkpoint(), out, tokens=4, prompts=["kjv"], device="cpu")
    assert out.read_text() == '{"text": "keep me"}\n'
