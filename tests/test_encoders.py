"""Pretrained torchvision encoders by name from a local weights file (shared_model/model/encoders.py):
each trains a DP round at 64 px through the site trainer and round-trips its checkpoint; frozen ones
keep BatchNorm in eval mode, trainable ones pass Opacus's validator. The weights files are made here
from torchvision's architectures with random weights (nothing can be downloaded)."""

import dataclasses

import pytest
import torch
from conftest import tiny_config
from opacus.validators import ModuleValidator

from client.trainer import train_round
from client.settings import local_training
from shared_model.run_settings import default_run_config
from shared_model.data.synthetic import load_embedded, synthetic_vocabulary
from shared_model.model.captioner import Captioner
from shared_model.model.checkpoint import load_checkpoint, save_checkpoint
from shared_model.model.config import BATCHNORM_ENCODERS, ENCODERS
from shared_model.model.encoders import TORCHVISION
from shared_model.privacy.ledger import PrivacyLedger
from shared_model.privacy.site_budget import RunRequest, SiteBudget

VOCAB = synthetic_vocabulary()
SIZE = 64  # vit_b_16: a 4x4 grid of 16-px patches


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """encoder name -> a torchvision state_dict file of it (at torchvision's own image size; the
    classifier head left out, as the loader allows, to keep vgg16's file at 59 MB, not 528 MB)."""
    folder, files = tmp_path_factory.mktemp("weights"), {}

    def make(name):
        if name not in files:
            torch.manual_seed(1)
            state = TORCHVISION[name].build(224).state_dict()
            files[name] = folder / f"{name}.pth"
            torch.save({k: v for k, v in state.items() if not k.startswith(TORCHVISION[name].head)}, files[name])
        return str(files[name])
    return make


def config(name, weights, **extra):
    return tiny_config(vocab_size=len(VOCAB), image_size=SIZE, encoder=name, encoder_weights=weights(name),
                       max_len=12, **extra)


def dp_round(model, tmp_path, trainable="all"):
    data = load_embedded("train", 12, image_size=SIZE)
    request = RunRequest(run_id="r", run_epsilon=2.0, num_rounds=1, local_epochs=1, batch_size=4,
                         count_noise_multiplier=5.0)
    return train_round(model=model, data=data, vocab=VOCAB, ledger=PrivacyLedger(tmp_path / "ledger.jsonl"),
                       request=request, server_round=1, seed=0,
                       training=local_training({**default_run_config(), "local-epochs": 1, "batch-size": 4, "lr": 1e-3,
                                                "max-physical-batch-size": 4, "trainable": trainable,
                                                "grad-sample-mode": "hooks"}, {}),
                       budget=SiteBudget(target_epsilon=4.0, target_delta=1e-3, accountant="rdp"))


def test_every_torchvision_encoder_is_listed():
    assert set(ENCODERS) == {"cnn", *TORCHVISION}


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_a_frozen_encoder_trains_a_dp_round_and_round_trips(name, weights, tmp_path):
    model = Captioner(config(name, weights, freeze_encoder=True, fusion="attention"))
    saved = torch.load(weights(name))
    first = next(k for k in saved if k.endswith("weight") and saved[k].dim() == 4)  # the first conv / patch layer
    backbone = dict(model.encoder.backbone.named_parameters())
    assert any(torch.equal(v, saved[first]) for v in backbone.values())  # the file's weights, not random ones
    before = {k: v.clone() for k, v in model.encoder.backbone.state_dict().items()}
    metrics = dp_round(model, tmp_path)
    assert metrics["steps"] >= 1 and 0 < metrics["epsilon"] <= 4.0
    after = model.encoder.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no weight and no BatchNorm statistic moved
    if name in BATCHNORM_ENCODERS:
        norms = [m for m in model.encoder.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert norms and not any(m.training for m in norms)
    save_checkpoint(tmp_path / "ckpt", model, VOCAB)
    loaded, _, _ = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == dataclasses.replace(model.config, encoder_weights=None)  # the checkpoint holds every weight
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encoder(images), model.eval().encoder(images))


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_a_trainable_encoder_is_opacus_compatible(name, weights):
    model = Captioner(config(name, weights, fusion="add"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # GroupNorm where there was BN
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules())
    assert ModuleValidator.validate(model, strict=True) == []


@pytest.mark.parametrize("name", ["mobilenet_v3_large"])
def test_a_trainable_encoder_trains_a_dp_round(name, weights, tmp_path):
    """MobileNet: BatchNorm -> GroupNorm, squeeze-excitation and the residual rewrite under real
    per-example gradients (trainable resnet18: test_model.py; resnet50 took 81 s on 2 cores and,
    like vgg16 and vit_b_16, is held by the validator test above instead)."""
    model = Captioner(config(name, weights, fusion="concat"))
    before = {k: v.clone() for k, v in model.encoder.backbone.state_dict().items()}
    assert dp_round(model, tmp_path)["steps"] >= 1
    after = model.encoder.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the encoder itself trained


def test_vit_trainable_layers_match_torchvision(weights):
    """The rebuilt ViT (Linear + SDPA attention, token buffers) computes torchvision's function."""
    from torchvision.models.vision_transformer import interpolate_embeddings

    model = Captioner(config("vit_b_16", weights)).eval()
    reference = TORCHVISION["vit_b_16"].build(SIZE).eval()
    reference.load_state_dict(interpolate_embeddings(SIZE, 16, torch.load(weights("vit_b_16"))), strict=False)
    images = torch.rand(2, 3, SIZE, SIZE)
    x = (images - model.encoder.mean) / model.encoder.std
    with torch.no_grad():
        ours = model.encoder.backbone(x)  # [2, 768, 4, 4]
        tokens = reference._process_input(x)
        tokens = reference.encoder(torch.cat([reference.class_token.expand(2, -1, -1), tokens], 1))[:, 1:]
    torch.testing.assert_close(ours.flatten(2).transpose(1, 2), tokens, atol=1e-4, rtol=1e-4)


def test_a_missing_or_foreign_weights_file_names_the_file_and_architecture(weights, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pth .*torchvision resnet50"):
        Captioner(tiny_config(vocab_size=len(VOCAB), image_size=SIZE, encoder="resnet50",
                              encoder_weights=str(tmp_path / "nope.pth")))
    with pytest.raises(ValueError, match=r"mobilenet_v3_large\.pth is not a torchvision resnet50 state_dict"):
        Captioner(tiny_config(vocab_size=len(VOCAB), image_size=SIZE, encoder="resnet50",
                              encoder_weights=weights("mobilenet_v3_large")))
    (tmp_path / "torn.pth").write_bytes(b"\x80\x02 not a checkpoint")
    with pytest.raises(ValueError, match=r"torn\.pth cannot be read as a torchvision vgg16 state_dict"):
        Captioner(tiny_config(vocab_size=len(VOCAB), image_size=SIZE, encoder="vgg16",
                              encoder_weights=str(tmp_path / "torn.pth")))
    with pytest.raises(ValueError, match=r"encoder vit_b_16 needs image_size a multiple of 16 \(its patch\), got 40"):
        tiny_config(vocab_size=len(VOCAB), image_size=40, encoder="vit_b_16", cnn_channels=(8,))
    with pytest.raises(ValueError, match="encoder_weights is for a torchvision encoder"):
        tiny_config(encoder_weights="/w.pth")
