"""The shifted data scenario (issue 21, item 5): the sites and the server's test split show content
the public pretraining set rarely or never shows; the embedded scenario stays byte for byte as it was."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from client.site_data import simulated_site_data
from runners.flower_runtime import default_run_config
from runners.sources import evaluation_data, training_data
from server.server_data import server_eval_set, server_vocabulary
from shared_model.data.public import load_public
from shared_model.data.records import CaptionSet
from shared_model.data.synthetic import (COLOURS, DOMAIN_COLOURS, DOMAIN_SHAPES, SHAPES, generate_scenes,
                                         load_embedded, split_seed, synthetic_vocabulary)
from shared_model.data.vocab import Vocabulary, tokenize
from shared_model.run_settings import SIMULATION_ONLY, validate_run_config
from simulations.run import load_scenario

SCENARIO = Path(__file__).resolve().parents[1] / "simulations" / "scenarios" / "shifted.toml"
NEVER = ("ring", "pink")  # never in the shifted public set
RARE = ("star", "orange")  # 1 object in 500 there


def digest(data: CaptionSet) -> str:
    h = hashlib.sha256(np.ascontiguousarray(data.images).tobytes())
    h.update(json.dumps([list(c) for c in data.captions]).encode())
    h.update(json.dumps(data.image_ids).encode())
    h.update(np.asarray(data.labels).tobytes())
    return h.hexdigest()[:16]


# computed at commit 1765952, before the scenarios existed
EMBEDDED_DIGESTS = {
    "train": "217b7002cbc590f0", "val": "c3a5bd68557b5efe", "test": "506527ecc6496002",
    "train, seed 1, 32 px": "3bd68903eafb8420", "public": "ebe209e3edb3aa30", "public, seed 2": "5c60a208b8b7f05b",
    "colour labels": "1c4092035868106d", "vocabulary": "46680c1762749b6e",
}


def test_the_embedded_scenario_is_byte_identical_to_before():
    now = {split: digest(load_embedded(split, 300)) for split in ("train", "val", "test")}
    now["train, seed 1, 32 px"] = digest(load_embedded("train", 300, seed=1, image_size=32, scenario="embedded"))
    now["public"] = digest(load_public(300))
    now["public, seed 2"] = digest(load_public(300, seed=2, scenario="embedded"))
    now["colour labels"] = digest(generate_scenes(260, seed=5, label_attribute="colour"))
    now["vocabulary"] = hashlib.sha256(json.dumps(synthetic_vocabulary().itos).encode()).hexdigest()[:16]
    assert now == EMBEDDED_DIGESTS


def objects(data: CaptionSet) -> Counter:
    """Every object's shape and colour, counted from the inventory caption ("a picture of ...")
    that names each object once."""
    words = {*SHAPES, *COLOURS, *DOMAIN_SHAPES, *DOMAIN_COLOURS}
    return Counter(w for caps in data.captions for w in tokenize(caps[2]) if w in words)


def light_share(data: CaptionSet) -> float:
    """Share of images on a light background: the corner pixel (objects keep a one-pixel margin)."""
    return float((data.images[:, 0, 0].astype(int).mean(axis=1) > 100).mean())


@pytest.fixture(scope="module")
def shifted_public() -> CaptionSet:
    return load_public(4000, scenario="shifted", image_size=32)


def test_the_public_set_rarely_or_never_shows_what_the_sites_show(shifted_public):
    public = objects(shifted_public)
    n = sum(public[s] for s in (*SHAPES, *DOMAIN_SHAPES))  # about 8,000 objects
    assert all(public[w] == 0 for w in NEVER), public
    assert all(public[w] <= 0.005 * n for w in RARE), public  # 0.2% expected
    assert light_share(shifted_public) < 0.03
    # what a vocabulary built from public text would hold: not the sites' own words
    assert not set(NEVER) & set(Vocabulary.build(c for caps in shifted_public.captions for c in caps).itos)

    for split in ("train", "test"):  # the sites' pool and the server's test split show them often
        data = load_embedded(split, 500, scenario="shifted", image_size=32)
        private = objects(data)
        m = sum(private[s] for s in (*SHAPES, *DOMAIN_SHAPES))
        assert all(private[w] >= 0.15 * m for w in (*NEVER, *RARE)), (split, private)
        assert 0.4 < light_share(data) < 0.6
        assert sum(any(w in tokenize(c) for c in caps for w in NEVER) for caps in data.captions) > 0.5 * len(data)


def test_the_vocabulary_is_the_domains_grammar_and_covers_every_caption(shifted_public):
    vocab = synthetic_vocabulary("shifted")
    assert set(vocab.itos) - set(synthetic_vocabulary().itos) == {*DOMAIN_SHAPES, *DOMAIN_COLOURS, "light", "an"}
    private = load_embedded("test", 300, scenario="shifted", image_size=32)
    for data in (shifted_public, private):
        assert vocab.coverage(c for caps in data.captions for c in caps) == 1.0
    assert any("an orange" in c for caps in private.captions for c in caps)
    assert not any(" a orange" in c or c.startswith("a orange") for caps in private.captions for c in caps)


def test_each_population_has_its_own_seeds_and_records(shifted_public):
    seeds = {split_seed(s, 0, scenario) for s in ("train", "val", "test") for scenario in ("embedded", "shifted")}
    assert len(seeds) == 6
    private = {hashlib.sha256(image.tobytes()).hexdigest()
               for split in ("train", "test") for image in load_embedded(split, 1000, scenario="shifted",
                                                                           image_size=32).images}
    assert not private & {hashlib.sha256(image.tobytes()).hexdigest() for image in shifted_public.images}
    assert shifted_public.image_ids[0] == "pub-shifted-0-0"
    assert load_embedded("train", 10, scenario="shifted").labels.max() < len(SHAPES) + len(DOMAIN_SHAPES)


def test_the_run_config_key_is_checked_by_the_schema():
    defaults = default_run_config()
    assert defaults["data-scenario"] == "embedded" and "data-scenario" in SIMULATION_ONLY
    assert validate_run_config({**defaults, "data-scenario": "shifted"})["data-scenario"] == "shifted"
    with pytest.raises(ValueError, match=r"data-scenario.*'harder'"):
        validate_run_config({**defaults, "data-scenario": "harder"})
    with pytest.raises(TypeError, match="data-scenario"):
        validate_run_config({**defaults, "data-scenario": 2})
    with pytest.raises(ValueError, match="'harder'"):
        load_embedded("test", 5, scenario="harder")


def test_the_scenario_reaches_the_sites_the_server_and_the_centralized_sources():
    overrides, federation = load_scenario([SCENARIO])
    rc = {**default_run_config(), **overrides}
    assert rc["data-scenario"] == "shifted" and federation["num-supernodes"] == 3
    sites = [simulated_site_data(rc, partition_id=k, num_partitions=3) for k in range(3)]
    assert all(300 <= len(train) <= 400 for train, _ in sites), [len(t) for t, _ in sites]
    assert sum(len(t) + len(h) for t, h in sites) == rc["train-size"]
    site_words = {w for train, _ in sites for caps in train.captions for c in caps for w in tokenize(c)}
    assert set(NEVER) <= site_words

    small = {**rc, "server-eval-size": 20}
    assert server_vocabulary(small) == synthetic_vocabulary("shifted")
    shifted_test = load_embedded("test", 20, scenario="shifted", image_size=32)
    assert server_eval_set(small, image_size=32).image_ids == shifted_test.image_ids
    assert evaluation_data("shifted", "coco", image_size=32, limit=20).image_ids == shifted_test.image_ids
    train, test, vocab = training_data(source="shifted-public", data=[], data_format="coco", train_size=8,
                                       test_size=20, seed=0, image_size=32)
    assert train.image_ids[0] == "pub-shifted-0-0" and test.image_ids == shifted_test.image_ids
    assert vocab == synthetic_vocabulary("shifted")
    from runners.centralized import CentralizedConfig, run_record  # what a run's config.json says it used

    from shared_model.model.config import CaptionerConfig

    record = run_record(CentralizedConfig(source="shifted-public"), train=8, test=20, vocab=len(vocab),
                        noise_multiplier=None, device="cpu", model=CaptionerConfig(vocab_size=len(vocab)))
    assert record["data"]["vocabulary"] == "shifted (synthetic_vocabulary)"


def test_public_pretraining_follows_the_scenario_and_its_cache_key_holds_it(monkeypatch, tmp_path):
    import runners.pretrain as pretrain
    from simulations.pretrained import pretrain_for

    seen = []
    monkeypatch.setattr(pretrain, "cached_pretrain", lambda cfg, cache, log: seen.append(cfg) or (tmp_path, {}))
    defaults = default_run_config()
    pretrain_for(defaults, cache=tmp_path)
    pretrain_for({**defaults, "data-scenario": "shifted"}, cache=tmp_path)
    embedded, shifted = seen
    assert (embedded.source, shifted.source) == ("public", "shifted-public")
    # the embedded job's settings are those it always had (source "public" is the default): same cache
    assert embedded == pretrain.pretrain_config(model=embedded.model, seed=0, test_size=defaults["server-eval-size"])
    assert pretrain.settings_hash(embedded) != pretrain.settings_hash(shifted)
