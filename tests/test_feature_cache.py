"""Issue 22 item 4: a frozen encoder's output computed once per record (model/features.py) and kept
at the site (client/feature_cache.py) instead of being recomputed every step."""

import copy
import logging

import numpy as np
import pytest
import torch
from conftest import tiny_config

from client.feature_cache import site_features
from client.settings import local_training
from client.trainer import train_round
from shared_model.data.synthetic import load_embedded, synthetic_vocabulary
from shared_model.model.captioner import Captioner
from shared_model.model.features import encoder_fingerprint, in_memory_features
from shared_model.privacy.ledger import PrivacyLedger
from shared_model.privacy.site_budget import RunRequest, SiteBudget
from shared_model.run_settings import default_run_config

VOCAB = synthetic_vocabulary()
BUDGET = SiteBudget(target_epsilon=3.0, target_delta=1e-3, accountant="rdp")
DATA = load_embedded("train", 48, seed=0, image_size=32)


def training(trainable="decoder", cache=True, mode="hooks"):
    return local_training({**default_run_config(), "local-epochs": 1, "batch-size": 16, "lr": 1e-2,
                           "trainable": trainable, "encoder-feature-cache": cache, "grad-sample-mode": mode}, {})


def dp_round(tmp_path, name, model, settings, *, cache_dir=None):
    request = RunRequest(run_id="r1", run_epsilon=2.0, num_rounds=1, local_epochs=1, batch_size=16,
                         count_noise_multiplier=5.0)
    torch.manual_seed(0)  # the caption drawn for each record
    return train_round(model=model, data=DATA, vocab=VOCAB, training=settings, budget=BUDGET,
                       ledger=PrivacyLedger(tmp_path / name / "ledger.jsonl"), request=request, server_round=1,
                       seed=0, feature_cache_dir=cache_dir)


@pytest.mark.parametrize("trainable, mode", [("decoder", "hooks"), ("fusion+decoder", "ghost")])
def test_a_dp_round_from_cached_features_equals_the_round_from_images(tmp_path, trainable, mode):
    """Same records, same Poisson batches, same noise: the update from grids computed once is the
    update from the images (the encoder is a fixed function of each image)."""
    torch.manual_seed(1)
    start = Captioner(tiny_config(vocab_size=len(VOCAB), max_len=20))
    from_images, from_features = copy.deepcopy(start), copy.deepcopy(start)
    a = dp_round(tmp_path, "images", from_images, training(trainable, cache=False, mode=mode))
    b = dp_round(tmp_path, "features", from_features, training(trainable, cache=True, mode=mode),
                 cache_dir=tmp_path / "cache")
    assert a == {**b, "ledger-head": a["ledger-head"]}  # the same mechanism, the same reply
    changed = 0
    for (name, p), q, p0 in zip(from_images.named_parameters(), from_features.parameters(), start.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
        changed += int(not torch.equal(p, p0))
    assert changed > 0  # the round trained something
    assert all(torch.equal(p, p0) for p, p0 in zip(from_features.encoder.parameters(), start.encoder.parameters()))
    assert len(list((tmp_path / "cache").glob("features-*.npy"))) == 1  # kept beside the data store


def test_the_cache_is_reused_invalidated_by_new_weights_and_rebuilt_when_torn(tmp_path, caplog):
    model = Captioner(tiny_config(vocab_size=len(VOCAB), max_len=20))
    cache = tmp_path / "cache"
    first, cached = site_features(model, DATA, cache_dir=cache)
    assert not cached and first.shape[0] == len(DATA) and first.dtype == np.float32
    np.testing.assert_allclose(first, in_memory_features(model, DATA.images), rtol=1e-5, atol=1e-6)
    again, cached = site_features(model, DATA, cache_dir=cache)
    assert cached and np.array_equal(again, first)

    old_key = encoder_fingerprint(model)
    with torch.no_grad():
        next(model.encoder.parameters()).add_(0.5)  # new global weights: new features, the old file gone
    assert encoder_fingerprint(model) != old_key
    new, cached = site_features(model, DATA, cache_dir=cache)
    assert not cached and not np.allclose(new, first)
    new = np.array(new)  # a copy: the file is torn below, under any mapping of it
    files = list(cache.glob("features-*.npy"))
    assert len(files) == 1

    files[0].write_bytes(files[0].read_bytes()[:1000])  # torn
    with caplog.at_level(logging.WARNING):
        rebuilt, cached = site_features(model, DATA, cache_dir=cache)
    assert not cached and np.allclose(rebuilt, new) and "rebuilding the unusable feature cache" in caplog.text

    other = DATA.subset(range(10))  # other records: other features
    assert site_features(model, other, cache_dir=cache)[0].shape[0] == 10

    frozen = Captioner(tiny_config(vocab_size=len(VOCAB), max_len=20, encoder="resnet18", freeze_encoder=True))
    assert len(encoder_fingerprint(frozen)) == 64  # BatchNorm's scalar buffers hash too


def test_a_trainable_encoder_never_uses_features_and_a_non_private_round_can(tmp_path):
    model = Captioner(tiny_config(vocab_size=len(VOCAB), max_len=20))
    dp_round(tmp_path, "all", model, training("all"), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # the encoder trains: its output is not fixed
    model = Captioner(tiny_config(vocab_size=len(VOCAB), max_len=20))  # a site builds a fresh one per message
    before = copy.deepcopy(model)
    torch.manual_seed(0)
    metrics = train_round(model=model, data=DATA, vocab=VOCAB, training=training("decoder"), budget=None,
                          ledger=None, request=None, server_round=1, seed=0, feature_cache_dir=tmp_path / "np")
    assert metrics["num-examples"] == len(DATA) and len(list((tmp_path / "np").glob("features-*.npy"))) == 1
    assert any(not torch.equal(p, q) for p, q in zip(model.lm_head.parameters(), before.lm_head.parameters()))
