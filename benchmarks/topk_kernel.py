"""Figure: fused top-k sparsifier vs the PyTorch reference (torch.topk mask + STE).

For each projection-input shape of the 374M model (8192 tokens x 2048 / 5632, bf16) times the
forward+backward of :class:`qsparse.nn.linear.ActivationSparsifier` (S=0.6) with the Triton
kernel and with the reference, plus the block (16:32) pattern and the int8-quantized variant,
and the matmul the sparsifier feeds for scale. Prints ``RATIO`` lines (reference / kernel).

    PYTHONPATH=$PWD python3 benchmarks/topk_kernel.py
"""

from __future__ import annotations

import argparse

import torch

import qsparse.kernels as K
from benchmarks._figures import emit
from benchmarks._timing import row, time_cuda
from qsparse.nn.linear import ActivationSparsifier


def fwd_bwd(module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor):
    def run():
        x.grad = None
        module(x).backward(g)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--ratio", type=float, default=0.6)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(row("site", "variant", "reference ms", "kernel ms", "speed-up"))
    print(row("---", "---", "---", "---", "---"))
    for dim in (2048, 5632):
        x = torch.randn(args.tokens, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn_like(x)
        variants = {
            "token_topk": dict(pattern="token_topk"),
            "token_topk+int8": dict(pattern="token_topk", act_bits=8),
            "block_topk 16:32": dict(pattern="block_topk", block_size=32, ratio=0.5),
            "token_topk no-STE": dict(pattern="token_topk", ste=False),
        }
        for name, kw in variants.items():
            kw = {"ratio": args.ratio, **kw}
            mod = ActivationSparsifier(dim, **kw).cuda()
            K.ENABLED = False
            t_ref = time_cuda(fwd_bwd(mod, x, g))
            K.ENABLED = True
            out = mod(x)
            assert K.fused_token_topk(x, 3, True, None) is not None, "kernel did not dispatch"
            t_k = time_cuda(fwd_bwd(mod, x, g))
            print(
                row(
                    f"[{args.tokens}, {dim}]",
                    name,
                    f"{t_ref:.3f}",
                    f"{t_k:.3f}",
                    f"{t_ref / t_k:.2f}x",
                )
            )
            print(f"RATIO topk_{name.replace(' ', '_')}_{dim} {t_ref / t_k:.2f}", flush=True)
            emit(f"topk.{name.replace(' ', '_')}.{dim}", t_ref / t_k)
            del out
        w = torch.randn(5632 if dim == 2048 else 2048, dim, device="cuda", dtype=torch.bfloat16)
        xs = x.detach()
        t_mm = time_cuda(lambda xs=xs, w=w: xs @ w.t())
        t_topk = time_cuda(lambda xs=xs, dim=dim: xs.float().abs().topk(int(0.4 * dim), -1))
        t_kern = time_cuda(
            lambda xs=xs, dim=dim: K.fused_token_topk(xs, int(0.4 * dim), True, None)
        )
        print(
            f"# [{args.tokens}, {dim}] forward only: matmul it feeds {t_mm:.3f} ms, "
            f"torch.topk {t_topk:.3f} ms, fused kernel {t_kern:.3f} ms"
        )
        emit(f"topk.forward.{dim}.matmul_ms", t_mm, "ms")
        emit(f"topk.forward.{dim}.torch_topk_ms", t_topk, "ms")
        emit(f"topk.forward.{dim}.kernel_ms", t_kern, "ms")


if __name__ == "__main__":
    main()
