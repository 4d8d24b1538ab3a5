"""Resolution is a setting: `fedcap train/pretrain --image-size`, carried by the checkpoint, and a
checkpoint started from at another size is refused by name (centralized and federated)."""

import json

import pytest

from shared_model.data.synthetic import synthetic_vocabulary
from shared_model.model.captioner import Captioner
from shared_model.model.checkpoint import load_checkpoint, save_checkpoint
from shared_model.model.config import CaptionerConfig, check_same_model
from runners import cli

VOCAB = synthetic_vocabulary()
SMALL = ["--train-size", "16", "--test-size", "4", "--epochs", "1", "--batch-size", "8", "--no-meteor",
         "--beam-size", "1"]


@pytest.fixture
def checkpoint_32(tmp_path):
    return save_checkpoint(tmp_path / "ckpt32", Captioner(CaptionerConfig(vocab_size=len(VOCAB), image_size=32)),
                           VOCAB)


def test_train_at_an_image_size_and_the_checkpoint_carries_it(tmp_path, checkpoint_32):
    out = tmp_path / "run"
    assert cli.main(["train", "--image-size", "32", "--init-from", str(checkpoint_32), *SMALL,
                     "--out", str(out)]) == 0
    model, _, _ = load_checkpoint(out / "checkpoint")
    assert model.config.image_size == 32
    assert json.loads((out / "config.json").read_text())["model"]["image_size"] == 32


@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_a_checkpoint_of_another_size_is_refused_by_name(tmp_path, capsys, checkpoint_32, command):
    assert cli.main([command, "--image-size", "64", "--init-from", str(checkpoint_32), *SMALL,
                     "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "image_size=32 but this run gives 64" in err and str(checkpoint_32) in err
    assert not (tmp_path / "run").exists()


def test_check_same_model_ignores_training_only_fields():
    base = CaptionerConfig(vocab_size=len(VOCAB), image_size=32)
    check_same_model(base, CaptionerConfig(vocab_size=len(VOCAB), image_size=32, dropout=0.0, freeze_encoder=True),
                     what="x")
    with pytest.raises(ValueError, match="x has model image_size=32 but this run gives 224"):
        check_same_model(base, CaptionerConfig(vocab_size=len(VOCAB), image_size=224), what="x")


def test_the_federation_refuses_an_init_checkpoint_of_another_size(checkpoint_32):
    from server.initial_model import initial_model
    from runners.flower_runtime import default_run_config

    rc = {**default_run_config(), "init-from": str(checkpoint_32)}
    assert initial_model({**rc, "image-size": 32}, VOCAB).model.config.image_size == 32
    with pytest.raises(ValueError, match="init-from checkpoint .* has model image_size=32 but this run gives 64"):
        initial_model({**rc, "image-size": 64}, VOCAB)
