"""A deployed site's records live in a data store on its disk, invalidated when its folder changes
and rebuilt when it is corrupt (client/data_cache.py, shared_model/data/store.py)."""

import json
import logging

import numpy as np

from client.data_cache import cached_store, folder_key
from client.site_data import deployed_site_data
from deploy.site_folders import write_coco_folder
from shared_model.data.rows import ImageRows
from shared_model.data.store import open_store, write_store
from shared_model.data.synthetic import load_embedded


def test_the_cache_gives_the_same_records_and_follows_the_folder(tmp_path):
    folder = write_coco_folder(load_embedded("train", 20, image_size=32), tmp_path / "data")
    node = {"data-dir": str(folder), "dataset-format": "coco", "decode-workers": 1}
    cache = tmp_path / "state" / "cache"
    fresh_train, fresh_held = deployed_site_data(node, image_size=32)
    train, held = deployed_site_data(node, image_size=32, cache_dir=cache)
    assert len(list(cache.glob("records-*.npy"))) == len(list(cache.glob("records-*.json"))) == 1
    assert isinstance(train.images, ImageRows)  # on disk, not decoded into memory
    again, _ = deployed_site_data(node, image_size=32, cache_dir=cache)
    for a, b in ((fresh_train, train), (fresh_train, again), (fresh_held, held)):
        assert np.array_equal(a.images, np.asarray(b.images)) and a.captions == b.captions
        assert a.image_ids == b.image_ids
        assert a.record_ids() == b.record_ids()  # the ledger sees the same records
    # a caption edited at the site: a new key, the new caption, no stale records
    doc = json.loads((folder / "captions.json").read_text())
    doc["annotations"][0]["caption"] = "a changed caption"
    (folder / "captions.json").write_text(json.dumps(doc))
    changed, held2 = deployed_site_data(node, image_size=32, cache_dir=cache)
    assert any("a changed caption" in caps for caps in [*changed.captions, *held2.captions])
    assert len(list(cache.glob("records-*.json"))) == 2
    deployed_site_data(node, image_size=16, cache_dir=cache)  # a third store: the least recently used goes
    assert len(list(cache.glob("records-*.json"))) == len(list(cache.glob("records-*.npy"))) == 2


def test_a_corrupt_store_is_rebuilt_with_a_warning(tmp_path, caplog):
    key = "0" * 64
    records = load_embedded("train", 6, image_size=32)
    calls = []

    def build(stem):
        calls.append(stem)
        return write_store(stem, records)

    data, hit = cached_store(tmp_path, key, build)
    assert not hit and len(calls) == 1 and len(data) == 6
    data, hit = cached_store(tmp_path, key, build)
    assert hit and len(calls) == 1 and np.array_equal(np.asarray(data.images), records.images)
    npy = next(tmp_path.glob("records-*.npy"))
    for damage in (lambda: npy.write_bytes(npy.read_bytes()[:-100]),  # truncated
                   lambda: npy.with_suffix(".json").write_text("{not json"),
                   lambda: npy.unlink()):
        damage()
        with caplog.at_level(logging.WARNING, logger="client.data_cache"):
            data, hit = cached_store(tmp_path, key, build)
        assert not hit and "rebuilding the unusable data store" in caplog.text
        assert np.array_equal(np.asarray(open_store(npy.with_suffix("")).images), records.images)
        caplog.clear()
    assert len(calls) == 4


def test_the_key_follows_settings_and_files(tmp_path):
    folder = write_coco_folder(load_embedded("train", 3, image_size=32), tmp_path / "data")
    key = folder_key(folder, format="coco", image_size=32)
    assert key == folder_key(folder, format="coco", image_size=32)
    assert key != folder_key(folder, format="coco", image_size=64)
    (folder / "images" / "extra.txt").write_text("x")
    assert key != folder_key(folder, format="coco", image_size=32)
