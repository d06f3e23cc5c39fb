"""``data.streaming`` picks the pretraining pipeline once, through the real Hydra configs:
``true`` the streaming one, ``false`` (``data=wiki``'s default) the cached one; anything else
is a one-line config error, and ``qsparse-teacher-logits`` still refuses streaming data."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_train
from omegaconf import OmegaConf

from qsparse.data import PretrainDataModule
from qsparse.data.packed import CachedPipeline
from qsparse.data.streaming import StreamingPipeline
from qsparse.errors import UserError
from qsparse.training.run import _build_datamodule


def _datamodule(overrides: list[str], tmp_path: Path) -> PretrainDataModule:
    """The DataModule ``qsparse-train OVERRIDES`` builds (nothing is read or tokenized yet)."""
    cfg = compose_train([*overrides, f"data.cache_dir={tmp_path / 'cache'}"])
    dm = _build_datamodule(OmegaConf.to_container(cfg.data, resolve=True))
    assert type(dm) is PretrainDataModule
    return dm


FILES = ["data=text_files", "data.data_files=/data/corpus.jsonl"]
MISTRAL = ["recipe=continue/mistral7b", "model.path=/models/m", *FILES[1:]]


@pytest.mark.parametrize(
    ("overrides", "pipeline"),
    [
        ([], CachedPipeline),
        (["data.streaming=true"], StreamingPipeline),
        (["data.streaming=false"], CachedPipeline),
        ([*FILES, "data.streaming=true"], StreamingPipeline),
        (FILES, CachedPipeline),
        (MISTRAL, StreamingPipeline),  # the recipe sets streaming: true
        ([*MISTRAL, "data.streaming=false"], CachedPipeline),
    ],
    ids=["wiki", "true", "false", "files-true", "files", "mistral7b", "mistral7b-false"],
)
def test_streaming_setting_picks_the_pipeline(
    overrides: list[str], pipeline: type, tmp_path: Path
) -> None:
    dm = _datamodule(overrides, tmp_path)
    assert type(dm.pipeline) is pipeline
    assert dm.streaming is (pipeline is StreamingPipeline)
    # the iterable loader has no sampler: only streaming moves the epoch at the last batch
    assert dm._epoch_from_last_batch is (pipeline is StreamingPipeline)
    if pipeline is StreamingPipeline:  # a stream is not counted ahead: say so, not assert
        with pytest.raises(ValueError, match="use streaming=false to count the blocks"):
            _ = dm.num_train_blocks


@pytest.mark.parametrize("value", ["maybe", "1", "null"])
def test_bad_streaming_value_is_a_one_line_config_error(value: str, tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        _datamodule([f"data.streaming={value}"], tmp_path)
    message = str(info.value)
    assert "data:" in message and "streaming must be true" in message
    assert "\n" not in message


def test_teacher_logits_refuses_streaming_data(tmp_path: Path, capsys) -> None:
    from qsparse.cli.teacher_logits import main

    folder = tmp_path / "teacher"
    with pytest.raises(SystemExit) as info:
        main(
            ["data.streaming=true", "distill=logits_from_disk", f"distill.teacher_logits={folder}"]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qsparse-teacher-logits: ") and "set data.streaming=false" in err
    assert not folder.exists()
