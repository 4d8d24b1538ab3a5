"""Public pretraining: the public variant, `fedcap pretrain/train/evaluate` on folders, the cache,
and freezing parts of the model under a real Opacus engine (frozen = no grad_sample, no noise)."""

import hashlib
import json

import pytest
import torch
from torch.utils.data import DataLoader

from deploy.site_folders import write_coco_folder
from shared_model.data.datasets import CaptionDataset
from shared_model.data.public import load_public, public_seed
from shared_model.data.synthetic import generate_scenes, load_embedded, split_seed, synthetic_vocabulary
from shared_model.data.vocab import Vocabulary
from shared_model.model.captioner import Captioner
from shared_model.model.checkpoint import checkpoint_sha256, load_checkpoint
from shared_model.model.trainable import parameter_group, set_trainable
from shared_model.privacy.dp import make_private
from runners import cli
from runners.pretrain import cached_pretrain, pretrain_config, settings_hash

from conftest import tiny_config

TINY_MODEL = dict(image_size=32, cnn_channels=(8, 16), d_model=32, num_heads=2, ffn_dim=32, max_len=16, dropout=0.0)


def _digest(images, captions):
    return {hashlib.sha256(img.tobytes() + "|".join(caps).encode()).hexdigest() for img, caps in zip(images, captions)}


def test_public_variant_never_equals_a_private_record():
    public = load_public(4000)  # the prefix of the default 20k pretraining set
    assert all(i.startswith("pub-0-") for i in public.image_ids)
    private = {split: load_embedded(split) for split in ("train", "val", "test")}
    assert public_seed(0) not in {split_seed(s, k) for s in private for k in range(5)}
    public_images = {hashlib.sha256(img.tobytes()).hexdigest() for img in public.images}
    for split, data in private.items():
        assert not public_images & {hashlib.sha256(img.tobytes()).hexdigest() for img in data.images}, split
        assert not _digest(public.images, public.captions) & _digest(data.images, data.captions), split
        assert not set(public.image_ids) & set(data.image_ids)
    # the camera is what separates the populations: the same scenes without it are plain generator output
    raw = generate_scenes(10, seed=public_seed(0))
    assert raw.captions == public.captions[:10] and not (raw.images == public.images[:10]).all()


def _opacus_step(spec):
    cfg = tiny_config(vocab_size=len(synthetic_vocabulary()))
    model = Captioner(cfg)
    params = set_trainable(model, spec)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = load_embedded("train", 24, image_size=32)
    loader = DataLoader(CaptionDataset(data, synthetic_vocabulary(), max_len=cfg.max_len), batch_size=8)
    optimizer = torch.optim.SGD(params, lr=0.1)
    _, dp_model, dp_optimizer, dp_loader = make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                        noise_multiplier=1.0, max_grad_norm=1.0, accountant="prv")
    images, captions = next(b for b in dp_loader if len(b[0]))
    dp_optimizer.zero_grad()
    _, loss = dp_model(images, captions)
    loss.backward()
    grad_samples = {n: getattr(p, "grad_sample", None) for n, p in model.named_parameters()}
    dp_optimizer.step()
    return model, before, grad_samples


@pytest.mark.parametrize("spec,frozen", [("decoder", {"encoder", "fusion"}), ("fusion+decoder", {"encoder"}),
                                         ("all", set())])
def test_frozen_parameters_get_no_per_sample_gradient_and_no_noise(spec, frozen):
    model, before, grad_samples = _opacus_step(spec)
    for name, p in model.named_parameters():
        if parameter_group(name) in frozen:
            assert not p.requires_grad and grad_samples[name] is None and p.grad is None, name
            assert torch.equal(p.detach(), before[name]), name  # no noise, no update
        else:
            assert grad_samples[name] is not None and grad_samples[name].shape[1:] == p.shape, name
            assert not torch.equal(p.detach(), before[name]), name


def test_set_trainable_rejects_an_unknown_spec():
    with pytest.raises(ValueError, match="'encoder'"):
        set_trainable(Captioner(tiny_config()), "encoder")


def test_pretrain_cache_reuses_a_checkpoint_while_settings_are_unchanged(tmp_path):
    cfg = pretrain_config(train_size=64, test_size=8, epochs=1, batch_size=32, model=TINY_MODEL)
    lines = []
    checkpoint, result = cached_pretrain(cfg, tmp_path, log=lines.append)
    assert any("no site privacy budget" in line for line in lines)
    model, vocab, meta = load_checkpoint(checkpoint)
    assert meta["kind"] == "pretrained" and meta["source"] == "public" and vocab == synthetic_vocabulary()
    sha = checkpoint_sha256(checkpoint)
    again, cached = cached_pretrain(cfg, tmp_path, log=lines.append)
    assert again == checkpoint and checkpoint_sha256(again) == sha and cached["metrics"] == result["metrics"]
    assert cached["reused"] and "reused" not in result
    assert "reusing" in lines[-1]
    other = pretrain_config(train_size=64, test_size=8, epochs=2, batch_size=32, model=TINY_MODEL)
    assert settings_hash(other) != settings_hash(cfg)
    with pytest.raises(ValueError, match="non-private"):
        pretrain_config(dp=True)


def test_cli_pretrain_train_and_evaluate_on_folders(tmp_path, capsys):
    folder = write_coco_folder(load_public(60, image_size=32), tmp_path / "public")
    out = tmp_path / "pre"
    assert cli.main(["pretrain", "--data", str(folder), "--format", "coco", "--epochs", "1", "--batch-size", "16",
                     "--test-size", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "spends no site privacy budget" in printed
    model, vocab, meta = load_checkpoint(out / "checkpoint")
    assert meta["kind"] == "pretrained" and len(vocab) < len(synthetic_vocabulary()) + 1  # built from the folder
    # it learned from the public folder what carries over to a site's captions: its loss on them is well
    # below that of the same model untrained (~3.97 nats; ~2.9 after this one epoch)
    site = write_coco_folder(load_embedded("train", 40, image_size=32), tmp_path / "site")
    torch.manual_seed(0)
    untrained = _mean_loss(Captioner(model.config), site, vocab)
    assert _mean_loss(model, site, vocab) < untrained - 0.5
    # a site's centralized baseline on its own folder, from the pretrained checkpoint: its first epoch
    # starts from those weights, not from scratch
    assert cli.main(["train", "--data", str(site), "--format", "coco", "--epochs", "1", "--batch-size", "16",
                     "--vocab-file", str(out / "checkpoint" / "vocab.json"), "--init-from", str(out / "checkpoint"),
                     "--no-meteor", "--beam-size", "1", "--out", str(tmp_path / "site-run")]) == 0
    site_run = json.loads((tmp_path / "site-run" / "metrics.json").read_text())
    assert site_run["history"][0]["loss"] < untrained - 0.5 and 0 <= site_run["metrics"]["CIDEr-D"]
    capsys.readouterr()
    report = tmp_path / "eval.json"
    assert cli.main(["evaluate", str(out / "checkpoint"), str(site), "--format", "coco", "--beam-size", "1",
                     "--no-meteor", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "CIDEr-D" in printed and "BLEU-4" in printed
    assert json.loads(report.read_text())["images"] == 40


def _mean_loss(model, folder, vocab) -> float:
    """The model's mean caption loss (teacher forcing) on a COCO folder's records."""
    from shared_model.data.loaders import load_dataset

    data = load_dataset("coco", folder / "captions.json", image_dir=folder / "images", image_size=model.config.image_size)
    loader = DataLoader(CaptionDataset(data, vocab, max_len=model.config.max_len), batch_size=64)
    model.eval()
    with torch.no_grad():
        return sum(float(model(images, captions)[1]) * len(images) for images, captions in loader) / len(data)


@pytest.mark.parametrize("argv,message", [
    (["evaluate", "{tmp}/no-checkpoint", "embedded"], "no-checkpoint"),
    (["evaluate", "{ckpt}", "{tmp}/no-data", "--format", "csv"], "no-data"),
    (["pretrain", "--data", "{tmp}/no-data"], "no-data"),
    (["train", "--data", "{tmp}/empty", "--format", "jsonl"], "captions.jsonl"),
])
def test_cli_names_the_bad_path(tmp_path, capsys, argv, message):
    ckpt = tmp_path / "ckpt"
    from shared_model.model.checkpoint import save_checkpoint
    save_checkpoint(ckpt, Captioner(tiny_config(vocab_size=len(synthetic_vocabulary()))), synthetic_vocabulary())
    (tmp_path / "empty").mkdir()
    argv = [a.format(tmp=tmp_path, ckpt=ckpt) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "error" in err and message in err


def test_init_from_with_another_vocabulary_or_model_is_a_clear_error(tmp_path):
    from server.initial_model import initial_model
    from shared_model.model.checkpoint import save_checkpoint
    from runners.flower_runtime import default_run_config

    vocab = synthetic_vocabulary()
    rc = {**default_run_config(), "image-size": 32, "model-d-model": 32, "model-num-heads": 2, "model-ffn-dim": 32}
    model = Captioner(tiny_config(vocab_size=len(vocab), cnn_channels=(32, 64, 128), max_len=20))
    save_checkpoint(tmp_path / "ckpt", model, vocab)
    init = initial_model({**rc, "init-from": str(tmp_path / "ckpt")}, vocab)
    assert init.vocab == vocab and init.sha256 == checkpoint_sha256(tmp_path / "ckpt")
    assert init.record()["init-checkpoint"] == init.sha256
    other = Vocabulary(["just", "some", "words"])
    other.save(tmp_path / "other.json")
    with pytest.raises(ValueError, match="vocab-file .*other.json.* differs from the vocabulary of init-from"):
        initial_model({**rc, "init-from": str(tmp_path / "ckpt"), "vocab-file": str(tmp_path / "other.json")},
                      other)
    with pytest.raises(ValueError, match="d_model=32 .* 64"):
        initial_model({**rc, "init-from": str(tmp_path / "ckpt"), "model-d-model": 64}, vocab)
    with pytest.raises(ValueError, match="not both"):
        initial_model({**rc, "init-from": str(tmp_path / "ckpt"), "resume-from": str(tmp_path / "ckpt")}, vocab)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        initial_model({**rc, "init-from": str(tmp_path / "nowhere")}, vocab)
    with pytest.raises(ValueError, match="trainable"):
        initial_model({**rc, "trainable": "encoder"}, vocab)
