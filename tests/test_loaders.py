"""Site data loaders on real fixture files: good data loads right, bad data is named or skipped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from shared_model.data.loaders import (CaptionDataError, load_caption_table, load_coco_captions, load_dataset,
    load_images, load_karpathy)
from shared_model.data.records import CaptionSet

RED, GREEN, BLUE, GREY = (255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128)


def _image(path: Path, colour: tuple[int, ...], *, size: tuple[int, int] = (20, 12), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode != "L" else colour[0]).save(path)


def _json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _coco(tmp_path: Path, annotations: list[dict] | None = None) -> Path:
    """Images 1 (red), 2 (grey, mode L), 3 (blue, RGBA) and captions for each."""
    _image(tmp_path / "img" / "a.png", RED)
    _image(tmp_path / "img" / "b.png", GREY, mode="L")
    _image(tmp_path / "img" / "c.png", (*BLUE, 255), mode="RGBA")
    images = [{"id": i, "file_name": f, "height": 12} for i, f in ((1, "a.png"), (2, "b.png"), (3, "c.png"))]
    if annotations is None:
        annotations = [{"id": 10, "image_id": 1, "caption": "A red square."},
                       {"id": 11, "image_id": 2, "caption": "a grey square"},
                       {"id": 12, "image_id": 1, "caption": "Red again"},
                       {"id": 13, "image_id": 3, "caption": "blue"}]
    return _json(tmp_path / "captions.json", {"images": images, "annotations": annotations})


def _karpathy(tmp_path: Path) -> Path:
    entries = []
    for n, (split, colour) in enumerate([("train", RED), ("restval", GREEN), ("val", BLUE), ("test", GREY)]):
        _image(tmp_path / "img" / "sub" / f"{n}.png", colour)
        sentences = [{"raw": f"{split} caption {k}.", "tokens": [split, "caption"]} for k in range(2)]
        entries.append({"filepath": "sub", "filename": f"{n}.png", "split": split, "sentences": sentences,
                        "imgid": n, "cocoid": 100 + n})
    return _json(tmp_path / "dataset_coco.json", {"dataset": "coco", "images": entries})


def _colour(cs: CaptionSet, index: int) -> tuple[int, ...]:
    assert (cs.images[index] == cs.images[index, 0, 0]).all(), "expected a solid colour"
    return tuple(int(v) for v in cs.images[index, 0, 0])


# --- good data ------------------------------------------------------------------------------


def test_coco_groups_captions_and_loads_rgb(tmp_path: Path) -> None:
    cs = load_coco_captions(_coco(tmp_path), tmp_path / "img", image_size=16)
    assert cs.image_ids == ["1", "2", "3"]
    assert cs.captions == [("A red square.", "Red again"), ("a grey square",), ("blue",)]
    assert cs.images.shape == (3, 16, 16, 3) and cs.images.dtype == np.uint8
    assert [_colour(cs, i) for i in range(3)] == [RED, GREY, BLUE]
    assert cs.skipped == []


def test_resize_shorter_side_then_centre_crop(tmp_path: Path) -> None:
    image = Image.new("RGB", (64, 32), RED)
    image.paste(BLUE, (32, 0, 64, 32))  # left half red, right half blue
    image.save(tmp_path / "wide.png")
    (tmp_path / "t.csv").write_text("image,caption\nwide.png,half red half blue\n", encoding="utf-8")
    out = load_caption_table(tmp_path / "t.csv", image_size=16).images[0]
    assert out.shape == (16, 16, 3)
    # 64x32 -> 32x16, the centre 16 columns keep 8 red then 8 blue
    np.testing.assert_allclose(out[:, :6], np.broadcast_to(RED, (16, 6, 3)), atol=2)
    np.testing.assert_allclose(out[:, 10:], np.broadcast_to(BLUE, (16, 6, 3)), atol=2)


@pytest.mark.parametrize(("split", "ids"), [("train", ["100", "101"]), ("val", ["102"]), ("test", ["103"])])
def test_karpathy_splits_include_restval_in_train(tmp_path: Path, split: str, ids: list[str]) -> None:
    cs = load_karpathy(_karpathy(tmp_path), tmp_path / "img", split=split, image_size=8)
    assert cs.image_ids == ids
    assert cs.captions[0] == (f"{split} caption 0.", f"{split} caption 1.")
    assert _colour(cs, 0) == {"train": RED, "val": BLUE, "test": GREY}[split]


def test_karpathy_without_filepath_or_cocoid(tmp_path: Path) -> None:
    _image(tmp_path / "x.png", GREEN)
    entry = {"filename": "x.png", "split": "test", "sentences": [{"raw": "green", "tokens": ["green"]}], "imgid": 7}
    path = _json(tmp_path / "dataset_flickr8k.json", {"dataset": "flickr8k", "images": [entry]})
    cs = load_karpathy(path, tmp_path, split="test", image_size=8)
    assert cs.image_ids == ["7"] and cs.captions == [("green",)] and _colour(cs, 0) == GREEN


def test_karpathy_unknown_split_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"train.*val.*test.*'dev'"):
        load_karpathy(_karpathy(tmp_path), tmp_path / "img", split="dev")


def test_csv_rows_of_one_image_form_one_record(tmp_path: Path) -> None:
    _image(tmp_path / "pics" / "a.png", RED)
    _image(tmp_path / "pics" / "b.png", BLUE)
    (tmp_path / "t.csv").write_text('image,caption\npics/a.png,"red, square"\npics/b.png,blue\n'
                                    'pics/a.png,another red one\n', encoding="utf-8")
    cs = load_caption_table(tmp_path / "t.csv", image_size=8)
    assert cs.image_ids == ["pics/a.png", "pics/b.png"]
    assert cs.captions == [("red, square", "another red one"), ("blue",)]
    assert [_colour(cs, 0), _colour(cs, 1)] == [RED, BLUE]


def test_jsonl_with_file_name_key_and_image_root(tmp_path: Path) -> None:
    _image(tmp_path / "root" / "a.png", GREEN)
    lines = [{"file_name": "a.png", "caption": "green"}, {"file_name": "a.png", "caption": "still green"}]
    table = tmp_path / "tables" / "t.jsonl"
    table.parent.mkdir()
    table.write_text("\n".join(map(json.dumps, lines)) + "\n\n", encoding="utf-8")
    cs = load_caption_table(table, image_root=tmp_path / "root", image_size=8)
    assert cs.image_ids == ["a.png"] and cs.captions == [("green", "still green")]
    assert load_dataset("jsonl", table, image_dir=tmp_path / "root", image_size=8).captions == cs.captions


def test_load_dataset_dispatches(tmp_path: Path) -> None:
    coco = load_dataset("coco", _coco(tmp_path), image_dir=tmp_path / "img", image_size=8)
    karpathy = load_dataset("karpathy", _karpathy(tmp_path), image_dir=tmp_path / "img", split="val", image_size=8)
    assert coco.image_ids == ["1", "2", "3"] and karpathy.image_ids == ["102"]
    with pytest.raises(ValueError, match=r"'parquet'.*coco, karpathy, csv, jsonl"):
        load_dataset("parquet", tmp_path / "captions.json")


def test_load_images_for_captioning(tmp_path: Path) -> None:
    _image(tmp_path / "a.png", RED)
    _image(tmp_path / "b.jpg", GREY, mode="L")
    images = load_images([tmp_path / "a.png", str(tmp_path / "b.jpg")], image_size=8)
    assert images.shape == (2, 8, 8, 3) and tuple(images[0, 4, 4]) == RED
    with pytest.raises(CaptionDataError, match="c.png"):
        load_images([tmp_path / "c.png"])


def test_argument_and_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_coco_captions(tmp_path / "nope.json", tmp_path)
    with pytest.raises(ValueError, match="got 4"):
        load_coco_captions(_coco(tmp_path), tmp_path / "img", image_size=4)
    with pytest.raises(ValueError, match="captions.txt"):
        load_caption_table(tmp_path / "captions.txt")


# --- bad data -------------------------------------------------------------------------------

Case = Callable[[Path], Callable[..., CaptionSet]]


def _coco_with(mutate: Callable[[Path, dict], None]) -> Case:
    """A COCO fixture changed by `mutate(tmp_path, data)`; returns a loader of it."""
    def build(tmp_path: Path) -> Callable[..., CaptionSet]:
        path = _coco(tmp_path)
        data = json.loads(path.read_text())
        mutate(tmp_path, data)
        _json(path, data)
        return lambda **kw: load_coco_captions(path, tmp_path / "img", image_size=8, **kw)
    return build


def _raw(name: str, content: bytes) -> Case:
    """A file of raw bytes beside a red a.png, loaded as COCO (.json) or as a table."""
    def build(tmp_path: Path) -> Callable[..., CaptionSet]:
        _image(tmp_path / "a.png", RED)
        path = tmp_path / name
        path.write_bytes(content)
        if path.suffix == ".json":
            return lambda **kw: load_coco_captions(path, tmp_path, image_size=8, **kw)
        return lambda **kw: load_caption_table(path, image_size=8, **kw)
    return build


def _karpathy_with(mutate: Callable[[dict], None]) -> Case:
    def build(tmp_path: Path) -> Callable[..., CaptionSet]:
        path = _karpathy(tmp_path)
        data = json.loads(path.read_text())
        mutate(data)
        _json(path, data)
        return lambda **kw: load_karpathy(path, tmp_path / "img", image_size=8, **kw)
    return build


# (case, file name, record identifier, reason, records kept with skip_bad): one bad record each
RECORD_CASES = {
    "missing image": (_coco_with(lambda d, _: (d / "img" / "b.png").unlink()), "captions.json", "image 2",
                      "not found", 2),
    "corrupt image": (_coco_with(lambda d, _: (d / "img" / "c.png").write_bytes(b"\x89PNG not really")),
                      "captions.json", "image 3", "unreadable image", 2),
    "empty caption": (_coco_with(lambda _, data: data["annotations"][1].update(caption=" ... ")),
                      "captions.json", "annotation 1 (image_id 2)", "empty caption", 2),
    "caption not a string": (_coco_with(lambda _, data: data["annotations"][3].update(caption=["blue"])),
                             "captions.json", "annotation 3 (image_id 3)", "must be str", 2),
    "missing key": (_coco_with(lambda _, data: data["images"][1].pop("file_name")), "captions.json", "image 2",
                    "missing key 'file_name'", 2),
    "unknown image id": (_coco_with(lambda _, data: data["annotations"].append({"image_id": 99, "caption": "x"})),
                         "captions.json", "annotation 4 (image_id 99)", "unknown image id", 3),
    "image without captions": (_coco_with(lambda _, data: data["annotations"].pop()), "captions.json", "image 3",
                               "no captions", 2),
    "coco duplicate id": (_coco_with(lambda _, data: data["images"].append({"id": 1, "file_name": "b.png"})),
                          "captions.json", "images[3] (id 1)", "duplicate image id", 3),
    "karpathy sentences not a list": (_karpathy_with(lambda data: data["images"][1].update(sentences="hi")),
                                      "dataset_coco.json", "image 101 (1.png)", "'sentences' must be list", 1),
    "karpathy duplicate id": (_karpathy_with(lambda data: data["images"][1].update(cocoid=100)),
                              "dataset_coco.json", "image 100 (1.png)", "duplicate image id", 1),
    "csv empty caption": (_raw("t.csv", b"image,caption\na.png,red\nb.png,\n"), "t.csv", "line 3",
                          "empty caption", 1),
    "jsonl invalid line": (_raw("t.jsonl", b'{"image": "a.png", "caption": "red"}\n{"image": "a.png",\n'),
                           "t.jsonl", "line 2", "invalid JSON", 1),
    "jsonl wrong type": (_raw("t.jsonl", b'{"image": "a.png", "caption": "red"}\n{"image": 3, "caption": "x"}\n'),
                         "t.jsonl", "line 2", "'image' must be str", 1),
}


@pytest.mark.parametrize("case", RECORD_CASES.values(), ids=RECORD_CASES.keys())
def test_bad_record_raises_naming_file_and_record(tmp_path: Path, case: tuple) -> None:
    build, file_name, record, reason, _ = case
    with pytest.raises(CaptionDataError) as err:
        build(tmp_path)()
    assert file_name in str(err.value) and record in str(err.value) and reason in str(err.value)


@pytest.mark.parametrize("case", RECORD_CASES.values(), ids=RECORD_CASES.keys())
def test_skip_bad_skips_only_bad_records(tmp_path: Path, case: tuple) -> None:
    build, file_name, record, reason, kept = case
    cs = build(tmp_path)(skip_bad=True)
    assert len(cs) == kept and len(cs.skipped) == 1
    skipped = cs.skipped[0]
    assert Path(skipped.source).name == file_name and skipped.record.startswith(record) and reason in skipped.reason


def test_skip_bad_keeps_good_records(tmp_path: Path) -> None:
    load = _coco_with(lambda _, data: data["annotations"][1].update(caption=""))(tmp_path)
    cs = load(skip_bad=True)
    assert cs.image_ids == ["1", "3"] and cs.captions == [("A red square.", "Red again"), ("blue",)]
    assert [_colour(cs, 0), _colour(cs, 1)] == [RED, BLUE]


def test_all_bad_with_skip_bad_raises(tmp_path: Path) -> None:
    load = _coco_with(lambda d, _: [p.unlink() for p in (d / "img").iterdir()])(tmp_path)
    with pytest.raises(CaptionDataError, match=r"captions\.json: no usable records \(3 bad"):
        load(skip_bad=True)


# (case, file name, reason) -- file-level problems raise even with skip_bad
FILE_CASES = {
    "invalid JSON": (_raw("captions.json", b'{"images": ['), "captions.json", "invalid JSON"),
    "non-UTF-8 CSV": (_raw("t.csv", "image,caption\na.png,caf\u00e9\n".encode("latin-1")), "t.csv", "not UTF-8"),
    "CSV without caption column": (_raw("t.csv", b"image,text\na.png,red\n"), "t.csv", "'caption' column"),
    "wrong top-level schema": (_karpathy_with(lambda data: data.update(images={"0": {}})), "dataset_coco.json",
                               "list 'images'"),
}


@pytest.mark.parametrize("case", FILE_CASES.values(), ids=FILE_CASES.keys())
def test_file_level_problem_raises_even_with_skip_bad(tmp_path: Path, case: tuple) -> None:
    build, file_name, reason = case
    with pytest.raises(CaptionDataError) as err:
        build(tmp_path)(skip_bad=True)
    assert file_name in str(err.value) and reason in str(err.value)
