import pytest

from shared_model.data.vocab import Vocabulary, tokenize


def test_build_counts_and_orders_words():
    vocab = Vocabulary.build(["A red circle.", "a blue circle", "a circle, alone"], min_count=2)
    assert vocab.itos == ["<pad>", "<start>", "<end>", "<unk>", "a", "circle"]
    assert vocab.encode("a red circle") == [1, 4, 3, 5, 2]
    assert vocab.decode([1, 4, 3, 5, 2, 0, 5]) == "a <unk> circle"


def test_encode_cuts_to_max_len_keeping_end():
    vocab = Vocabulary(["a", "b"])
    assert vocab.encode("a b a b a", max_len=4) == [1, 4, 5, 2]
    with pytest.raises(ValueError, match="max_len must be >= 3, got 2"):
        vocab.encode("a", max_len=2)


def test_round_trip_through_file(tmp_path):
    vocab = Vocabulary.build(["ein rotes Quadrat", "a red square", "l'image d'un carré"])
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded == vocab and loaded.stoi == vocab.stoi
    assert "carré" in loaded.stoi and tokenize("L'image, d'un CARRÉ!") == ["l'image", "d'un", "carré"]


def test_bad_vocabulary_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Vocabulary.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        Vocabulary.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"format": "fedcap-vocab/1", "itos": ["a", "b"]}')
    with pytest.raises(ValueError, match="must start with"):
        Vocabulary.load(tmp_path / "other.json")
    with pytest.raises(ValueError, match="min_count must be >= 1, got 0"):
        Vocabulary.build(["a"], min_count=0)


def test_fedcap_vocab_builds_a_file_from_a_coco_folder(tmp_path, capsys):
    from deploy.site_folders import write_coco_folder
    from shared_model.data.synthetic import load_embedded
    from shared_model.data.vocab import Vocabulary
    from runners.cli import main

    public = write_coco_folder(load_embedded("train", 30, image_size=32), tmp_path / "public")
    other = write_coco_folder(load_embedded("test", 10, image_size=32), tmp_path / "other")
    out = tmp_path / "vocab.json"
    assert main(["vocab", str(public), "--out", str(out), "--max-size", "20", "--coverage", str(other)]) == 0
    printed = capsys.readouterr().out
    vocab = Vocabulary.load(out)
    assert len(vocab) == 24 and "vocabulary: 20 words" in printed and f"coverage of {other}:" in printed
    assert main(["vocab", str(public), "--out", str(out)]) == 2  # no silent overwrite
    assert "exists" in capsys.readouterr().err
    assert main(["vocab", str(tmp_path / "missing"), "--out", str(tmp_path / "v2.json")]) == 2
