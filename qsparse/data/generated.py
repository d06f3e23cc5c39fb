"""Training text sampled from the dense model itself, for distillation that generalises.

Continued training on a few small corpora fits them and drifts away from the dense model on
other text (docs/recovery.md). Samples of the dense model cover what it knows, so a student
distilled on them (KL to the same dense model) is pulled towards the teacher everywhere the
teacher puts probability mass, not only on the training corpora (the data-free idea of
LLM-QAT, Liu et al. 2023, where the model's own generations beat a real-data subset).

:func:`generate_corpus` writes ``n`` documents to a ``.jsonl`` file (``{"text": ...}`` per
line) that ``data=mixture`` takes as a source like any corpus::

    python -m qsparse.data.generated BASE /tmp/gen.jsonl --tokens 2000000 --prompts wiki_en kjv
    qsparse-train recipe=continue/recovery_smollm2 '+data.sources={/tmp/gen.jsonl:0.5}'

Each document is ``prompt + continuation``: the prompt is the first ``prompt_tokens`` tokens
of a random document of the ``prompts`` sources (the run's own training corpora, never the
evaluation text), the continuation ``new_tokens`` tokens drawn from the model's full
distribution (``softmax(z / T)``, no top-k/top-p truncation, so the samples follow the
distribution the KL matches), cut at the first end-of-sequence token. Sampling is seeded:
the same arguments give the same file on the same device and library versions.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..dtypes import torch_dtype
from ..errors import UserError
from ..io import atomic_write_text

__all__ = ["GenerationError", "generate_corpus", "sample_prompts"]


class GenerationError(UserError, ValueError):
    """A setting of :func:`generate_corpus` that cannot work (named in the message)."""


def sample_prompts(
    tokenizer, sources: Sequence[str], n: int, prompt_tokens: int, seed: int
) -> torch.Tensor:
    """``(n, prompt_tokens)`` int64 ids: the first tokens of documents drawn at random.

    Documents shorter than ``prompt_tokens`` tokens are skipped; with fewer usable documents
    than ``n`` they are reused (each draw is independent, ``numpy.random.default_rng(seed)``).
    """
    from .documents import read_documents

    heads: list[list[int]] = []
    for source in sources:
        for doc in read_documents(source):
            ids = tokenizer(doc[: 40 * prompt_tokens], add_special_tokens=False)["input_ids"]
            if len(ids) >= prompt_tokens:
                heads.append(ids[:prompt_tokens])
    if not heads:
        raise GenerationError(
            f"prompts {list(sources)}: no document has {prompt_tokens} tokens; lower "
            "prompt_tokens or pick other prompt sources"
        )
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(heads), size=n)
    return torch.tensor([heads[i] for i in pick], dtype=torch.long)


@torch.no_grad()
def generate_corpus(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tokens: int,
    prompts: Sequence[str] = ("wiki_en",),
    prompt_tokens: int = 8,
    new_tokens: int = 256,
    batch_size: int = 256,
    temperature: float = 1.0,
    seed: int = 0,
    device: str | None = None,
    dtype: str = "auto",
) -> dict[str, float]:
    """Sample ``tokens`` continuation tokens (about) from ``checkpoint`` into ``out`` (.jsonl).

    Args:
        checkpoint: a transformers folder (the dense model: the teacher of the distillation).
        out: the ``.jsonl`` file to write (atomically; an existing file is refused).
        tokens: continuation tokens to generate, >= 1 (rounded up to whole batches).
        prompts: corpus names or files whose document beginnings prompt the model.
        prompt_tokens: prompt length in tokens, >= 1.
        new_tokens: continuation length per document, >= 1.
        batch_size: sequences sampled at once, >= 1.
        temperature: T of ``softmax(z / T)``, > 0.
        seed: seeds the prompt draw and the sampling.
        device: ``"cuda"``/``"cpu"`` (default: CUDA when available).
        dtype: model weights, ``"auto"`` = bf16 on CUDA, fp32 on the CPU.

    Returns:
        ``documents``, ``generated_tokens`` (up to the first EOS of each), ``seconds`` and
        ``tokens_per_s``.
    """
    out = Path(out)
    for name, value, ok in (
        ("tokens", tokens, isinstance(tokens, int) and tokens >= 1),
        ("prompt_tokens", prompt_tokens, isinstance(prompt_tokens, int) and prompt_tokens >= 1),
        ("new_tokens", new_tokens, isinstance(new_tokens, int) and new_tokens >= 1),
        ("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1),
        ("temperature", temperature, isinstance(temperature, (int, float)) and temperature > 0),
    ):
        if not ok:
            raise GenerationError(f"{name}={value!r} is out of range (see --help)")
    if out.suffix != ".jsonl":
        raise GenerationError(f"{out}: the output must be a .jsonl file")
    if out.exists():
        raise GenerationError(f"{out} exists; remove it or pick another output file")
    from ..models.hf import load_hf_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    model = load_hf_model(checkpoint, dtype=torch_dtype(dtype, "dtype")).to(device)
    batches = -(-tokens // (new_tokens * batch_size))
    prompt_ids = sample_prompts(tokenizer, prompts, batches * batch_size, prompt_tokens, seed)
    eos = tokenizer.eos_token_id
    gen = torch.Generator(device=device).manual_seed(seed)
    rows: list[str] = []
    counted = 0
    t0 = time.perf_counter()
    for b in range(batches):
        ids = prompt_ids[b * batch_size : (b + 1) * batch_size].to(device)
        cont = _sample(model, ids, new_tokens, temperature, gen)
        for p, c in zip(ids.tolist(), cont.tolist(), strict=True):
            if eos is not None and eos in c:
                c = c[: c.index(eos)]
            counted += len(c)
            text = tokenizer.decode(p + c, skip_special_tokens=True).strip()
            if text:
                rows.append(json.dumps({"text": text}, ensure_ascii=False))
    seconds = time.perf_counter() - t0
    atomic_write_text(out, "\n".join(rows) + "\n")
    return {
        "documents": float(len(rows)),
        "generated_tokens": float(counted),
        "seconds": seconds,
        "tokens_per_s": counted / max(seconds, 1e-9),
    }


def _sample(
    model: torch.nn.Module,
    ids: torch.Tensor,
    new_tokens: int,
    temperature: float,
    gen: torch.Generator,
) -> torch.Tensor:
    """``(B, new_tokens)`` ids drawn from ``softmax(logits / T)`` (the decoder's
    :func:`~qsparse.generate.pick_next`) with transformers' own KV cache, for any causal LM."""
    import inspect

    from ..generate import pick_next

    # transformers renamed past_key_values -> cache (5.2x); take whichever this version has
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids, use_cache=True)
    drawn = []
    for _ in range(new_tokens):
        nxt = pick_next(out.logits[:, -1], temperature, generator=gen)[:, None]
        drawn.append(nxt)
        past = getattr(out, "cache", None) or out.past_key_values
        out = model(input_ids=nxt, use_cache=True, **{kw: past})
    return torch.cat(drawn, dim=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="dense transformers folder (the teacher)")
    p.add_argument("out", help="output .jsonl file")
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--prompts", nargs="+", default=["wiki_en"], help="corpora or files")
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto")
    args = p.parse_args(argv)
    try:
        stats = generate_corpus(**vars(args))  # the options are its parameters, by name
    except UserError as exc:
        raise SystemExit(f"qsparse.data.generated: {exc}") from None
    print(
        f"{args.out}: {stats['documents']:.0f} documents, {stats['generated_tokens']:.0f} "
        f"generated tokens in {stats['seconds']:.1f} s ({stats['tokens_per_s']:.0f} tokens/s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
