"""A deployed site's decoded records are cached on its disk and invalidated when its folder changes."""

import json

import numpy as np

from client.data_cache import cached_load, folder_key
from client.site_data import deployed_site_data
from deploy.site_data import write_coco_folder
from shared_model.data import load_embedded


def test_the_cache_gives_the_same_records_and_follows_the_folder(tmp_path):
    folder = write_coco_folder(load_embedded("train", 20, image_size=32), tmp_path / "data")
    node = {"data-dir": str(folder), "dataset-format": "coco"}
    cache = tmp_path / "state" / "cache"
    fresh_train, fresh_held = deployed_site_data(node, image_size=32)
    train, held = deployed_site_data(node, image_size=32, cache_dir=cache)
    assert len(list(cache.glob("records-*.npz"))) == 1
    again, _ = deployed_site_data(node, image_size=32, cache_dir=cache)
    for a, b in ((fresh_train, train), (fresh_train, again), (fresh_held, held)):
        assert np.array_equal(a.images, b.images) and a.captions == b.captions
        assert a.record_ids() == b.record_ids()  # the ledger sees the same records
    # a caption edited at the site: a new key, the new caption, no stale records
    doc = json.loads((folder / "captions.json").read_text())
    doc["annotations"][0]["caption"] = "a changed caption"
    (folder / "captions.json").write_text(json.dumps(doc))
    changed, held2 = deployed_site_data(node, image_size=32, cache_dir=cache)
    assert any("a changed caption" in caps for caps in [*changed.captions, *held2.captions])
    assert len(list(cache.glob("records-*.npz"))) == 2


def test_a_corrupt_cache_file_is_ignored_and_rewritten(tmp_path):
    folder = write_coco_folder(load_embedded("train", 6, image_size=32), tmp_path / "data")
    key = folder_key(folder, format="coco")
    calls = []

    def load():
        calls.append(1)
        return load_embedded("train", 6, image_size=32)

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / f"records-{key[:32]}.npz").write_bytes(b"not a zip")
    data, hit = cached_load(tmp_path / "cache", key, load)
    assert not hit and len(calls) == 1 and len(data) == 6
    data, hit = cached_load(tmp_path / "cache", key, load)
    assert hit and len(calls) == 1
