"""Tokenizers: a local Hugging Face tokenizer folder, or a byte-level BPE trained on the corpus.

The trained tokenizer is a byte-level BPE (GPT-2 style pre-tokenization, so every string
round-trips) built with the ``tokenizers`` library on the *training split* of the corpus, with
two special tokens: ``<|endoftext|>`` (id 0; used as EOS, appended after every document) and
``<|pad|>`` (id 1). No BOS token is added. It is wrapped as a ``transformers``
``PreTrainedTokenizerFast`` so it saves with an exported model (``save_pretrained``) and is
cached under ``<cache>/tokenizers/bpe-<corpus>-v<vocab>-<hash>`` where the hash covers every
input that determines the training texts and the trainer settings. Training is
deterministic: the same texts and settings give the same vocabulary and merges.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..cache import resolve_cache_dir, stable_hash
from ..io import atomic_write_dir

__all__ = [
    "EOS_TOKEN",
    "PAD_TOKEN",
    "load_tokenizer",
    "resolve_tokenizer",
    "tokenizer_fingerprint",
    "train_bpe_tokenizer",
    "trained_bpe_tokenizer",
]

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
_BPE_VERSION = 1


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = (EOS_TOKEN, PAD_TOKEN),
    chat_template: str | None = None,
    model_max_length: int = 1_000_000,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it for ``transformers``.

    Args:
        texts: training documents (iterated once).
        vocab_size: final vocabulary size including the 256 byte symbols and the special
            tokens; must be at least ``256 + len(special_tokens)``.
        min_frequency: minimum pair count for a merge.
        special_tokens: added first (ids 0, 1, ...); the first is EOS, the second PAD.
        chat_template: optional jinja chat template stored on the tokenizer.
        model_max_length: value stored in the tokenizer config (no truncation by default).

    Returns:
        A ``PreTrainedTokenizerFast`` with ``eos_token`` = ``special_tokens[0]`` and
        ``pad_token`` = ``special_tokens[1]``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if len(special_tokens) < 2:
        raise ValueError("special_tokens: need at least an EOS and a PAD token")
    min_vocab = 256 + len(special_tokens)
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size={vocab_size} is too small; use at least {min_vocab}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_nonempty(texts), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=special_tokens[0],
        pad_token=special_tokens[1],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    if chat_template is not None:
        wrapped.chat_template = chat_template
    return wrapped


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if t:
            yield t


def trained_bpe_tokenizer(
    texts: Callable[[], Iterable[str]],
    corpus_name: str,
    key_parts: Any,
    vocab_size: int = 4096,
    min_frequency: int = 2,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedTokenizerFast, Path]:
    """Load the cached BPE for these inputs, or train and cache it.

    Args:
        texts: zero-argument callable returning the training documents (called only on a
            cache miss).
        corpus_name: readable part of the cache folder name.
        key_parts: JSON-able value that determines ``texts`` exactly (e.g. corpus
            fingerprint, split settings); hashed into the cache key.
        vocab_size, min_frequency: trainer settings (also in the key).
        cache_dir: cache root (see :func:`qsparse.cache.resolve_cache_dir`).

    Returns:
        ``(tokenizer, folder)``: the folder holds ``save_pretrained`` output.
    """
    key = stable_hash(_BPE_VERSION, corpus_name, vocab_size, min_frequency, key_parts)
    safe_name = "".join(c if c.isalnum() or c in "-_" else "_" for c in corpus_name)
    folder = resolve_cache_dir(cache_dir) / "tokenizers" / f"bpe-{safe_name}-v{vocab_size}-{key}"
    if not (folder / "tokenizer.json").is_file():
        tok = train_bpe_tokenizer(texts(), vocab_size=vocab_size, min_frequency=min_frequency)
        # another process that trained the same tokenizer first keeps its folder
        atomic_write_dir(folder, lambda tmp: tok.save_pretrained(str(tmp)), replace=False)
    return load_tokenizer(folder), folder


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` on a local folder, never touching the network.

    Raises:
        FileNotFoundError: ``path`` is not a directory with tokenizer files.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(
            f"tokenizer: {str(path)!r} is not a local directory; give a folder written by "
            "`save_pretrained` (tokenizer.json / tokenizer_config.json) or leave tokenizer unset "
            "to train a BPE on the corpus"
        )
    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"tokenizer: could not load a tokenizer from {str(p)!r} ({e}); the folder needs "
            "tokenizer.json or the files of a slow tokenizer plus tokenizer_config.json"
        ) from e


def resolve_tokenizer(
    tokenizer: str | os.PathLike[str] | PreTrainedTokenizerBase | None,
    *,
    texts: Callable[[], Iterable[str]] | None = None,
    corpus_name: str = "corpus",
    key_parts: Any = None,
    vocab_size: int = 4096,
    cache_dir: str | os.PathLike[str] | None = None,
) -> PreTrainedTokenizerBase:
    """Return a tokenizer object from one of the accepted specifications.

    ``tokenizer`` may be a tokenizer object (returned as is), a local folder path, or
    ``None``/``"bpe"`` to use the cached byte-level BPE trained on ``texts()`` with
    ``vocab_size`` entries (see :func:`trained_bpe_tokenizer`).
    """
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if tokenizer is None or str(tokenizer) == "bpe":
        if texts is None:
            raise ValueError("tokenizer: a BPE must be trained but no training texts were given")
        tok, _ = trained_bpe_tokenizer(
            texts, corpus_name, key_parts, vocab_size=vocab_size, cache_dir=cache_dir
        )
        return tok
    return load_tokenizer(tokenizer)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash identifying a tokenizer's behaviour (vocabulary, merges, special tokens, template)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body: Any = backend.to_str()
    else:
        body = sorted(tokenizer.get_vocab().items())
    return stable_hash(
        body,
        tokenizer.eos_token,
        tokenizer.pad_token,
        tokenizer.bos_token,
        getattr(tokenizer, "chat_template", None),
        type(tokenizer).__name__,
    )
