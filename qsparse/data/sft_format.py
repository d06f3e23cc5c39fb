"""SFT example formatting and loss masking: one row -> messages -> ``(input_ids, labels)``.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

__all__ = [
    "IGNORE_INDEX",
    "example_to_messages",
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
