"""Every user mistake and bad file ends in one line naming the setting or file, before anything
is written; a finished run is never overwritten; printed summaries say what actually ran.

One test per case of the "every failure names its cause" table (GPU preset on a CPU machine,
bad data files, the documented SFT command, a preset name for a config, a sweep with one bad
job, a block size that does not divide, resume/load of missing or damaged files, re-running a
finished run, leftovers, paths in a checkpoint, what ran)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_train
from test_cli_train import FAST, _cli

from qsparse.errors import UserError
from qsparse.training.callbacks import SimulatedCrash
from qsparse.training.config import ConfigError
from qsparse.training.run import train
from qsparse.training.rundir import RunDirError

RECIPES = Path(__file__).resolve().parents[1] / "qsparse" / "conf" / "recipe"


def _qsparse_train(
    args: list[str], cwd: Path, monkeypatch, capsys, full_error: bool = False
) -> tuple[int, str]:
    """``qsparse-train ARGS`` run in this process (as the console script: Hydra parses
    ``sys.argv``) from ``cwd``, with ``HYDRA_FULL_ERROR=1`` if ``full_error``; returns (exit
    status, stderr)."""
    from hydra.core.global_hydra import GlobalHydra

    from qsparse.cli.train import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["qsparse-train", *args])
    if full_error:
        monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    else:
        monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:  # Hydra configured logging for its job: give pytest its own back
        GlobalHydra.instance().clear()
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
    return code, capsys.readouterr().err


def _one_line_error(code: int, stderr: str, *needles: str) -> str:
    """The single error line of a failed command; it must contain every needle."""
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith("qsparse-train:")]
    assert len(lines) == 1, stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- GPU preset on a CPU machine ---------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_gpu_trainer_on_cpu_machine_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    """The console script in a subprocess: one line on stderr, exit status 2."""
    res = _cli([*FAST, "trainer=gpu", "run_name=g"], tmp_path)
    _one_line_error(res.returncode, res.stderr, "trainer.accelerator='gpu'", "trainer=cpu")
    assert not (tmp_path / "outputs").exists()  # not even Hydra's run folder is left


# --- bad data files ----------------------------------------------------------------------------


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    text = ("plain words in a line\n" * 1500).encode()
    rows = [json.dumps({"text": f"row {i} of the file"}) for i in range(300)]
    rows[200] = rows[200][:10]  # row 201 cut short
    files = {
        "empty": (tmp_path / "empty.txt", b"", "is empty"),
        "binary": (tmp_path / "ls.txt", Path(sys.executable).read_bytes()[:50000], "binary"),
        "utf8": (
            tmp_path / "bad.txt",
            text[:20000] + b"\xff\xfe" + text[20000:],
            "not UTF-8 text (invalid byte 0xff at byte 20000)",
        ),
        "jsonl": (tmp_path / "cut.jsonl", "\n".join(rows).encode(), "line 201 is not valid JSON"),
    }
    out = {}
    for name, (path, data, message) in files.items():
        path.write_bytes(data)
        out[name] = (path, message)
    return out


@pytest.mark.parametrize("case", ["empty", "binary", "utf8", "jsonl"])
def test_bad_data_file_is_named_before_anything_is_written(tmp_path: Path, case: str) -> None:
    path, message = _bad_files(tmp_path)[case]
    run_dir = tmp_path / "run"
    cfg = compose_train(
        [
            *(o for o in FAST if not o.startswith("data")),
            "data=text_files",
            f"data.data_files={path}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.vocab_size=300",
            f"run_dir={run_dir}",
        ]
    )
    with pytest.raises(UserError) as info:
        train(cfg)
    assert str(path) in str(info.value) and message in str(info.value)
    assert "\n" not in str(info.value)
    assert not run_dir.exists()


# --- the documented SFT command ----------------------------------------------------------------

_FILES_GROUP = {
    "qsparse.data.sft.SFTDataModule": "sft_files",
    "qsparse.data.pretrain.PretrainDataModule": "text_files",
}


@pytest.mark.parametrize(
    "recipe",
    sorted(
        str(p.relative_to(RECIPES).with_suffix(""))
        for p in RECIPES.rglob("*.yaml")
        if not p.name.startswith("_")  # a base the recipes share, not a recipe
    ),
)
def test_files_data_group_replaces_the_recipe_corpus(recipe: str, tmp_path: Path) -> None:
    """``recipe=X data=<files group> data.data_files=...`` (as ``conf/data/sft_files.yaml``
    documents) composes a config that reads the files, not the recipe's corpus."""
    target = compose_train([f"recipe={recipe}"]).data._target_
    if target not in _FILES_GROUP:
        pytest.skip(f"{target} takes local files as data.sources, not data.data_files")
    group = _FILES_GROUP[target]
    cfg = compose_train(
        [f"recipe={recipe}", f"data={group}", f"data.data_files={tmp_path}/x.jsonl"]
    )
    assert cfg.data.corpus is None
    assert cfg.data.data_files == f"{tmp_path}/x.jsonl"


# --- a preset name where a config is expected --------------------------------------------------


def test_sparsify_takes_quant_preset_names() -> None:
    from conftest import build_tiny_hf_model

    import qsparse

    model = build_tiny_hf_model("llama")
    report = qsparse.sparsify(model, sparsity=0.5, quant="bitnet")
    assert report.settings["quant"] == qsparse.QuantConfig.preset("bitnet").to_dict()
    assert report.settings["quant"]["weights"] == "ternary"
    with pytest.raises(ValueError, match=r"quant='bitnett' is not a quantization preset.*bitnet"):
        qsparse.sparsify(build_tiny_hf_model("llama"), sparsity=0.5, quant="bitnett")
    with pytest.raises(ValueError, match="quant must be a QuantConfig or a preset name"):
        qsparse.sparsify(build_tiny_hf_model("llama"), sparsity=0.5, quant=8)  # type: ignore[arg-type]


# --- one bad value in a sweep ------------------------------------------------------------------


def test_sweep_reports_bad_job_up_front_runs_good_ones_and_counts_failures(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    args = ["-m", *FAST, "logger=csv", "sparsity=topk", "sparsity.ratio=1.5,0.3,1.2,0.4"]
    args += ["trainer.max_steps=1", "trainer.limit_val_batches=1", "sweep_name=s"]
    code, stderr = _qsparse_train(args, tmp_path, monkeypatch, capsys)
    assert code == 2, stderr[-3000:]  # the exit status: two jobs failed
    for num, ratio in ((0, "1.5"), (2, "1.2")):  # reported before any job runs
        up_front = f"qsparse-train: job #{num} (sparsity.ratio={ratio}) will fail: sparsity.ratio"
        assert up_front in stderr
    summary = "qsparse-train: 2 of 4 sweep jobs failed: #0 (sparsity.ratio=1.5), #2 (sparsity"
    assert summary in stderr
    assert "Traceback" not in stderr
    sweep = tmp_path / "multirun" / "s"
    assert not (sweep / "0").exists() and not (sweep / "2").exists()  # bad jobs wrote nothing
    for job in ("1", "3"):
        assert (sweep / job / "summary.json").is_file()
        assert (sweep / job / ".hydra" / "overrides.yaml").is_file()


# --- block size that does not divide -----------------------------------------------------------


def test_block_size_that_does_not_divide_fails_before_anything_is_written(tmp_path: Path) -> None:
    cfg = compose_train(
        [*FAST, "sparsity=block", "sparsity.block_size=7", f"run_dir={tmp_path / 'r'}"]
    )
    with pytest.raises(ConfigError, match=r"sparsity\.block_size=7 does not divide"):
        train(cfg)
    assert not (tmp_path / "r").exists()


# --- checkpointing has one switch ---------------------------------------------------------------


@pytest.mark.parametrize(
    "override,key",
    [
        ("+model.gradient_checkpointing=true", r"model\.gradient_checkpointing=True"),
        ("+trainer.strategy.activation_checkpointing=true", r"activation_checkpointing=True"),
    ],
)
def test_second_checkpointing_switch_is_refused_naming_the_run_level_one(
    tmp_path: Path, override: str, key: str
) -> None:
    cfg = compose_train([*FAST, override, f"run_dir={tmp_path / 'r'}"])
    with pytest.raises(ConfigError, match=key + r".*run-level gradient_checkpointing=true"):
        train(cfg)
    assert not (tmp_path / "r").exists()


# --- resume / load of missing or damaged files -------------------------------------------------


def test_resume_without_or_with_truncated_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    with pytest.raises(RunDirError, match=r"resume=true but .*last\.ckpt does not exist"):
        train(compose_train([*FAST, f"run_dir={run_dir}", "resume=true"]))
    assert not run_dir.exists()
    last = run_dir / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save({"global_step": 3, "state": torch.zeros(1000)}, last)
    last.write_bytes(last.read_bytes()[:2000])  # a copy cut short
    with pytest.raises(RunDirError, match=r"last\.ckpt is truncated or corrupt"):
        train(compose_train([*FAST, f"run_dir={run_dir}", "resume=true"]))


@pytest.fixture
def exported(tiny_hf_checkpoint, tmp_path: Path) -> Path:
    """A tiny BitNet export (it has qsparse extra weights: the SubLN norms)."""
    import qsparse
    from qsparse.models.export import export
    from qsparse.models.hf import load_hf_model

    model = load_hf_model(tiny_hf_checkpoint("llama"))
    qsparse.sparsify(model, sparsity=0.5, quant="bitnet")
    return export(model, tmp_path / "export")


def _edit_config(folder: Path, **settings: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["qsparse"].update(settings)
    (folder / "config.json").write_text(json.dumps(config))


def test_truncated_safetensors_is_named(exported: Path) -> None:
    import qsparse
    from qsparse.models.hf import CheckpointError

    weights = exported / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated \(\d+ of \d+"):
        qsparse.load(exported)


def test_bad_qsparse_entry_names_config_json(exported: Path, capsys) -> None:
    import qsparse
    from qsparse.cli.evaluate import main as eval_main
    from qsparse.models.hf import CheckpointError

    _edit_config(exported, sparsity={"ratio": 1.5})
    with pytest.raises(CheckpointError, match=r"config\.json: bad 'qsparse' entry: .*ratio"):
        qsparse.load(exported)
    assert eval_main([str(exported)]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("qsparse-eval: error")]
    assert len(lines) == 1 and "config.json: bad 'qsparse' entry" in lines[0], err
    assert "Traceback" not in err
    with pytest.raises(CheckpointError):  # --debug: the exception, with its traceback
        eval_main([str(exported), "--debug"])


# --- re-running a finished run; leftovers ------------------------------------------------------


def test_finished_run_is_never_overwritten_without_overwrite(tmp_path: Path) -> None:
    run_dir = tmp_path / "r3"
    common = [*FAST, "logger=csv", f"run_dir={run_dir}"]
    train(compose_train(common))
    last = run_dir / "checkpoints" / "last.ckpt"
    before = {p: p.read_bytes() for p in (last, run_dir / "summary.json")}

    with pytest.raises(RunDirError, match=r"holds a finished run \(4 steps\).*overwrite=true"):
        train(compose_train([*common, "trainer.max_steps=2"]))
    with pytest.raises(RunDirError, match=r"resume=true but the run in .* is finished \(4 steps"):
        train(compose_train([*common, "resume=true"]))
    assert {p: p.read_bytes() for p in before} == before

    # a finished run continues with a larger max_steps; the next start removes temporaries
    # of writers killed mid-write (their process is gone), not those of live processes
    orphan = last.with_name(f"last.ckpt.tmp-{_dead_pid()}")
    orphan.write_bytes(b"partial")
    export_orphan = run_dir / f".hf.tmp-{_dead_pid()}"  # a killed export's folder
    (export_orphan / "model.safetensors").parent.mkdir()
    (export_orphan / "model.safetensors").write_bytes(b"partial")
    live = last.with_name(f"last.ckpt.tmp-{os.getppid()}")
    live.write_bytes(b"being written")
    assert train(compose_train([*common, "resume=true", "trainer.max_steps=6"]))["step"] == 6
    assert not orphan.exists() and not export_orphan.exists() and live.exists()

    summary = train(compose_train([*common, "trainer.max_steps=2", "overwrite=true"]))
    assert summary["step"] == 2
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 2
    assert not live.exists()  # overwrite=true replaced the whole previous run


def test_failed_run_leaves_nothing_outside_outputs(tmp_path: Path, monkeypatch, capsys) -> None:
    code, stderr = _qsparse_train([*FAST, "run_name=../escape"], tmp_path, monkeypatch, capsys)
    _one_line_error(code, stderr, "run_name='../escape'")
    assert sorted(os.listdir(tmp_path)) == []  # neither escape/ nor outputs/ (nor .hydra)
    with pytest.raises(ConfigError, match="run_name='../escape'"):  # Hydra's switch: traceback
        _qsparse_train([*FAST, "run_name=../escape"], tmp_path, monkeypatch, capsys, True)
    assert sorted(os.listdir(tmp_path)) == []


# --- paths in a checkpoint ---------------------------------------------------------------------


def test_extra_weights_path_is_confined_to_the_checkpoint(exported: Path, tmp_path: Path) -> None:
    import qsparse
    from qsparse.models.hf import CheckpointError, check_hf_checkpoint

    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((exported / "qsparse_extra.safetensors").read_bytes())
    for name in (str(outside), "../outside.safetensors"):
        _edit_config(exported, extra_weights=name)
        with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
            check_hf_checkpoint(exported)
        with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
            qsparse.load(exported)


def test_bad_decode_setting_in_the_environment_is_one_line(monkeypatch, capsys) -> None:
    """``QSPARSE_GLU_SELECTION`` with an unknown value: ``import qsparse`` still works (the
    default is used until then), building a decode view raises a ValueError naming the variable
    and its forms, and ``qsparse-generate`` stops with that line before it builds a model."""
    from qsparse import decode_view as V
    from qsparse.cli.generate import main as generate_main

    assert V._glu_in_selection_from_env("ternary") == ("ternary",)
    assert V._glu_in_selection_from_env("0") == ()
    assert V._glu_in_selection_from_env("1") == V.GLU_SITE_MODES
    monkeypatch.setenv("QSPARSE_GLU_SELECTION", "yes")
    message = "QSPARSE_GLU_SELECTION='yes': use 0 (no site), ternary (the default) or 1"
    with pytest.raises(ValueError, match=re.escape(message)):
        V.check_environment()
    from qsparse.models import LlamaConfig, LlamaForCausalLM

    with pytest.raises(ValueError, match="QSPARSE_GLU_SELECTION='yes'"):
        V.decoder_view(LlamaForCausalLM(LlamaConfig.from_preset("tiny")), use_kernels=True)
    capsys.readouterr()
    assert generate_main(["--preset", "tiny", "--device", "cpu", "--new-tokens", "2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"qsparse-generate: {message}")
    monkeypatch.setenv("QSPARSE_GLU_SELECTION", "0")
    V.check_environment()


#: every on/off setting read from the environment at import, with its default
ON_OFF_FLAGS = {
    "QSPARSE_WEIGHTS_EVICT_FIRST": True,
    "QSPARSE_PDL_CHAIN": False,
    "QSPARSE_TERNARY_ROWS": False,
    "QSPARSE_FUSED_ATTENTION": True,
    "QSPARSE_RESIDUAL_SUM": True,
    "QSPARSE_KERNELS": True,
}
_FLAG_MESSAGE = "{name}='false': use 1 (on) or 0 (off), or leave it unset"


def test_on_off_flags_are_registered_and_read_at_import() -> None:
    """Each on/off setting is in ``ENV_FLAGS`` with its default, and ``1``/``0`` set the module
    attribute it names (read at import, in a fresh interpreter: each set against its default)."""
    import qsparse.decode_view  # noqa: F401  (imports every module that reads a flag)
    from qsparse.env_flags import ENV_FLAGS

    assert ENV_FLAGS == ON_OFF_FLAGS
    env = {**os.environ, **{n: "0" if d else "1" for n, d in ON_OFF_FLAGS.items()}}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]
    )
    code = (
        "from qsparse import decode_view as V, kernels as K; from qsparse.kernels import gemv as G;"
        "print(G.WEIGHTS_EVICT_FIRST, G.PDL_CHAIN, V.TERNARY_ROWS, V.FUSED_ATTENTION,"
        " V.RESIDUAL_SUM, K.ENABLED)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == [str(not d) for d in ON_OFF_FLAGS.values()]


@pytest.mark.parametrize(("name", "default"), list(ON_OFF_FLAGS.items()))
def test_bad_on_off_flag_in_the_environment_is_one_line(monkeypatch, capsys, name, default) -> None:
    """An on/off setting takes 1 or 0 (unset: its default); another value stops
    ``qsparse-generate`` with one line naming the variable, before a model is built, while
    ``import`` keeps the default."""
    from qsparse.cli.generate import main as generate_main
    from qsparse.decode_view import check_environment
    from qsparse.env_flags import check_env_flags, flag_at_import, flag_from_env

    monkeypatch.delenv(name, raising=False)
    assert flag_from_env(name, default) is default
    assert flag_at_import(name, default) is default
    for value, flag in (("0", False), ("1", True)):
        monkeypatch.setenv(name, value)
        assert flag_from_env(name, default) is flag and flag_at_import(name, default) is flag
    check_env_flags()
    monkeypatch.setenv(name, "false")
    message = _FLAG_MESSAGE.format(name=name)
    assert flag_at_import(name, default) is default
    with pytest.raises(UserError, match=re.escape(message)):
        check_env_flags()
    with pytest.raises(ValueError, match=re.escape(message)):
        check_environment()
    capsys.readouterr()
    assert generate_main(["--preset", "tiny", "--device", "cpu", "--new-tokens", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"qsparse-generate: {message}"]
    monkeypatch.delenv(name)
    check_environment()


def test_bad_kernels_flag_stops_training_in_one_line_and_writes_nothing(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """``QSPARSE_KERNELS=false qsparse-train ...``: one line, status 2, no folder made."""
    monkeypatch.setenv("QSPARSE_KERNELS", "false")
    code, stderr = _qsparse_train([*FAST, "run_name=k"], tmp_path, monkeypatch, capsys)
    line = _one_line_error(code, stderr)
    assert line == "qsparse-train: " + _FLAG_MESSAGE.format(name="QSPARSE_KERNELS")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["qsparse-eval", "qsparse-compare", "qsparse-teacher-logits"])
def test_bad_kernels_flag_stops_other_model_commands_in_one_line(
    tmp_path: Path, monkeypatch, capsys, command: str
) -> None:
    """The other commands that run a model through the kernels check the on/off settings first
    (before the missing checkpoint folder or config would be reported)."""
    from qsparse.cli import compare, evaluate, teacher_logits

    monkeypatch.setenv("QSPARSE_KERNELS", "false")
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    missing = str(tmp_path / "missing")
    capsys.readouterr()
    if command == "qsparse-teacher-logits":
        with pytest.raises(SystemExit) as exit_info:
            teacher_logits.main([f"distill.teacher_logits={missing}"])
        code, prog = exit_info.value.code, command
    elif command == "qsparse-eval":
        code, prog = evaluate.main([missing, "--text", "kjv"]), "qsparse-eval: error"
    else:
        code, prog = compare.main([missing, "--text", "kjv"]), command
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert lines == [f"{prog}: " + _FLAG_MESSAGE.format(name="QSPARSE_KERNELS")]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "nope"], "--preset 'nope' is not a preset: use one of tiny, "),
        (["--checkpoint", "{tmp}/missing"], "checkpoint path {tmp}/missing does not exist"),
        (["--checkpoint", "{tmp}/bad"], "{tmp}/bad/config.json is not valid JSON"),
        (["--preset", "tiny", "--batch", "0"], "--batch must be >= 1, got 0"),
        (["--preset", "tiny", "--mode", "sparse"], "--mode 'sparse' must be one of"),
        (["--preset", "tiny", "--compile", "bogus"], "--compile: "),
    ],
)
def test_generate_refuses_bad_input_in_one_line(tmp_path: Path, capsys, argv, message) -> None:
    """``qsparse-generate`` with a bad option or checkpoint folder: status 2 and one line
    ``qsparse-generate: <message>`` naming it, before a model is built (no traceback)."""
    from qsparse.cli.generate import main as generate_main

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{")
    argv = [a.format(tmp=tmp_path) for a in argv]
    capsys.readouterr()
    assert generate_main([*argv, "--device", "cpu", "--new-tokens", "2"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "qsparse-generate: " + message.format(tmp=tmp_path)
    )
    assert captured.out == ""  # nothing measured


def test_generate_decodes_a_checkpoint_folder_and_refuses_one_without_a_tokenizer(
    tiny_hf_checkpoint, capsys
) -> None:
    """The same check passes a good folder (``--prompt`` decodes its text) and names the
    missing tokenizer of another in one line."""
    from qsparse.cli.generate import main as generate_main

    argv = ["--device", "cpu", "--dtype", "fp32", "--new-tokens", "2", "--prompt", "the cat"]
    assert generate_main(["--checkpoint", str(tiny_hf_checkpoint()), *argv]) == 0
    assert "| checkpoint |" in capsys.readouterr().out
    bare = tiny_hf_checkpoint(tokenizer=False, seed=1)
    capsys.readouterr()  # transformers' progress bars while saving
    assert generate_main(["--checkpoint", str(bare), *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qsparse-generate: ") and "tokenizer" in lines[0]


# --- what ran ----------------------------------------------------------------------------------


def test_generate_on_cpu_reports_no_cuda_graph(capsys) -> None:
    from qsparse.cli.generate import main as generate_main

    argv = ["--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--mode", "dense"]
    assert generate_main([*argv, "--new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "cuda_graph=False" in out and "kernels=off" in out


def test_resume_progress_and_metrics_say_what_ran(tmp_path: Path, capfd) -> None:
    """A fresh run's progress bar is ``train steps n/8`` from its first line (never Lightning's
    'Training' / 'Epoch 0' titles); after a crash at step 6 and a resume from the step-4
    checkpoint it counts steps of the run (4/8 on, not batches of the epoch), and
    ``csv/`` holds every step once (the crashed segment's steps after 4 are dropped)."""
    from qsparse.training.metrics_csv import read_metrics

    common = [*FAST, "logger=csv", f"run_dir={tmp_path / 'r'}", "trainer.max_steps=8"]
    common += ["trainer.val_check_interval=4", "trainer.log_every_n_steps=1"]
    common += ["callbacks.checkpoint.every_n_train_steps=4", "trainer.enable_progress_bar=true"]
    crash = ["+callbacks.crash._target_=qsparse.training.callbacks.StopAtStep"]
    crash += ["+callbacks.crash.step=6", "+callbacks.crash.mode=crash"]
    with pytest.raises(SimulatedCrash):
        train(compose_train([*common, *crash]))
    first = capfd.readouterr().out.replace("\r", "\n")
    assert "train steps:   0%|          | 0/8" in first  # one bar, titled by steps from the start
    assert "Epoch" not in first and "Training" not in first and "/-2" not in first
    train(compose_train([*common, "resume=true"]))
    bar = capfd.readouterr().out.replace("\r", "\n")  # Lightning draws its bars on stdout
    assert "train steps:  50%|█████     | 4/8" in bar
    assert "8/8" in bar and "Epoch" not in bar and "v_num" not in bar
    # the bar is closed before the summary table: no bar line after (or inside) the table
    assert bar.rindex("train steps") < bar.index("qsparse run summary")

    seen: dict[int, Path] = {}
    for path in sorted((tmp_path / "r" / "csv").rglob("metrics.csv")):
        import csv

        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("train/loss")]
        for row in rows:
            step = int(row["step"])
            assert step not in seen, f"step {step} in {seen.get(step)} and {path}"
            seen[step] = path
    assert sorted(seen) == list(range(8))
    assert [s for s, _ in read_metrics(tmp_path / "r")["train/loss"]] == list(range(8))
