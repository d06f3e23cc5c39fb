"""Evaluation of sparsified models: perplexity on local text, measured activation sparsity and
activated parameters (:func:`qsparse.stats.sparsity_report`), and multiple-choice accuracy
through lm-eval on local task files.

``lm_eval`` is imported lazily (it is the optional ``eval`` extra): use
``qsparse.evaluation.lm_eval_model.QSparseLM`` and ``run_lm_eval`` when it is installed.
"""

from .local_tasks import GROUP as LOCAL_TASK_GROUP
from .local_tasks import TASKS as LOCAL_TASKS
from .local_tasks import build_local_tasks
from .perplexity import (
    PerplexityResult,
    perplexity,
    perplexity_of_tokens,
    token_stream,
)
from .runner import EvalResult, evaluate_checkpoint, load_for_eval, run_lm_eval

__all__ = [
    "LOCAL_TASKS",
    "LOCAL_TASK_GROUP",
    "EvalResult",
    "PerplexityResult",
    "build_local_tasks",
    "evaluate_checkpoint",
    "load_for_eval",
    "perplexity",
    "perplexity_of_tokens",
    "run_lm_eval",
    "token_stream",
]
