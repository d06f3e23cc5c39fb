"""Supervised fine-tuning data: instruction / chat jsonl -> token ids with a response-only loss.

Input rows (jsonl/json/parquet, read with ``datasets``) come in two layouts, detected from
the columns (or forced with ``format``):

* OpenOrca style: ``system_prompt`` (optional, may be empty), ``question``, ``response``
  (names configurable);
* chat style: ``messages``, a list of ``{"role": "system"|"user"|"assistant", "content": str}``
  with at least one assistant turn.

Rendering (``template``):

* ``"chat"`` (default when the tokenizer has a ``chat_template``): the tokenizer's template
  via ``apply_chat_template``. For every assistant turn ``i`` the prompt ``P_i`` is the
  rendering of ``messages[:i]`` with ``add_generation_prompt=True`` and ``F_i`` the
  rendering of ``messages[:i+1]``; the trained text is ``F_i[len(P_i):]`` (the reply plus the
  template's end-of-turn marker). The full rendering must extend every ``P_i``/``F_i`` as a
  prefix (true for ordinary templates; otherwise a ValueError explains it).
* ``"plain"`` (default otherwise)::

      ### System:\\n{system}\\n### User:\\n{user}\\n### Assistant:\\n{assistant}<eos>

  (the system block only when present; turns repeat for multi-turn chats). The trained
  text is ``{assistant}`` and the EOS token after it.

The rendered text is cut into segments at those span boundaries and every segment is
tokenized on its own (``add_special_tokens=False``; BOS prepended when the tokenizer adds one
itself), so the mask is exact by construction: ``labels[t] = input_ids[t]`` for tokens of
trained segments and ``-100`` elsewhere. With a chat template, EOS is appended (trained)
after the last assistant turn when the template did not already emit the EOS token there.
Examples longer than ``seq_len`` are truncated at the end; examples left with no trained
token are dropped (counted in ``num_dropped``).

Batching: ``packing=False`` pads each batch to its longest example (``pad_token_id``,
labels ``-100``, ``attention_mask`` 0, right padding); ``packing=True`` places whole examples
greedily, in order, into blocks of ``seq_len`` (an example that does not fit starts a new
block; the rest of the block is padding with labels ``-100`` and attention_mask 0). Examples
in one block attend to the earlier ones (plain causal attention), as in common SFT packing.

Train/val split: example ``x`` is validation when ``split_fraction(json(x), seed) <
val_fraction`` (same rule as pretraining). Tokenized examples are cached under
``<cache>/sft_tokenized/``. Exact resume works as in pretraining
(:mod:`qsparse.data.resumable`).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from .cache import CACHE_FORMAT_VERSION, file_fingerprint, resolve_cache_dir, stable_hash
from .checks import check_source
from .corpora import builder_for_files, load_local_dataset
from .documents import split_fraction
from .resumable import ResumableDataModule
from .sft_synth import SFT_CORPORA, sft_corpus_file
from .tokenizer import resolve_tokenizer, tokenizer_fingerprint

__all__ = [
    "IGNORE_INDEX",
    "SFTDataModule",
    "example_to_messages",
    "pack_examples",
    "pad_collate",
    "render_segments",
    "tokenize_segments",
]

IGNORE_INDEX = -100
_ROLES = ("system", "user", "assistant")


def example_to_messages(
    row: dict[str, Any],
    fmt: str,
    *,
    system_field: str = "system_prompt",
    question_field: str = "question",
    response_field: str = "response",
    messages_field: str = "messages",
    index: int | None = None,
) -> list[dict[str, str]]:
    """Normalize one row to a list of ``{"role", "content"}`` messages.

    Raises:
        ValueError: a field is missing or malformed (the message names it and the row).
    """
    where = f"example {index}" if index is not None else "example"
    if fmt == "openorca":
        for f in (question_field, response_field):
            if not isinstance(row.get(f), str):
                raise ValueError(f"{where}: field {f!r} is missing or not a string")
        msgs = []
        system = row.get(system_field)
        if system:
            msgs.append({"role": "system", "content": str(system)})
        msgs.append({"role": "user", "content": row[question_field]})
        msgs.append({"role": "assistant", "content": row[response_field]})
        return msgs
    if fmt != "messages":
        raise ValueError(f"format must be 'openorca' or 'messages', got {fmt!r}")
    raw = row.get(messages_field)
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where}: field {messages_field!r} must be a non-empty list of messages")
    msgs = []
    for j, m in enumerate(raw):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: {messages_field}[{j}] needs 'role' and 'content' keys")
        if m["role"] not in _ROLES:
            raise ValueError(
                f"{where}: {messages_field}[{j}] has role {m['role']!r}; use one of {_ROLES}"
            )
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}: {messages_field}[{j}].content must be a string")
        msgs.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError(f"{where}: {messages_field} has no assistant message to train on")
    return msgs


def render_segments(
    messages: list[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    use_chat_template: bool,
) -> list[tuple[str | None, bool]]:
    """Cut the rendered conversation into ``(text, trained)`` segments.

    A segment with text ``None`` stands for the EOS token id (plain template, after every
    assistant reply).
    """
    segments: list[tuple[str | None, bool]] = []
    if not use_chat_template:
        headers = {
            "system": "### System:\n",
            "user": "### User:\n",
            "assistant": "### Assistant:\n",
        }
        prompt = ""
        for k, m in enumerate(messages):
            if m["role"] == "assistant":
                segments.append((prompt + headers["assistant"], False))
                segments.append((m["content"], True))
                segments.append((None, True))
                prompt = "\n" if k + 1 < len(messages) else ""
            else:
                prompt += headers[m["role"]] + m["content"] + "\n"
        if prompt.strip():
            segments.append((prompt, False))
        return segments

    def render(msgs: list[dict[str, str]], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages, False)
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        p = render(messages[:i], True)
        f = render(messages[: i + 1], False)
        if not (f.startswith(p) and full.startswith(f)) or len(p) < cursor:
            raise ValueError(
                "the tokenizer's chat_template does not render conversations as growing "
                "prefixes (rendering of turns 0..i must start the rendering of the whole chat), "
                "so response spans cannot be located; use template='plain'"
            )
        if p[cursor:]:
            segments.append((p[cursor:], False))
        segments.append((f[len(p) :], True))
        cursor = len(f)
    if full[cursor:]:
        segments.append((full[cursor:], False))
    return segments


def tokenize_segments(
    segments_per_example: Sequence[list[tuple[str | None, bool]]],
    tokenizer: PreTrainedTokenizerBase,
    use_chat_template: bool,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Tokenize segments (one batched call) -> ``(input_ids, labels)`` int64 arrays per example.

    ``None`` segments become ``eos_token_id``. With a chat template EOS is appended after the
    last trained segment unless that segment already contains the EOS text.
    """
    eos_id = tokenizer.eos_token_id
    eos_text = tokenizer.eos_token
    bos = _bos_prefix(tokenizer)
    texts = [t for segs in segments_per_example for t, _ in segs if t is not None]
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    out = []
    k = 0
    for segs in segments_per_example:
        ids: list[int] = list(bos)
        labels: list[int] = [IGNORE_INDEX] * len(bos)
        last_trained_end = -1
        last_trained_text = ""
        for text, trained in segs:
            if text is None:
                piece = [eos_id]
            else:
                piece = enc[k]
                k += 1
            ids.extend(piece)
            labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))
            if trained:
                last_trained_end = len(ids)
                last_trained_text = text or eos_text
        if use_chat_template and last_trained_end >= 0 and eos_text not in last_trained_text:
            ids.insert(last_trained_end, eos_id)
            labels.insert(last_trained_end, eos_id)
        out.append((np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)))
    return out


def _bos_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """``[bos_token_id]`` when the tokenizer itself prepends BOS on ordinary encoding."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def pad_collate(pad_token_id: int) -> Any:
    """Collate function padding ``input_ids``/``labels`` to the longest example (right side).

    Returns batches ``{"input_ids", "labels", "attention_mask"}: LongTensor[B, L_max]`` with
    ``pad_token_id`` / ``-100`` / ``0`` in padded positions.
    """

    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        n = max(len(x["input_ids"]) for x in items)
        b = len(items)
        ids = torch.full((b, n), pad_token_id, dtype=torch.long)
        labels = torch.full((b, n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((b, n), dtype=torch.long)
        for i, x in enumerate(items):
            m = len(x["input_ids"])
            ids[i, :m] = x["input_ids"]
            labels[i, :m] = x["labels"]
            mask[i, :m] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


def pack_examples(
    examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_token_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy in-order packing of whole examples into blocks of ``seq_len``.

    Returns ``(input_ids, labels, attention_mask)``, each ``int64[num_blocks, seq_len]``.
    Every example must be at most ``seq_len`` long.
    """
    blocks: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, (ids, _) in enumerate(examples):
        if len(ids) > seq_len:
            raise ValueError(f"example {i} has {len(ids)} tokens > seq_len={seq_len}")
        if used + len(ids) > seq_len:
            blocks.append(current)
            current, used = [], 0
        current.append(i)
        used += len(ids)
    if current:
        blocks.append(current)
    n = len(blocks)
    input_ids = np.full((n, seq_len), pad_token_id, dtype=np.int64)
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((n, seq_len), dtype=np.int64)
    for b, members in enumerate(blocks):
        pos = 0
        for j in members:
            ids, lab = examples[j]
            input_ids[b, pos : pos + len(ids)] = ids
            labels[b, pos : pos + len(ids)] = lab
            mask[b, pos : pos + len(ids)] = 1
            pos += len(ids)
    return input_ids, labels, mask


class _ExampleDataset(Dataset):
    """Variable-length examples: item -> ``{"input_ids", "labels"}: LongTensor[L]``."""

    def __init__(self, examples: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, labels = self.examples[i]
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}


class _BlockDataset(Dataset):
    """Packed blocks: item -> ``{"input_ids", "labels", "attention_mask"}: LongTensor[T]``."""

    def __init__(self, ids: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> None:
        self.ids, self.labels, self.mask = ids, labels, mask

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": torch.from_numpy(self.ids[i]),
            "labels": torch.from_numpy(self.labels[i]),
            "attention_mask": torch.from_numpy(self.mask[i]),
        }


def _save_examples(path: Path, examples: list[tuple[np.ndarray, np.ndarray]], meta: dict) -> None:
    lengths = np.asarray([len(x[0]) for x in examples], dtype=np.int64)
    ids = np.concatenate([x[0] for x in examples]) if examples else np.zeros(0, np.int64)
    labels = np.concatenate([x[1] for x in examples]) if examples else np.zeros(0, np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(
        tmp,
        ids=ids.astype(np.int32),
        labels=labels.astype(np.int32),
        lengths=lengths,
        meta=np.asarray(json.dumps(meta)),
    )
    os.replace(tmp, path)


def _load_examples(path: Path) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict]:
    with np.load(path, allow_pickle=False) as z:
        ids = z["ids"].astype(np.int64)
        labels = z["labels"].astype(np.int64)
        lengths = z["lengths"]
        meta = json.loads(str(z["meta"]))
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [(ids[a:b], labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)], meta


class SFTDataModule(ResumableDataModule):
    """LightningDataModule for instruction / chat fine-tuning with a response-only loss.

    Args:
        corpus: generated real-data set name (``"wiki_qa"``, ``"kjv_continue"``, or with
            ``_chat`` appended for the messages layout; see :mod:`qsparse.data.sft_synth`).
            Default when neither ``corpus`` nor ``data_files`` is given: ``"wiki_qa"``.
        data_files: local ``.jsonl``/``.json``/``.parquet`` file(s) instead of a corpus.
        tokenizer: local tokenizer folder (e.g. the HF checkpoint being fine-tuned), a
            tokenizer object, or ``None``/``"bpe"`` for a BPE trained on the training texts.
        vocab_size: size of that trained BPE.
        seq_len: maximum example length (truncation) and block length when packing.
        batch_size: examples (padding) or blocks (packing) per batch per rank.
        packing: pack examples into ``seq_len`` blocks instead of padding each batch.
        val_fraction: expected fraction of examples in validation, in [0, 1).
        num_workers, seed, cache_dir, shuffle, val_batch_size: as in ``PretrainDataModule``.
        max_examples: keep only the first N rows (tiny runs, tests).
        format: ``"auto"`` (from the columns), ``"openorca"`` or ``"messages"``.
        template: ``"auto"`` (chat template if the tokenizer has one), ``"chat"`` or ``"plain"``.
        system_field, question_field, response_field: OpenOrca column names.
        messages_field: chat column name.

    Attributes (after ``setup``): ``tokenizer``, ``vocab_size``, ``num_train_examples``,
    ``num_val_examples``, ``num_dropped`` (examples with no trained token after truncation),
    ``use_chat_template``.
    """

    def __init__(
        self,
        corpus: str | None = None,
        data_files: str | Sequence[str] | None = None,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        vocab_size: int = 4096,
        seq_len: int = 512,
        batch_size: int = 8,
        packing: bool = False,
        val_fraction: float = 0.02,
        num_workers: int = 0,
        seed: int = 1234,
        cache_dir: str | None = None,
        max_examples: int | None = None,
        format: str = "auto",
        template: str = "auto",
        system_field: str = "system_prompt",
        question_field: str = "question",
        response_field: str = "response",
        messages_field: str = "messages",
        shuffle: bool = True,
        val_batch_size: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers, shuffle=shuffle)
        corpus = check_source(corpus, data_files, "wiki_qa", seq_len, val_fraction, "fine-tune")
        if format not in ("auto", "openorca", "messages"):
            raise ValueError(f"format must be 'auto', 'openorca' or 'messages', got {format!r}")
        if template not in ("auto", "chat", "plain"):
            raise ValueError(f"template must be 'auto', 'chat' or 'plain', got {template!r}")
        if max_examples is not None and max_examples < 1:
            raise ValueError(f"max_examples must be >= 1 or null, got {max_examples!r}")
        self.corpus = corpus
        self.data_files = data_files
        self.tokenizer_spec = tokenizer
        self.bpe_vocab_size = vocab_size
        self.seq_len = seq_len
        self.packing = packing
        self.val_fraction = float(val_fraction)
        self.cache_dir = resolve_cache_dir(cache_dir)
        self.max_examples = max_examples
        self.format = format
        self.template = template
        self.fields = {
            "system_field": system_field,
            "question_field": question_field,
            "response_field": response_field,
            "messages_field": messages_field,
        }
        self.val_batch_size = val_batch_size or batch_size
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.use_chat_template: bool | None = None
        self.num_train_examples: int | None = None
        self.num_val_examples: int | None = None
        self.num_dropped: int | None = None
        self.cache_path: Path | None = None
        self._files: list[str] | None = None
        self._train_dataset: Dataset | None = None
        self._val_dataset: Dataset | None = None
        self._train_examples: list[tuple[np.ndarray, np.ndarray]] | None = None
        self._val_examples: list[tuple[np.ndarray, np.ndarray]] | None = None

    @property
    def vocab_size(self) -> int:
        """``len(tokenizer)``."""
        if self.tokenizer is None:
            self.prepare_data()
        assert self.tokenizer is not None
        return len(self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        assert tok is not None
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is None:
            raise ValueError("tokenizer has neither pad_token nor eos_token; set one")
        return int(pad)

    # ------------------------------------------------------------------ data
    def _resolve_files(self) -> list[str]:
        if self._files is None:
            if self.corpus is not None:
                names = sorted(SFT_CORPORA) + sorted(f"{k}_chat" for k in SFT_CORPORA)
                if self.corpus not in names:
                    raise ValueError(
                        f"corpus: unknown SFT corpus {self.corpus!r}; choose one of {names} or "
                        "pass data_files"
                    )
                self._files = [str(sft_corpus_file(self.corpus, self.cache_dir))]
            else:
                files = (
                    [self.data_files]
                    if isinstance(self.data_files, (str, os.PathLike))
                    else list(self.data_files or [])
                )
                if not files:
                    raise ValueError("data_files: empty list; give at least one local file")
                for f in files:
                    if not Path(f).is_file():
                        raise FileNotFoundError(f"data_files: file not found: {str(f)!r}")
                self._files = [str(Path(f).resolve()) for f in files]
        return self._files

    def _rows(self) -> tuple[list[list[dict[str, str]]], str]:
        """All rows as message lists (after ``max_examples``) and the detected format."""
        files = self._resolve_files()
        builder = builder_for_files(files)
        if builder not in ("json", "parquet"):
            raise ValueError(
                f"data_files: SFT data must be .jsonl/.json/.parquet, got {builder!r} files"
            )
        ds = load_local_dataset(builder, files, self.cache_dir)
        cols = set(ds.column_names)
        f = self.fields
        fmt = self.format
        if fmt == "auto":
            if f["messages_field"] in cols:
                fmt = "messages"
            elif f["question_field"] in cols and f["response_field"] in cols:
                fmt = "openorca"
            else:
                raise ValueError(
                    f"cannot find SFT fields in {files}: columns are {sorted(cols)}; expected "
                    f"{f['messages_field']!r} (chat) or {f['question_field']!r} + "
                    f"{f['response_field']!r} (OpenOrca); set messages_field / question_field / "
                    "response_field to your column names"
                )
        need = (
            [f["messages_field"]]
            if fmt == "messages"
            else [f["question_field"], f["response_field"]]
        )
        missing = [c for c in need if c not in cols]
        if missing:
            raise ValueError(
                f"fields {missing} not found in {files} (columns: {sorted(cols)}); set the "
                "matching *_field argument"
            )
        if self.max_examples is not None:
            ds = ds.select(range(min(self.max_examples, len(ds))))
        rows = [example_to_messages(row, fmt, index=i, **self.fields) for i, row in enumerate(ds)]
        return rows, fmt

    def _data_key(self) -> list[Any]:
        return [
            file_fingerprint(self._resolve_files()),
            self.format,
            self.fields,
            self.max_examples,
            self.val_fraction,
            self.seed,
        ]

    def prepare_data(self) -> None:
        """Build the tokenizer and the tokenized-example cache (idempotent)."""
        if self.cache_path is not None and self.cache_path.is_file():
            return
        rows_cache: dict[str, Any] = {}

        def rows() -> list[list[dict[str, str]]]:
            if "rows" not in rows_cache:
                rows_cache["rows"] = self._rows()[0]
            return rows_cache["rows"]

        def split() -> tuple[list[int], list[int]]:
            if "split" not in rows_cache:
                rs = rows()
                u = np.asarray(
                    [split_fraction(json.dumps(r, sort_keys=True), self.seed) for r in rs]
                )
                is_val = u < self.val_fraction
                if self.val_fraction > 0 and not is_val.any() and len(u):
                    is_val[int(np.argmin(u))] = True
                if is_val.all():
                    raise ValueError(
                        f"val_fraction={self.val_fraction} leaves no training examples "
                        f"({len(u)} examples); lower it or raise max_examples"
                    )
                rows_cache["split"] = (
                    np.flatnonzero(~is_val).tolist(),
                    np.flatnonzero(is_val).tolist(),
                )
            return rows_cache["split"]

        def train_texts() -> Iterable[str]:
            rs = rows()
            for i in split()[0]:
                yield "\n".join(m["content"] for m in rs[i])

        if self.tokenizer is None:
            self.tokenizer = resolve_tokenizer(
                self.tokenizer_spec,
                texts=train_texts,
                corpus_name=f"sft_{self.corpus or 'files'}",
                key_parts=self._data_key(),
                vocab_size=self.bpe_vocab_size,
                cache_dir=self.cache_dir,
            )
        tok = self.tokenizer
        if tok.eos_token_id is None:
            raise ValueError("tokenizer has no eos_token; responses end with EOS, set one")
        has_template = bool(getattr(tok, "chat_template", None))
        if self.template == "chat" and not has_template:
            raise ValueError(
                "template='chat' but the tokenizer has no chat_template; use template='plain' "
                "or a tokenizer with a chat template"
            )
        self.use_chat_template = self.template == "chat" or (
            self.template == "auto" and has_template
        )
        key = stable_hash(
            CACHE_FORMAT_VERSION,
            "sft",
            self._data_key(),
            tokenizer_fingerprint(tok),
            self.use_chat_template,
            self.seq_len,
        )
        self.cache_path = self.cache_dir / "sft_tokenized" / f"{self.corpus or 'files'}-{key}.npz"
        if self.cache_path.is_file():
            return
        rs = rows()
        train_idx, val_idx = split()
        parts = []
        dropped = 0
        for idx in (train_idx, val_idx):
            segs = [render_segments(rs[i], tok, self.use_chat_template) for i in idx]
            examples = []
            for ids, labels in tokenize_segments(segs, tok, self.use_chat_template):
                ids, labels = ids[: self.seq_len], labels[: self.seq_len]
                if (labels != IGNORE_INDEX).any():
                    examples.append((ids, labels))
                else:
                    dropped += 1
            parts.append(examples)
        meta = {"num_train": len(parts[0]), "num_val": len(parts[1]), "dropped": dropped}
        _save_examples(self.cache_path, parts[0] + parts[1], meta)

    def setup(self, stage: str | None = None) -> None:
        """Load cached examples (building them first when needed) and build the datasets."""
        self.prepare_data()
        if self._train_dataset is not None:
            return
        assert self.cache_path is not None
        examples, meta = _load_examples(self.cache_path)
        n_train = meta["num_train"]
        self._train_examples, self._val_examples = examples[:n_train], examples[n_train:]
        self.num_train_examples = n_train
        self.num_val_examples = meta["num_val"]
        self.num_dropped = meta["dropped"]
        if self.num_dropped:
            warnings.warn(
                f"{self.num_dropped} SFT examples had no response token left after truncation to "
                f"seq_len={self.seq_len} and were dropped",
                stacklevel=2,
            )
        if n_train == 0:
            raise ValueError("no training examples left; raise seq_len or max_examples")
        pad = self.pad_token_id
        if self.packing:
            self._train_dataset = _BlockDataset(
                *pack_examples(self._train_examples, self.seq_len, pad)
            )
            self._val_dataset = _BlockDataset(*pack_examples(self._val_examples, self.seq_len, pad))
        else:
            self._train_dataset = _ExampleDataset(self._train_examples)
            self._val_dataset = _ExampleDataset(self._val_examples)

    def train_dataloader(self) -> DataLoader:
        """Training batches ``{"input_ids", "labels", "attention_mask"}``, resumable."""
        if self._train_dataset is None:
            self.setup("fit")
        assert self._train_dataset is not None
        return self._loader(self._train_dataset, True, self.batch_size, self._collate())

    def val_dataloader(self) -> DataLoader:
        """Validation batches in fixed order."""
        if self._val_dataset is None:
            self.setup("fit")
        assert self._val_dataset is not None
        return self._loader(self._val_dataset, False, self.val_batch_size, self._collate())

    def _collate(self) -> Any:
        # packed blocks all have length seq_len and carry their own attention_mask
        return None if self.packing else pad_collate(self.pad_token_id)
