"""An lm-evaluation-harness model wrapping a qsparse or transformers causal LM in memory.

:class:`QSparseLM` subclasses ``lm_eval.api.model.TemplateLM`` (an ``LM``), so
``lm_eval.simple_evaluate(model=QSparseLM(model, tokenizer), tasks=[...])`` evaluates the
sparsified model exactly as it runs, with no reload through a registry name.
Not lm-eval's own ``HFLM``: it takes a transformers ``PreTrainedModel``, which qsparse's
:class:`~qsparse.models.llama.LlamaForCausalLM` is not; this wrapper serves both kinds.

Scoring (``loglikelihood``): for a request (context c, continuation x) the tokens ``c + x``
(left-truncated to ``max_length + 1``) are fed without their last token; the score is
``sum_j log p(x_j | c, x_<j)`` in fp32 and ``is_greedy`` says whether every ``x_j`` was
the argmax. Requests are batched longest first and right-padded (causal attention keeps
padding from reaching real positions, and top-k is per token, so padding changes nothing).
``loglikelihood_rolling`` uses lm-eval's disjoint rolling windows; ``generate_until`` decodes
greedily, re-running the full prefix each step (small models, correctness over speed).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:
    from lm_eval.api.model import TemplateLM
except ImportError as err:  # pragma: no cover - exercised only without the eval extra
    raise ImportError(
        "qsparse.evaluation.lm_eval_model needs the lm-evaluation-harness: "
        "pip install 'lm-eval>=0.4.9,<0.5' (or pip install 'qsparse[eval]')"
    ) from err


class QSparseLM(TemplateLM):
    """lm-eval model over an in-memory causal LM.

    Args:
        model: a module whose ``forward(input_ids=[B, T])`` returns ``.logits`` [B, T, V]
            (qsparse :class:`~qsparse.models.llama.LlamaForCausalLM` or a transformers LM).
        tokenizer: its tokenizer (``encode``/``decode``, ``eos_token_id``).
        batch_size: requests per forward pass.
        max_length: longest input fed to the model (default: the model config's
            ``max_position_embeddings``, else 2048).
        max_gen_toks: default generation length for ``generate_until``.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        batch_size: int = 8,
        max_length: int | None = None,
        max_gen_toks: int = 64,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id; lm-eval needs one")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        if max_length is None:
            config = getattr(model, "config", None)
            max_length = int(getattr(config, "max_position_embeddings", 2048) or 2048)
        self.max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)
        p = next(model.parameters())
        self._device = p.device

    # -- TemplateLM hooks ------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "qsparse")).replace("/", "__")

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        return list(self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    # -- scoring ---------------------------------------------------------------------------

    @torch.no_grad()
    def _logprobs(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """fp32 log-softmax [len(row), V] for each token row (right-padded batch)."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        out = self.model(input_ids=ids.to(self._device))
        logits = out.logits if hasattr(out, "logits") else out["logits"]
        logp = F.log_softmax(logits.float(), dim=-1).cpu()
        return [logp[i, : len(r)] for i, r in enumerate(rows)]

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(
            range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2]))
        )
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            rows, conts = [], []
            for i in chunk:
                _, ctx, cont = requests[i]
                if not cont:
                    raise ValueError(f"request {requests[i][0]!r} has an empty continuation")
                whole = (ctx + cont)[-(self.max_length + 1) :]
                rows.append(whole[:-1])
                conts.append(cont[-len(whole) + 1 :] if len(cont) >= len(whole) else cont)
            for i, row, cont, logp in zip(chunk, rows, conts, self._logprobs(rows), strict=True):
                n = len(cont)
                target = torch.tensor(cont, dtype=torch.long)
                tail = logp[len(row) - n :]
                score = float(tail.gather(-1, target[:, None]).sum())
                greedy = bool((tail.argmax(-1) == target).all())
                results[i] = (score, greedy)
                if self.cache_hook is not None and requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], (score, greedy))
        return [r for r in results if r is not None]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for req in requests:
            (text,) = req.args
            tokens = self.tok_encode(text)
            pieces = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=tokens,
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scored = self._loglikelihood_tokens([(None, c, x) for c, x in pieces])
            out.append(sum(s for s, _ in scored))
        return out

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            if isinstance(until, str):
                until = [until]
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context)[-self.max_length :]
            new: list[int] = []
            text = ""
            for _ in range(max_new):
                window = (ids + new)[-self.max_length :]
                nxt = int(self._logprobs([window])[0][-1].argmax())
                if nxt == self.eot_token_id:
                    break
                new.append(nxt)
                text = self.tok_decode(new)
                if any(u in text for u in until):
                    break
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out
