import json

import numpy as np
import pytest
import torch
from PIL import Image

from shared_model.data.datasets import image_tensor
from shared_model.data.synthetic import generate_scenes, synthetic_vocabulary
from shared_model.model.captioner import Captioner
from shared_model.model.checkpoint import load_checkpoint, save_checkpoint
from runners.cli import main

from conftest import tiny_config


@pytest.mark.parametrize("decoder", ["transformer", "lstm"])
def test_reloaded_model_gives_identical_captions(tmp_path, decoder):
    vocab = synthetic_vocabulary()
    model = Captioner(tiny_config(vocab_size=len(vocab), decoder=decoder)).eval()
    with torch.no_grad():  # move away from the initialisation so captions are not all alike
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    data = generate_scenes(6, seed=1, image_size=32)
    images = image_tensor(data.images)
    save_checkpoint(tmp_path / "ckpt", model, vocab, metadata={"round": 3})
    loaded, loaded_vocab, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta == {"round": 3} and loaded_vocab == vocab
    assert loaded.caption(images, vocab, beam_size=3) == model.caption(images, vocab, beam_size=3)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_checkpoint_errors_name_the_problem(tmp_path):
    vocab = synthetic_vocabulary()
    model = Captioner(tiny_config(vocab_size=len(vocab)))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path / "c", model, vocab)
    doc = json.loads((tmp_path / "c" / "config.json").read_text())
    doc["model"]["d_model"] = 64
    (tmp_path / "c" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="do not match its config"):
        load_checkpoint(tmp_path / "c")
    with pytest.raises(ValueError, match="vocab_size 30 != vocabulary size"):
        save_checkpoint(tmp_path / "d", Captioner(tiny_config()), vocab)


def test_caption_command_prints_a_caption_per_image(tmp_path, capsys):
    vocab = synthetic_vocabulary()
    model = Captioner(tiny_config(vocab_size=len(vocab))).eval()
    save_checkpoint(tmp_path / "ckpt", model, vocab)
    data = generate_scenes(2, seed=0, image_size=32)
    paths = []
    for i, img in enumerate(data.images):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(img).save(paths[-1])
    assert main(["caption", str(tmp_path / "ckpt"), *map(str, paths), "--beam-size", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    expected = model.caption(image_tensor(np.stack(data.images)), vocab, beam_size=2)
    assert lines == [f"{p}\t{c}" for p, c in zip(paths, expected)]
    assert main(["caption", str(tmp_path / "ckpt"), str(tmp_path / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err


CORRUPTIONS = {
    "truncated weights": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:200]), "corrupt or truncated"),
    "random weights": ("model.safetensors", lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),
                       "corrupt or truncated"),
    "empty weights": ("model.safetensors", lambda p: p.write_bytes(b""), "are empty (0 bytes)"),
    "config without model": ("config.json", lambda p: p.write_text(json.dumps(
        {k: v for k, v in json.loads(p.read_text()).items() if k != "model"})), 'has no "model" object'),
    "config with a bad model": ("config.json", lambda p: p.write_text(json.dumps(
        {**json.loads(p.read_text()), "model": {"vocab_size": 30, "colour": 1}})), "invalid \"model\""),
}


@pytest.mark.parametrize("case", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_corrupt_checkpoint_is_named_by_load_and_by_the_caption_command(tmp_path, capsys, case):
    name, corrupt, what = case
    vocab = synthetic_vocabulary()
    save_checkpoint(tmp_path / "ckpt", Captioner(tiny_config(vocab_size=len(vocab))), vocab)
    corrupt(tmp_path / "ckpt" / name)
    with pytest.raises(ValueError) as err:
        load_checkpoint(tmp_path / "ckpt")
    assert str(tmp_path / "ckpt" / name) in str(err.value) and what in str(err.value)
    image = tmp_path / "img.png"
    Image.fromarray(generate_scenes(1, seed=0, image_size=32).images[0]).save(image)
    assert main(["caption", str(tmp_path / "ckpt"), str(image)]) == 2
    err_text = capsys.readouterr().err
    assert err_text.startswith("fedcap caption: error: ") and what in err_text and "Traceback" not in err_text
