"""Building blocks in plain PyTorch: sparsifiers, quantizers, QSparseLinear, GLU FFNs."""

from .config import SITES, QuantConfig, SparsityConfig, keep_count
from .ffn import FATReLU, GLUFeedForward, ReLUSquared, make_activation
from .linear import ActivationSparsifier, QSparseLinear
from .quant import absmax_quantize, absmean_ternarize, straight_through, ternary_scale
from .topk import apply_mask, block_topk, block_topk_mask, token_topk, topk_mask

__all__ = [
    "SITES",
    "ActivationSparsifier",
    "FATReLU",
    "GLUFeedForward",
    "QSparseLinear",
    "QuantConfig",
    "ReLUSquared",
    "SparsityConfig",
    "absmax_quantize",
    "absmean_ternarize",
    "apply_mask",
    "block_topk",
    "block_topk_mask",
    "keep_count",
    "make_activation",
    "straight_through",
    "ternary_scale",
    "token_topk",
    "topk_mask",
]
