"""A site's data store (shared_model/data/store.py): decoded once, in parallel, into files on the site's
disk; read row by row; the same records, content IDs, held-out split and DP training as a fresh load."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from client.trainer import train_round
from client.settings import local_training
from shared_model.run_settings import default_run_config
from deploy.site_folders import write_coco_folder
from shared_model.data.datasets import CaptionDataset
from shared_model.data.loaders import CaptionDataError, load_dataset_folder, parse_dataset_folder
from shared_model.data.partition import hash_split
from shared_model.data.rows import ImageFile, ImageRows
from shared_model.data.store import StoreError, build_store, open_store
from shared_model.data.synthetic import load_embedded, synthetic_vocabulary
from shared_model.evaluation.canaries import append_records, included_canaries
from shared_model.model.captioner import Captioner
from shared_model.privacy.ledger import PrivacyLedger
from shared_model.privacy.site_budget import RunRequest, SiteBudget
from shared_model.run_settings import validate_node_config

VOCAB = synthetic_vocabulary()


def photo_folder(tmp_path, n=24, size=32, *, name="data"):
    """A COCO folder of `n` JPEGs (not square: the loader resizes and crops), with one image stored
    twice under two ids (copies of one image must stay on one side of the held-out split)."""
    folder = write_coco_folder(load_embedded("train", n, image_size=size), tmp_path / name)
    doc = json.loads((folder / "captions.json").read_text())
    for entry in doc["images"]:
        png = folder / "images" / entry["file_name"]
        jpg = png.with_suffix(".jpg")
        Image.open(png).resize((size + 8, size)).save(jpg, quality=90)
        png.unlink()
        entry["file_name"] = jpg.name
    shutil.copy(folder / "images" / doc["images"][0]["file_name"], folder / "images" / "copy.jpg")
    doc["images"].append({"id": n, "file_name": "copy.jpg"})
    doc["annotations"].append({"id": len(doc["annotations"]), "image_id": n, "caption": "a copy of the first"})
    (folder / "captions.json").write_text(json.dumps(doc))
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return photo_folder(tmp_path_factory.mktemp("store"))


def same_records(a, b):
    assert np.array_equal(np.asarray(a.images), np.asarray(b.images))
    assert (a.captions, a.image_ids, a.source_digests) == (b.captions, b.image_ids, b.source_digests)
    assert a.record_ids() == b.record_ids()


def test_parallel_decode_gives_exactly_a_fresh_load(folder, tmp_path):
    fresh = load_dataset_folder("coco", folder, image_size=32)
    lines = []
    one = build_store(parse_dataset_folder("coco", folder), tmp_path / "one", image_size=32, workers=1)
    two = build_store(parse_dataset_folder("coco", folder), tmp_path / "two", image_size=32, workers=2,
                      report=lines.append)
    same_records(fresh, one)
    same_records(fresh, two)
    same_records(fresh, open_store(tmp_path / "two"))  # warm: from the files alone
    assert lines and "25/25 images at 32 px, 2 processes" in lines[-1]
    assert isinstance(two.images, ImageRows) and all(isinstance(s, ImageFile) for s in two.images.sources)
    assert (tmp_path / "two.npy").stat().st_size == np.load(tmp_path / "two.npy", mmap_mode="r").nbytes + \
        ImageFile(tmp_path / "two.npy").offset
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_subsets_split_and_training_view_read_lazily_and_match(folder, tmp_path):
    fresh = load_dataset_folder("coco", folder, image_size=32)
    store = build_store(parse_dataset_folder("coco", folder), tmp_path / "s", image_size=32, workers=1)
    for (a_kept, a_held), (b_kept, b_held) in [(hash_split(fresh), hash_split(store))]:
        same_records(a_kept, b_kept)
        same_records(a_held, b_held)
        assert isinstance(b_kept.images, ImageRows)  # a subset copies no pixel
    kept, held = hash_split(store)
    copies = {i for i, d in zip([*kept.image_ids, *held.image_ids], [*kept.source_digests, *held.source_digests])
              if d == fresh.source_digests[0]}
    assert len(copies) == 2 and (copies <= set(kept.image_ids) or copies <= set(held.image_ids))
    part = store.subset([5, 1, 3])
    assert np.array_equal(part.images[1], fresh.images[1]) and np.array_equal(part.images[0:2], fresh.images[[5, 1]])
    mem, disk = CaptionDataset(fresh, VOCAB, max_len=10), CaptionDataset(store, VOCAB, max_len=10)
    assert isinstance(disk.images, ImageRows) and len(disk) == len(mem)
    for i in (0, 7, len(store) - 1):
        torch.manual_seed(i)
        a = mem[i]
        torch.manual_seed(i)
        b = disk[i]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_canaries_append_to_a_store_without_reading_it(folder, tmp_path):
    store = build_store(parse_dataset_folder("coco", folder), tmp_path / "s", image_size=32, workers=1)
    canaries = included_canaries(6, seed=0, image_size=32)
    both = append_records(store, canaries)
    assert isinstance(both.images, ImageRows) and len(both) == len(store) + len(canaries)
    assert np.array_equal(both.images[len(store):], canaries.images)
    assert np.array_equal(both.images[: len(store)], np.asarray(store.images))


def test_bad_records_are_skipped_or_refused_as_the_loader_does(tmp_path):
    folder = photo_folder(tmp_path, n=10)
    doc = json.loads((folder / "captions.json").read_text())
    (folder / "images" / doc["images"][3]["file_name"]).write_bytes(b"not a jpeg")
    doc["images"].append({"id": 99, "file_name": doc["images"][5]["file_name"]})  # a duplicate-free extra
    doc["images"].append(dict(doc["images"][2]))  # a duplicate image id
    doc["annotations"].append({"id": 1000, "image_id": 99, "caption": "one more"})
    (folder / "captions.json").write_text(json.dumps(doc))
    with pytest.raises(CaptionDataError) as fresh_error:
        load_dataset_folder("coco", folder, image_size=32)
    with pytest.raises(CaptionDataError) as store_error:
        build_store(parse_dataset_folder("coco", folder), tmp_path / "bad", image_size=32, workers=2)
    assert str(store_error.value) == str(fresh_error.value)
    assert "unreadable image" in str(store_error.value) and "0x" not in str(store_error.value)
    assert not list(tmp_path.glob("bad*")) and not list(tmp_path.glob(".bad*"))
    fresh = load_dataset_folder("coco", folder, image_size=32, skip_bad=True)
    store = build_store(parse_dataset_folder("coco", folder), tmp_path / "skip", image_size=32, skip_bad=True,
                        workers=2)
    same_records(fresh, store)  # rows compacted: the skipped image's row is gone
    assert store.skipped == fresh.skipped and len(store.skipped) == 2
    assert open_store(tmp_path / "skip").skipped == fresh.skipped


def test_a_torn_store_is_refused_naming_the_file(folder, tmp_path):
    build_store(parse_dataset_folder("coco", folder), tmp_path / "s", image_size=32, workers=1)
    npy = tmp_path / "s.npy"
    npy.write_bytes(npy.read_bytes()[:-1])
    with pytest.raises(StoreError, match=r"s\.npy has .* bytes where its header"):
        open_store(tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="no data store"):
        open_store(tmp_path / "nothing")
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        build_store(parse_dataset_folder("coco", folder), tmp_path / "w", image_size=32, workers=0)


def test_decode_workers_is_a_site_setting():
    base = {"site-name": "a", "data-dir": "/d", "state-dir": "/s"}
    assert validate_node_config({**base, "decode-workers": 3})["decode-workers"] == 3
    with pytest.raises(ValueError, match="decode-workers must be an integer >= 1, got 0"):
        validate_node_config({**base, "decode-workers": 0})


def test_a_dp_round_trains_from_the_store_with_fixed_shapes(folder, tmp_path):
    store = build_store(parse_dataset_folder("coco", folder), tmp_path / "s", image_size=32, workers=1)
    train, _ = hash_split(store)
    model = Captioner(tiny_config(vocab_size=len(VOCAB), max_len=10))
    request = RunRequest(run_id="r", run_epsilon=2.0, num_rounds=1, local_epochs=1, batch_size=8,
                         count_noise_multiplier=5.0)
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    metrics = train_round(model=model, data=train, vocab=VOCAB, ledger=ledger, request=request, server_round=1,
                          training=local_training({**default_run_config(), "local-epochs": 1, "batch-size": 8,
                                                   "lr": 1e-3, "max-physical-batch-size": 4,
                                                   "physical-batch-shape": "fixed"}, {}),
                          budget=SiteBudget(target_epsilon=4.0, target_delta=1e-3, accountant="rdp"), seed=0)
    assert metrics["steps"] >= 1 and 0 < metrics["epsilon"] <= 4.0
    fresh_train, _ = hash_split(load_dataset_folder("coco", folder, image_size=32))
    rounds = [r for r in ledger.records() if r["kind"] == "dp-sgd"]
    # each record once: copies of one image are one record (privacy/identity.py)
    assert rounds[-1]["records_trained"] == len(set(fresh_train.source_digests))
