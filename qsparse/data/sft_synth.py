"""Instruction data generated deterministically from the bundled real corpora.

Nothing here is written by hand: every pair is a mechanical transformation of real text
shipped with the corpus packages (see :mod:`qsparse.data.corpora`), so tests and the tiny
fine-tuning recipe have real, reproducible instruction data without a download.

Generated sets (one example per line, in corpus order):

* ``wiki_qa`` (from ``wiki_en``, Wikipedia lead sections, CC BY-SA 4.0), two examples per
  article:

  - question ``"What is <title>?"`` -> response: the first sentence of the article's extract
    (split after ``.``/``!``/``?`` followed by whitespace and an upper-case letter or digit,
    not after common abbreviations or single-letter initials);
  - question ``"Describe <title> in a few words."`` -> response: the article's short
    description with a final period (skipped when the description is empty).

  System prompt: ``"You are a helpful encyclopedia. Answer in one sentence."``.
* ``kjv_continue`` (from the King James Bible, public domain): for every verse with a
  ``,``/``;``/``:`` within its middle third (both halves at least 3 words), question
  ``"Continue the verse (<citation>): <first half>"`` -> response: the second half.
  System prompt: ``"You are a scripture assistant. Complete the verse."``.

Each set is written in two layouts, both cached under ``<cache>/sft/``:

* OpenOrca style (``<name>-<hash>.jsonl``): ``{"id", "system_prompt", "question", "response"}``;
* chat style (``<name>_chat-<hash>.jsonl``): ``{"id", "messages": [{"role", "content"}, ...]}``
  with roles ``system``, ``user``, ``assistant``.

:func:`sft_corpus_file` returns the path (building it on first use); the SFT DataModule
accepts the names ``wiki_qa``, ``kjv_continue`` (OpenOrca layout) and ``wiki_qa_chat``,
``kjv_continue_chat`` (messages layout) as ``corpus``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..cache import file_fingerprint, resolve_cache_dir, stable_hash
from ..io import atomic_write_jsonl
from .corpora import resolve_corpus
from .packaged_corpora import kjv_source, kjv_verses, wiki_source

__all__ = [
    "SFT_CORPORA",
    "first_sentence",
    "kjv_continue_examples",
    "sft_corpus_file",
    "split_verse",
    "to_messages",
    "wiki_qa_examples",
]

WIKI_SYSTEM = "You are a helpful encyclopedia. Answer in one sentence."
KJV_SYSTEM = "You are a scripture assistant. Complete the verse."
_SYNTH_VERSION = 1

_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "e.g", "i.e", "inc", "ltd", "co",
    "mt", "ft", "no", "approx", "ca", "c", "fl", "b", "d", "u.s", "u.k", "gen", "col", "lt",
    "prof", "rev", "sen", "gov", "op", "vol", "pp", "al", "jan", "feb", "aug", "sept", "oct",
    "sgt", "capt", "maj", "cpl", "pvt", "adm", "hon", "esq", "ph.d", "a.d", "b.c",
    "nov", "dec",
}  # fmt: skip
_BOUNDARY = re.compile(r"[.!?](?=\s+[A-Z0-9\"'(\u201c])")


def first_sentence(text: str) -> str:
    """The first sentence of ``text`` (whole text when no boundary is found).

    A boundary is ``.``, ``!`` or ``?`` followed by whitespace and an upper-case letter,
    digit, quote or parenthesis, unless the word ending in ``.`` is a known abbreviation, a
    single letter (an initial) or contains an inner period (``U.S.``).
    """
    text = text.strip()
    for m in _BOUNDARY.finditer(text):
        end = m.end()
        if text[m.start()] == ".":
            word = text[:end].rsplit(None, 1)[-1].rstrip(".").lstrip("(\"'")
            if word.lower() in _ABBREVIATIONS or len(word) <= 1 or "." in word:
                continue
        return text[:end]
    return text


def wiki_qa_examples(cache_dir: str | os.PathLike[str] | None = None) -> Iterator[dict[str, str]]:
    """OpenOrca-style rows from the ``wiki_en`` corpus (see the module docstring)."""
    spec = resolve_corpus("wiki_en", cache_dir=cache_dir)
    with open(spec.data_files[0], encoding="utf-8") as f:
        for n, line in enumerate(f):
            art = json.loads(line)
            title = art["title"].strip()
            answer = first_sentence(art["text"])
            if title and answer:
                yield {
                    "id": f"wiki_qa.{n}.what",
                    "system_prompt": WIKI_SYSTEM,
                    "question": f"What is {title}?",
                    "response": answer,
                }
            desc = (art.get("description") or "").strip()
            if title and desc:
                if desc[-1] not in ".!?":
                    desc += "."
                yield {
                    "id": f"wiki_qa.{n}.describe",
                    "system_prompt": WIKI_SYSTEM,
                    "question": f"Describe {title} in a few words.",
                    "response": desc[0].upper() + desc[1:],
                }


def split_verse(text: str) -> tuple[str, str] | None:
    """Split a verse at the ``,``/``;``/``:`` closest to its middle, within the middle third.

    Returns ``(first_half_with_punctuation, second_half)`` or ``None`` when no such split
    leaves at least 3 words on each side.
    """
    text = text.strip()
    n = len(text)
    best: tuple[int, int] | None = None
    for m in re.finditer(r"[,;:](?=\s)", text):
        i = m.start()
        if not n / 3 <= i <= 2 * n / 3:
            continue
        first, second = text[: i + 1], text[i + 1 :].strip()
        if len(first.split()) < 3 or len(second.split()) < 3:
            continue
        dist = abs(i - n // 2)
        if best is None or dist < best[0]:
            best = (dist, i)
    if best is None:
        return None
    i = best[1]
    return text[: i + 1], text[i + 1 :].strip()


def kjv_continue_examples(
    cache_dir: str | os.PathLike[str] | None = None,
) -> Iterator[dict[str, str]]:
    """OpenOrca-style verse-continuation rows from the KJV (see the module docstring)."""
    for v in kjv_verses():
        parts = split_verse(v["text"])
        if parts is None:
            continue
        yield {
            "id": f"kjv_continue.{v['citation']}",
            "system_prompt": KJV_SYSTEM,
            "question": f"Continue the verse ({v['citation']}): {parts[0]}",
            "response": parts[1],
        }


def to_messages(row: dict[str, str]) -> dict[str, Any]:
    """OpenOrca row -> ``{"id", "messages"}`` chat row."""
    messages = []
    if row.get("system_prompt"):
        messages.append({"role": "system", "content": row["system_prompt"]})
    messages.append({"role": "user", "content": row["question"]})
    messages.append({"role": "assistant", "content": row["response"]})
    return {"id": row["id"], "messages": messages}


def _wiki_source_fp(cache_dir: str | os.PathLike[str] | None) -> str:
    return file_fingerprint([wiki_source()])


def _kjv_source_fp(cache_dir: str | os.PathLike[str] | None) -> str:
    return file_fingerprint([kjv_source()])


SFT_CORPORA: dict[
    str,
    tuple[
        Callable[[str | os.PathLike[str] | None], Iterator[dict[str, str]]],
        Callable[[str | os.PathLike[str] | None], str],
    ],
] = {
    "wiki_qa": (wiki_qa_examples, _wiki_source_fp),
    "kjv_continue": (kjv_continue_examples, _kjv_source_fp),
}


def sft_corpus_file(
    name: str,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Path of a generated SFT jsonl, building it (atomically) on first use.

    Args:
        name: ``wiki_qa`` or ``kjv_continue`` (OpenOrca layout), or the same with ``_chat``
            appended (``messages`` layout).
        cache_dir: cache root.
    """
    chat = name.endswith("_chat")
    base = name[: -len("_chat")] if chat else name
    if base not in SFT_CORPORA:
        names = sorted(SFT_CORPORA) + sorted(f"{k}_chat" for k in SFT_CORPORA)
        raise ValueError(f"unknown SFT corpus {name!r}; choose one of {names}")
    generate, source_fp = SFT_CORPORA[base]
    key = stable_hash(_SYNTH_VERSION, base, source_fp(cache_dir), chat)
    out = resolve_cache_dir(cache_dir) / "sft" / f"{name}-{key}.jsonl"
    if not out.is_file():
        rows = generate(cache_dir)
        atomic_write_jsonl(out, (to_messages(r) for r in rows) if chat else rows)
    return out
