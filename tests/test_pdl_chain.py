"""The programmatic-dependent-launch chain of a decode step, checked on the launches themselves.

With :data:`qsparse.kernels.gemv.PDL_CHAIN` on (off by default), on Hopper each site's
one-program kernel (selection, list or ternary activation kernel) is launched as a programmatic
dependent of the kernel before it (``WAIT`` + ``launch_pdl``) and the GEMVs let the kernel after
them launch (``NEXT``); ``GemvConfig.pdl`` off turns it off too. Kernel launches are recorded
instead of run (as ``tests/kernel_compile_check.py`` does), with the Hopper launch path forced
on, so the keywords each kernel gets can be read on a CPU machine.
"""

from __future__ import annotations

import functools

import pytest
import torch
from triton.runtime.jit import JITFunction

import qsparse.kernels.gemv as G
import qsparse.kernels.threshold_gemv as TG

BF16 = torch.bfloat16


@pytest.fixture
def launches(monkeypatch):
    """Launches recorded as (kernel name, keywords) while the Hopper path is forced on."""
    seen: list[tuple[str, dict]] = []

    def recorder(self, grid):
        return lambda *args, **kw: seen.append((self.fn.__name__, kw))

    monkeypatch.setattr(JITFunction, "__getitem__", recorder)
    monkeypatch.setattr(G, "_pdl_ok", lambda x: True)
    monkeypatch.setattr(G, "_interpreted", lambda x: False)
    monkeypatch.setattr(TG, "_pdl_ok", lambda x: True)
    return seen


def _site_calls() -> None:
    """A batch-1 top-k site (RMSNorm producer, residual sum, carried threshold), a ternary site
    with and without top-k, and a fixed-threshold site."""
    x = torch.randn(1, 1024, dtype=BF16)
    wt = G.prepare_dense(torch.randn(768, 1024, dtype=BF16))
    norm = G.Producer("rmsnorm", torch.ones(1024, dtype=BF16), 1e-6)
    G.sparse_gemv(x, wt, 400, hint=G.new_hint(1), producer=norm, residual=torch.randn_like(x))
    codes, alpha = G.ternarize(torch.randn(768, 1024))
    packed = G.pack_ternary(codes)
    G.ternary_gemv(x, packed, alpha, None, 8)
    G.ternary_gemv(x, packed, alpha, 400, 8, hint=G.new_hint(1))
    cfg = G.sparse_config_for_weights(wt, 512)
    list_rows = functools.partial(TG.threshold_rows, x, torch.tensor([0.5]), wait=cfg.pdl)
    G._sparse_gemv_launch(x, wt, -1, cfg, BF16, None, list_rows=list_rows)


FIRST = ("_compact_kernel", "_ternary_prep_kernel", "_threshold_list_kernel")
GEMVS = ("_compact_gemv_kernel", "_ternary_dp4a_kernel")


def _by_role(seen: list[tuple[str, dict]]) -> tuple[list[dict], list[dict]]:
    firsts = [kw for name, kw in seen if name in FIRST]
    gemvs = [kw for name, kw in seen if name in GEMVS]
    assert len(firsts) == 4 and len(gemvs) == 4, [name for name, _ in seen]
    return firsts, gemvs


def test_site_kernels_wait_for_the_gemv_before_them_and_gemvs_let_them_launch(
    launches, monkeypatch
):
    monkeypatch.setattr(G, "PDL_CHAIN", True)
    _site_calls()
    firsts, gemvs = _by_role(launches)
    assert all(kw["WAIT"] and kw["launch_pdl"] for kw in firsts)
    assert all(kw["PDL"] and kw["NEXT"] and kw["launch_pdl"] for kw in gemvs)


def test_pdl_chain_off_launches_each_site_kernel_after_the_one_before(launches, monkeypatch):
    monkeypatch.setattr(G, "PDL_CHAIN", False)
    _site_calls()
    firsts, gemvs = _by_role(launches)
    assert not any(kw["WAIT"] or kw.get("launch_pdl") for kw in firsts)
    # the GEMV itself stays a programmatic dependent of its own selection
    assert all(kw["PDL"] and not kw["NEXT"] for kw in gemvs)


def test_no_pdl_in_the_config_turns_the_chain_off_too(launches):
    x = torch.randn(1, 1024, dtype=BF16)
    wt = G.prepare_dense(torch.randn(768, 1024, dtype=BF16))
    G.sparse_gemv(x, wt, 400, G.GemvConfig(pdl=False), hint=G.new_hint(1))
    (first,) = [kw for name, kw in launches if name == "_compact_kernel"]
    (gemv,) = [kw for name, kw in launches if name == "_compact_gemv_kernel"]
    assert not first["WAIT"] and "launch_pdl" not in first
    assert not gemv["PDL"] and not gemv["NEXT"]


def test_no_chain_without_the_hopper_path():
    x = torch.randn(1, 8)
    assert G.chain_next(x) is False and G._wait_opts(x) == {"WAIT": False}
