"""Ghost clipping (grad-sample-mode "ghost") against hooks mode and against per-example gradients
computed one caption at a time: with noise 0 every path gives the same clipped, summed gradient."""

import copy

import pytest
import torch
from conftest import random_batch, tiny_config
from torch.utils.data import DataLoader, TensorDataset

from shared_model.model.captioner import Captioner, caption_loss
from shared_model.model.trainable import parameter_group, set_trainable
from shared_model.model.training import train_epoch
from shared_model.model.captioner import unwrap
from shared_model.run_settings import default_run_config
from shared_model.privacy.dp import check_grad_sample_mode, make_private

MODES = ("hooks", "ghost")


def _reference_norms_and_step(model, images, captions, *, max_grad_norm, trainable="all"):
    """Per-caption gradient norms, and the SGD(lr=1) update of the clipped sum over the batch size,
    from one caption at a time through plain autograd (no Opacus)."""
    model = copy.deepcopy(model)
    params = set_trainable(model, trainable)
    grads, norms = [], []
    for i in range(images.shape[0]):
        loss = caption_loss(model(images[i: i + 1], captions[i: i + 1])[0], captions[i: i + 1, 1:])
        g = torch.autograd.grad(loss, params)
        grads.append(g)
        norms.append(torch.sqrt(sum((x.double() ** 2).sum() for x in g)))
    norms = torch.stack(norms)
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    update = [-sum(float(f) * g[k] for f, g in zip(factors, grads)) / images.shape[0] for k in range(len(params))]
    return norms, update


def _dp_step(mode, model, images, captions, *, max_grad_norm, trainable="all", physical=None, fixed=False,
             precision="fp32"):
    """One DP-SGD step of `mode` with noise 0 and SGD(lr=1) through train_epoch on one logical
    batch (all rows); returns (parameter changes of the trainable parameters, all parameters
    before, all parameters after, the wrapped module)."""
    model = copy.deepcopy(model)
    params = set_trainable(model, trainable)
    loader = DataLoader(TensorDataset(images, captions), batch_size=images.shape[0])  # expected batch = all rows
    _, private, optimizer, _ = make_private(module=model, optimizer=torch.optim.SGD(params, lr=1.0),
                                            data_loader=loader, noise_multiplier=1.0, max_grad_norm=max_grad_norm,
                                            grad_sample_mode=mode, accountant="prv")
    optimizer.noise_multiplier = 0.0  # make_private refuses noise 0; the test wants the bare clipped sum
    assert optimizer.expected_batch_size == images.shape[0]
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_epoch(private, optimizer, loader, device="cpu", max_physical_batch_size=physical,
                        fixed_batch_shapes=fixed, precision=precision)
    assert stats["steps"] == 1 and stats["examples"] == images.shape[0]
    after = [p.detach().clone() for p in model.parameters()]
    change = [a - b for a, b, p in zip(after, before, model.parameters()) if p.requires_grad]
    return change, before, after, private


def _close(a, b, rel=1e-5):
    """Relative closeness of two lists of tensors as one vector."""
    a, b = torch.cat([x.flatten() for x in a]).double(), torch.cat([x.flatten() for x in b]).double()
    return float((a - b).norm()) <= rel * float(b.norm()) and float(b.norm()) > 0


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = Captioner(cfg)
    images, captions = random_batch(cfg, 8, seed=5)
    norms, _ = _reference_norms_and_step(model, images, captions, max_grad_norm=1.0)
    clip = float(norms.sort().values[3:5].mean())  # half the captions are clipped, half are not
    return model, images, captions, clip


def test_ghost_and_hooks_give_the_same_clipped_summed_gradient(setup):
    model, images, captions, clip = setup
    norms, expected = _reference_norms_and_step(model, images, captions, max_grad_norm=clip)
    assert (norms > clip).sum() >= 3 and (norms < clip).sum() >= 3  # some clipped, some not
    hooks, *_ = _dp_step("hooks", model, images, captions, max_grad_norm=clip)
    ghost, _, _, private = _dp_step("ghost", model, images, captions, max_grad_norm=clip)
    assert _close(ghost, hooks) and _close(ghost, expected) and _close(hooks, expected)
    # ghost's per-caption norms (before any clipping) are the per-caption gradient norms
    assert torch.allclose(private.per_sample_gradient_norms.double(), norms, rtol=1e-5)


def test_without_active_clipping_ghost_equals_the_plain_mean_gradient(setup):
    model, images, captions, _ = setup
    ghost, *_ = _dp_step("ghost", model, images, captions, max_grad_norm=1e6)
    plain = copy.deepcopy(model)
    plain(images, captions)[1].backward()
    assert _close(ghost, [-p.grad for p in plain.parameters()])


def test_parity_with_a_frozen_encoder_leaves_it_untouched(setup):
    model, images, captions, _ = setup
    norms, expected = _reference_norms_and_step(model, images, captions, max_grad_norm=1.0, trainable="decoder")
    clip = float(norms.sort().values[3:5].mean())
    _, expected = _reference_norms_and_step(model, images, captions, max_grad_norm=clip, trainable="decoder")
    results = {}
    for mode in MODES:
        change, before, after, _ = _dp_step(mode, model, images, captions, max_grad_norm=clip, trainable="decoder")
        frozen = [(a, b) for (name, _), a, b in zip(model.named_parameters(), after, before)
                  if parameter_group(name) != "decoder"]
        assert frozen and all(torch.equal(a, b) for a, b in frozen)  # encoder and fusion never move
        results[mode] = change
    assert _close(results["ghost"], results["hooks"]) and _close(results["ghost"], expected)


@pytest.mark.parametrize("physical, fixed", [(3, False), (3, True), (12, True)])
def test_parity_holds_over_virtual_steps_and_padded_physical_batches(setup, physical, fixed):
    """BatchMemoryManager splits the logical batch of 8 into physical batches of at most 3 (one
    optimizer step); fixed shapes pad each physical batch with masked rows."""
    model, images, captions, clip = setup
    _, expected = _reference_norms_and_step(model, images, captions, max_grad_norm=clip)
    for mode in MODES:
        change, *_ = _dp_step(mode, model, images, captions, max_grad_norm=clip, physical=physical, fixed=fixed)
        assert _close(change, expected), (mode, physical, fixed)


def test_padded_rows_have_zero_norm_under_ghost(setup):
    model, images, captions, clip = setup
    _, _, _, private = _dp_step("ghost", model, images, captions, max_grad_norm=clip, physical=12, fixed=True)
    norms = private.per_sample_gradient_norms
    assert norms.shape == (12,) and torch.all(norms[8:] == 0) and torch.all(norms[:8] > 0)


def _empty_loader(images, captions):
    """A loader whose one logical batch is empty (an empty Poisson draw)."""
    return DataLoader(TensorDataset(images, captions), batch_sampler=[[]],
                      collate_fn=lambda rows: (images[:0], captions[:0]))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fixed", [False, True])
def test_an_empty_poisson_batch_is_a_counted_noise_only_step(mode, fixed):
    cfg = tiny_config()
    model = Captioner(cfg)
    images, captions = random_batch(cfg, 6, seed=2)
    engine, private, optimizer, _ = make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(images, captions), batch_size=3), noise_multiplier=1.0,
        max_grad_norm=1.0, grad_sample_mode=mode, accountant="prv")
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_epoch(private, optimizer, _empty_loader(images, captions), device="cpu",
                        max_physical_batch_size=4, fixed_batch_shapes=fixed)
    assert stats["steps"] == 1 and stats["examples"] == 0
    assert len(engine.accountant) == 1  # the accountant counted it
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # noise only
    # the model still trains afterwards
    stats = train_epoch(private, optimizer, DataLoader(TensorDataset(images, captions), batch_size=3), device="cpu",
                        max_physical_batch_size=4, fixed_batch_shapes=fixed)
    assert stats["steps"] == 2 and stats["examples"] == 6 and stats["loss"] > 0


def test_ghost_refuses_the_lstm_decoder_up_front():
    cfg = tiny_config(decoder="lstm")
    model = Captioner(cfg)
    images, captions = random_batch(cfg, 4)
    with pytest.raises(ValueError, match="grad-sample-mode 'ghost' cannot train the 'lstm' decoder"):
        make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                     data_loader=DataLoader(TensorDataset(images, captions), batch_size=2), noise_multiplier=1.0,
                     max_grad_norm=1.0, grad_sample_mode="ghost", accountant="prv")
    assert not hasattr(unwrap(model), "_module")


@pytest.mark.parametrize("bad, error", [("functorch", ValueError), ("Ghost", ValueError), (1, TypeError)])
def test_bad_grad_sample_mode_names_the_value(bad, error):
    with pytest.raises(error, match="grad-sample-mode must be"):
        check_grad_sample_mode(bad)


@pytest.mark.parametrize("trainable", ["all", "decoder"])
def test_a_site_round_trains_with_ghost_clipping_from_the_run_config(tmp_path, trainable):
    from client.settings import local_training
    from client.trainer import train_round
    from shared_model.data.synthetic import load_embedded, synthetic_vocabulary
    from shared_model.privacy.ledger import PrivacyLedger
    from shared_model.privacy.site_budget import RunRequest, SiteBudget

    training = local_training({**default_run_config(), "local-epochs": 1, "batch-size": 16, "lr": 1e-3, "max-physical-batch-size": 12,
                               "physical-batch-shape": "fixed", "trainable": trainable,
                               "grad-sample-mode": "ghost"}, {})
    assert training.grad_sample_mode == "ghost" and training.fixed_batch_shapes
    vocab = synthetic_vocabulary()
    model = Captioner(tiny_config(vocab_size=len(vocab), max_len=20))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    reply = train_round(model=model, data=load_embedded("train", 48, seed=0, image_size=32), vocab=vocab,
                        training=training, budget=SiteBudget(target_epsilon=3.0, target_delta=1e-3, accountant="rdp"),
                        ledger=ledger, request=RunRequest(run_id="r1", run_epsilon=2.0, num_rounds=1, local_epochs=1,
                                                          batch_size=16, count_noise_multiplier=5.0),
                        server_round=1, seed=0)
    assert 0 < reply["run-epsilon-spent"] <= 2.0 * (1 + 1e-6) and reply["epsilon"] <= 3.0 and reply["steps"] == -(-reply["num-examples"] // 16)
    assert "train-loss" not in reply  # steps from the noisy count (num-examples), never the exact one
    assert [r["kind"] for r in ledger.records()] == ["count-gaussian", "grant", "dp-sgd"]
    moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert moved == {n for n, _ in model.named_parameters() if trainable == "all" or parameter_group(n) == "decoder"}
    assert not any(n.startswith("_module.") for n in model.state_dict())


@pytest.mark.parametrize("decoder, trainable, precision, expected", [
    ("transformer", "fusion+decoder", "fp32", "ghost"),  # frozen encoder: ghost measured cheaper
    ("transformer", "decoder", "auto", "ghost"),
    ("transformer", "all", "fp32", "hooks"),  # the CNN trains: Conv2d has no ghost norms
    ("lstm", "decoder", "fp32", "hooks"),  # ghost refuses the LSTM decoder
    ("transformer", "decoder", "bf16", "hooks"),  # ghost refuses bf16
])
def test_auto_grad_sample_mode_picks_ghost_only_where_it_pays_and_works(decoder, trainable, precision, expected):
    from client.settings import local_training

    rc = {**default_run_config(), "local-epochs": 1, "batch-size": 16, "lr": 1e-3, "max-physical-batch-size": 16,
          "trainable": trainable,
          "grad-sample-mode": "auto", "model-decoder": decoder, "precision": precision}
    assert local_training(rc, {}).grad_sample_mode == expected
    from shared_model.run_settings import validate_run_config

    assert validate_run_config(rc)["grad-sample-mode"] == "auto"  # every combination is a valid setting
