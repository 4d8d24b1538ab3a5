"""The captioner: Opacus compatibility, per-example loss and gradients, decoding."""

import itertools

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

from shared_model.data.vocab import Vocabulary
from shared_model.model.captioner import Captioner, caption_loss
from shared_model.model.config import DECODERS, FUSIONS
from shared_model.privacy.dp import make_private

from conftest import random_batch, tiny_config


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    """A torchvision resnet18 state_dict file, as a site would keep one on disk."""
    from torchvision.models import resnet18

    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.manual_seed(1)
    torch.save(resnet18(weights=None).state_dict(), path)
    return str(path)


@pytest.mark.parametrize("decoder,fusion", list(itertools.product(DECODERS, FUSIONS)))
@pytest.mark.parametrize("encoder", ["cnn", "resnet18"])
def test_every_combination_validates_and_trains_under_opacus(encoder, decoder, fusion, resnet_weights):
    extra = {"encoder_weights": resnet_weights, "freeze_encoder": fusion == "add"} if encoder == "resnet18" else {}
    config = tiny_config(encoder=encoder, decoder=decoder, fusion=fusion, **extra)
    model = Captioner(config)
    assert ModuleValidator.validate(model, strict=True) == []
    images, captions = random_batch(config, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine, private, optimizer, loader = make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(TensorDataset(images, captions), batch_size=4),
        noise_multiplier=1.0, max_grad_norm=1.0, accountant="prv")
    for x, y in loader:
        optimizer.zero_grad()
        _, loss = private(x, y)
        loss.backward()
        optimizer.step()
    assert engine.get_epsilon(1e-5) > 0
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("lm_head") for k in changed)
    if extra.get("freeze_encoder"):
        assert not any(k.startswith("encoder.backbone") for k in changed)


def test_caption_loss_is_a_mean_of_per_caption_means():
    logits = torch.randn(2, 4, 7)
    targets = torch.tensor([[5, 6, 2, 0], [5, 2, 0, 0]])
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    expected = (per_token[0, :3].mean() + per_token[1, :2].mean()) / 2
    torch.testing.assert_close(caption_loss(logits, targets), expected)
    torch.testing.assert_close(caption_loss(logits, targets, reduction="none"),
                               torch.stack([per_token[0, :3].mean(), per_token[1, :2].mean()]))
    assert caption_loss(logits[:0], targets[:0]).item() == 0.0  # empty Poisson batch


@pytest.mark.parametrize("decoder,fusion", [("transformer", "attention"), ("transformer", "concat"),
                                            ("lstm", "attention"), ("lstm", "add")])
def test_opacus_per_sample_gradients_equal_one_example_at_a_time(decoder, fusion):
    config = tiny_config(decoder=decoder, fusion=fusion)
    model = Captioner(config)
    images, captions = random_batch(config, 5, lengths=[1, 7, 3, 5, 2])  # very different lengths
    gsm = GradSampleModule(model, loss_reduction="mean")
    _, loss = gsm(images, captions)
    loss.backward()
    per_sample = {n: p.grad_sample.clone() for n, p in model.named_parameters() if p.requires_grad}
    gsm._close()
    for i in range(5):
        n = int((captions[i] != 0).sum())  # this example alone, with its own (shorter) padding
        model.zero_grad()
        _, loss_i = model(images[i: i + 1], captions[i: i + 1, :n])
        loss_i.backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("decoder,fusion", list(itertools.product(DECODERS, FUSIONS)))
def test_stepwise_decoding_matches_teacher_forcing(decoder, fusion):
    model = Captioner(tiny_config(decoder=decoder, fusion=fusion)).eval()
    images, captions = random_batch(model.config, 3)
    full, _ = model.step(captions[:, :-1], model.start(images))
    state, chunks = model.start(images), []
    for t in range(captions.shape[1] - 1):
        logits, state = model.step(captions[:, t: t + 1], state)
        chunks.append(logits)
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("decoder", DECODERS)
def test_beam_size_one_equals_greedy_and_decoding_respects_end_and_max_len(decoder):
    torch.manual_seed(3)
    model = Captioner(tiny_config(decoder=decoder)).eval()
    with torch.no_grad():  # make <end> likely after a few words so both stopping paths are exercised
        model.lm_head.bias[Vocabulary.end_id] += 2.0
    images, _ = random_batch(model.config, 6)
    greedy = model.generate(images, beam_size=1)
    from shared_model.model.decoding import beam_search

    torch.testing.assert_close(beam_search(model, images, beam_size=1, max_len=model.config.max_len), greedy)
    for out in (greedy, model.generate(images, beam_size=4), model.generate(images, beam_size=3, max_len=5)):
        assert out.shape[1] <= model.config.max_len - 1
        for row in out.tolist():
            if Vocabulary.end_id in row:
                assert all(t == Vocabulary.pad_id for t in row[row.index(Vocabulary.end_id) + 1:])
            assert Vocabulary.start_id not in row
    assert model.generate(images, beam_size=3, max_len=5).shape[1] <= 4


def test_beam_search_scores_at_least_greedy_on_average():
    torch.manual_seed(5)
    model = Captioner(tiny_config()).eval()
    images, _ = random_batch(model.config, 8)

    def logprob(tokens):
        seq = torch.cat([torch.full((tokens.shape[0], 1), Vocabulary.start_id), tokens], 1)
        logits, _ = model.step(seq[:, :-1], model.start(images))
        lp = logits.log_softmax(-1).gather(-1, seq[:, 1:, None])[..., 0]
        alive = torch.ones_like(lp, dtype=torch.bool)  # count tokens up to and including <end>
        alive[:, 1:] = (seq[:, 1:-1] != Vocabulary.end_id).cumprod(1).bool()
        return (lp * alive).sum(1)

    with torch.no_grad():
        assert logprob(model.generate(images, beam_size=5)).mean() >= logprob(model.generate(images)).mean() - 1e-5


def test_resnet_weights_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        Captioner(tiny_config(encoder="resnet18", encoder_weights=str(tmp_path / "nope.pth")))


def test_resnet_weights_are_loaded_and_batchnorm_replaced_only_when_trainable(resnet_weights):
    saved = torch.load(resnet_weights)
    trainable = Captioner(tiny_config(encoder="resnet18", encoder_weights=resnet_weights))
    torch.testing.assert_close(trainable.encoder.backbone[0].weight, saved["conv1.weight"])
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in trainable.modules())
    torch.testing.assert_close(trainable.encoder.backbone[1].weight, saved["bn1.weight"])
    # frozen: the pretrained BatchNorm stays, in eval mode whatever train() says (docs/model.md)
    frozen = Captioner(tiny_config(encoder="resnet18", encoder_weights=resnet_weights, freeze_encoder=True)).train()
    bn1 = frozen.encoder.backbone[1]
    assert isinstance(bn1, torch.nn.BatchNorm2d) and not bn1.training and frozen.training
    torch.testing.assert_close(bn1.running_var, saved["bn1.running_var"])
    assert all(not p.requires_grad for p in frozen.encoder.backbone.parameters())


@pytest.mark.parametrize("bad,match", [
    (dict(decoder="gru"), "decoder must be one of"),
    (dict(fusion="mul"), "fusion must be one of"),
    (dict(d_model=30, num_heads=4), "divisible by num_heads"),
    (dict(dropout=1.5), "dropout must be in"),
    (dict(max_len=2), "max_len must be >= 3, got 2"),
])
def test_bad_model_config_names_the_value(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**bad)
