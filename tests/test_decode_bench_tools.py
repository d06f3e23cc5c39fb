"""Decode benchmark tools on CPU: benchmarks/decode_variants.py (each variant changes the
kernel settings it names for its own run only; a figure per variant, tiny preset), the share
attribution of benchmarks/decode_profile.py --timeline, and the grid-barrier kernel of
benchmarks/grid_barrier.py under the interpreter (one program), and benchmarks/hint_band.py's
bf16 draw."""

from __future__ import annotations

import pytest

from benchmarks import decode_variants as DV
from qsparse import decode_view as V
from qsparse.kernels import HAS_TRITON
from qsparse.kernels import decode_attention as DA
from qsparse.kernels import gemv as G


def test_each_variant_sets_what_it_names_and_restores_it():
    dense, sparse, pdl = G.TERNARY_CONFIG, G.TERNARY_SPARSE_CONFIG, G._pdl_device_ok
    with DV.variant("ternary=32x8x4", "bitnet"):
        assert (G.TERNARY_CONFIG.block_k, G.TERNARY_CONFIG.block_n) == (32, 8)
        assert G.TERNARY_CONFIG.num_warps == 4 and G.TERNARY_SPARSE_CONFIG is sparse
    with DV.variant("prep_warps=4", "bitnet_qsparse"):
        assert G.TERNARY_SPARSE_CONFIG.select_warps == 4 and G.TERNARY_CONFIG is dense
    with DV.variant("no_pdl", "qsparse"):
        assert G._pdl_device_ok(0) is False
    with DV.variant("no_residual_sum", "qsparse"):
        assert V.RESIDUAL_SUM is False
    with DV.variant("pdl_chain", "bitnet"):
        assert G.PDL_CHAIN is True
    with DV.variant("glu_selection", "qsparse"):
        assert V.GLU_IN_SELECTION == ("sparse", "threshold", "ternary")
    with DV.variant("no_glu_selection", "bitnet"):
        assert V.GLU_IN_SELECTION == ()
    with DV.variant("no_attention_preload", "bitnet"):
        assert DA.PRELOAD_FIRST_BLOCK is False
    with DV.variant("attention_preload", "bitnet"):
        assert DA.PRELOAD_FIRST_BLOCK is True
    with DV.variant("weights_evict_first", "qsparse"):
        assert G.WEIGHTS_EVICT_FIRST is True and G._weights_evict(False) == "evict_first"
        assert G._weights_evict(True) == ""  # the interpreter: no cache policy
    with DV.variant("no_weights_evict_first", "bitnet"):
        assert G.WEIGHTS_EVICT_FIRST is False and G._weights_evict(False) == ""
    with DV.variant("select_warps=16", "qsparse"):
        assert G.select_warps_for(4096) == 16 and G.select_warps_for(4096, 8) == 8
        assert G.list_select_warps(4096) == 16 and G.list_select_warps(11008) == 16
    with DV.variant("wide_select_warps=16", "qsparse"):
        assert G.list_select_warps(11008) == 16 and G.list_select_warps(11008, 8) == 8
        assert G.list_select_warps(4096) == 8 and G.list_select_warps(5632) == 8
    assert (G.TERNARY_CONFIG, G.TERNARY_SPARSE_CONFIG) == (dense, sparse)
    assert G._pdl_device_ok is pdl and V.RESIDUAL_SUM is True and G.PDL_CHAIN is False
    assert V.GLU_IN_SELECTION == ("ternary",) and DA.PRELOAD_FIRST_BLOCK is False
    assert G.WEIGHTS_EVICT_FIRST is True and G.select_warps_for(4096, 0, 1024) == 8
    assert G.list_select_warps(11008) == G.WIDE_LIST_WARPS == 32


def test_script_prints_a_ratio_per_variant(capsys):
    DV.main(
        ["--preset", "tiny", "--mode", "bitnet", "--variants", "default,ternary=32x16x2"]
        + ["--new-tokens", "2", "--compile-backend", "eager", "--", "--device", "cpu"]
        + ["--no-graph"]
    )
    out = capsys.readouterr().out
    figures = {ln.split()[1]: float(ln.split()[2]) for ln in out.splitlines() if "FIGURE" in ln}
    assert figures["decode_variants.tiny.bitnet.default.ratio"] == 1.0
    assert figures["decode_variants.tiny.bitnet.ternary_32x16x2.tokens_per_s"] > 0


def test_unknown_variant_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit):
        DV.main(["--variants", "default,ternary=0x16x2"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--variants" in err and "ternary=BKxBNxW" in err


def test_timeline_charges_an_early_dependent_from_its_predecessors_end():
    from benchmarks.decode_profile import attribute

    # a selection (0-4 us), its GEMV launched early at 1 us ending at 10, a gap, an add
    ks = [("select", 0.0, 4.0), ("gemv", 1.0, 9.0), ("add", 11.0, 1.0), ("select", 13.0, 2.0)]
    span, share, calls = attribute(ks)
    assert span == 15.0
    assert share == {"select": 6.0, "gemv": 6.0, "add": 1.0}
    assert calls == {"select": 2, "gemv": 1, "add": 1}
    assert span - sum(share.values()) == 2.0  # no kernel ran in 10-11 and 12-13


BARRIER_SCRIPT = """
import torch
from benchmarks.grid_barrier import barrier_rounds

out, count = barrier_rounds(1, 4, "cpu")  # one program: every barrier opens at its arrival
assert int(count) == 4 and out.tolist() == [1 + 2 + 3 + 4], (count, out)
print("BARRIER OK")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_grid_barrier_kernel_counts_one_arrival_per_round_under_the_interpreter():
    from conftest import run_interpreted

    assert "BARRIER OK" in run_interpreted(BARRIER_SCRIPT)


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_grid_barrier_refuses_more_programs_than_sms():
    from benchmarks.grid_barrier import check_programs

    assert check_programs(132, 132) == 132
    with pytest.raises(ValueError, match="--programs 133"):
        check_programs(133, 132)


def test_hint_band_reads_a_key_per_site_and_step_with_weights_drawn_in_bf16():
    import torch

    from benchmarks.hint_band import threshold_keys

    keys = threshold_keys("tiny", "qsparse", 2, 4, None, "", init_bf16=True)
    assert keys and all(len(k) == 3 for k in keys.values())  # the prompt and two steps
    assert torch.get_default_dtype() == torch.float32  # restored after the build
