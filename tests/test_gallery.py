"""`fedcap caption --gallery`: the run summary's caption gallery for any checkpoint and folder."""

import pytest

from conftest import tiny_config
from deploy.site_folders import write_coco_folder
from shared_model.data.synthetic import load_embedded, synthetic_vocabulary
from shared_model.model.captioner import Captioner
from shared_model.model.checkpoint import save_checkpoint
from runners.cli import main


@pytest.fixture
def checkpoint_and_folder(tmp_path):
    vocab = synthetic_vocabulary()
    checkpoint = save_checkpoint(tmp_path / "ckpt", Captioner(tiny_config(vocab_size=len(vocab))), vocab)
    folder = write_coco_folder(load_embedded("test", 4, image_size=32), tmp_path / "coco")
    return checkpoint, folder


def test_caption_writes_a_gallery_of_a_folder(tmp_path, checkpoint_and_folder, capsys):
    checkpoint, folder = checkpoint_and_folder
    out = tmp_path / "gallery"
    assert main(["caption", str(checkpoint), "--data", str(folder), "--gallery", str(out), "--gallery-size", "3",
                 "--beam-size", "1"]) == 0
    md = (out / "gallery.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ![")]
    # issue 23: the title names the checkpoint once and the decoding; every reference is shown
    assert md.startswith("## What the model says: ckpt, greedy decoding (beam 1)\n")
    assert "| image | references | ckpt |" in md
    assert len(rows) == 3 and all(line.count(" | ") == 2 for line in rows)  # image, references, one caption
    data = load_embedded("test", 4, image_size=32)
    assert len(data.captions[0]) == 4 and "<br>".join(data.captions[0]) in rows[0]
    assert "](images/00.png)" in md
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00.png", "01.png", "02.png"]
    assert "gallery of 3 images" in capsys.readouterr().err


def test_caption_prints_a_folders_captions_and_names_a_missing_input(checkpoint_and_folder, capsys):
    checkpoint, folder = checkpoint_and_folder
    assert main(["caption", str(checkpoint), "--data", str(folder), "--beam-size", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all("\t" in line for line in lines)
    assert main(["caption", str(checkpoint)]) == 2
    assert "give image files or --data DIR" in capsys.readouterr().err
    assert main(["caption", str(checkpoint), "x.png", "--gallery", "out"]) == 2
    assert "--gallery needs --data DIR" in capsys.readouterr().err


def test_the_run_summarys_gallery_shows_the_first_and_last_round(tmp_path):
    from shared_model.evaluation.gallery import Gallery

    data = load_embedded("test", 3, image_size=32)
    gallery = Gallery(data, tmp_path / "gallery", size=2)
    assert gallery.section() == []
    gallery.observe(0, {i: "a red" for i in data.image_ids})
    gallery.observe(1, {i: "a red circle" for i in data.image_ids})
    gallery.observe(3, {i: "a blue | square" for i in data.image_ids})
    lines = gallery.section()
    assert "| image | references | round 0 | round 3 |" in lines
    assert lines[-1].endswith("| a red | a blue / square |") and (tmp_path / "gallery" / "01.png").is_file()


def test_a_gallery_names_a_run_folders_checkpoint_by_its_run(tmp_path, checkpoint_and_folder):
    """`fedcap train`/`pretrain` write <out>/checkpoint and a federated run checkpoints/round-NNNN: the
    label says which run, not "checkpoint checkpoint"."""
    from runners.cli import checkpoint_label

    checkpoint, folder = checkpoint_and_folder
    pre = tmp_path / "pre" / "checkpoint"
    pre.parent.mkdir()
    checkpoint.rename(pre)
    assert main(["caption", str(pre), "--data", str(folder), "--gallery", str(tmp_path / "g"), "--gallery-size", "1",
                 "--beam-size", "2"]) == 0
    assert (tmp_path / "g" / "gallery.md").read_text().startswith(
        "## What the model says: pre/checkpoint, beam search (beam 2)\n")
    assert checkpoint_label(tmp_path / "run-7" / "checkpoints" / "round-0002") == "run-7/round-0002"
