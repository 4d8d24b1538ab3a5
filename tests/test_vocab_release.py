"""The private vocabulary release: counting, noise, threshold, ledger line, accounting and audit."""

import json
import random
from collections import Counter
from statistics import NormalDist

import pytest

from shared_model.privacy.accounting import compute_epsilon, gaussian_event
from shared_model.privacy.history import build_histories
from shared_model.privacy.ledger import PrivacyLedger
from shared_model.privacy.site_budget import BudgetExhaustedError
from shared_model.audit.ledger_audit import audit
from shared_model.privacy.site_budget import SiteBudget
from shared_model.privacy.vocab_release import (VocabRelease, clipped_counts, merge_releases, noisy_release,
    record_words, release_vocabulary)
from shared_model.privacy.accounting import DPSGDEvent
from shared_model.privacy.site_budget import run_spend

from conftest import record_round

RECORDS = [("a red circle", "a red ball"), ("a red square", "red square here"), ("a blue circle",),
           ("a blue circle", "the zebra")]
IDS = [f"r{i}" for i in range(len(RECORDS))]


def test_each_record_counts_each_word_once_and_at_most_k_words():
    assert clipped_counts(RECORDS, max_words=10) == Counter(
        {"a": 4, "red": 2, "circle": 3, "ball": 1, "square": 1, "here": 1, "blue": 2, "the": 1, "zebra": 1})
    words = record_words(("a red square", "red square here"), max_words=2, rng=random.Random(0))
    assert sorted(words) == ["red", "square"]  # in both captions: before "a" and "here"
    two = clipped_counts(RECORDS * 10, max_words=2, seed=3)
    assert sum(two.values()) == 2 * len(RECORDS) * 10 and max(two.values()) <= len(RECORDS) * 10


def test_almost_no_noise_releases_the_exact_clipped_counts_above_one():
    release = VocabRelease(noise_multiplier=1e-9, max_words_per_record=10, threshold_delta=1e-6)
    exact = clipped_counts(RECORDS, max_words=10)
    out = noisy_release(exact, release=release, rng=random.Random(0))
    assert set(out) == {w for w, c in exact.items() if c >= 2}  # count-1 words stay below 1 + ~5e-9
    assert all(abs(out[w] - exact[w]) < 1e-6 for w in out)


def test_threshold_releases_a_single_records_word_with_probability_delta_over_k():
    release = VocabRelease(noise_multiplier=1.0, max_words_per_record=4, threshold_delta=1e-3)
    sigma = release.noise_std
    assert sigma == pytest.approx(2.0)
    assert 1 - NormalDist(1.0, sigma).cdf(release.threshold) == pytest.approx(1e-3 / 4, rel=1e-6)
    rng = random.Random(0)
    released = sum("rare" in noisy_release(Counter({"rare": 1, "common": 200}), release=release, rng=rng)
                   for _ in range(4000))
    assert released <= 5  # expected 1
    assert all("common" in noisy_release(Counter({"common": 200}), release=release, rng=rng) for _ in range(50))


def test_a_gaussian_release_is_dp_accountings_gaussian_event():
    import dp_accounting
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
    from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

    event = gaussian_event(noise_multiplier=2.0)
    for name, acc in (("pld", PLDAccountant()), ("dp-rdp", RdpAccountant())):
        acc.compose(dp_accounting.GaussianDpEvent(2.0))
        assert compute_epsilon([event], target_delta=1e-5, accountant=name) == pytest.approx(acc.get_epsilon(1e-5))
    rdp = compute_epsilon([event], target_delta=1e-5, accountant="rdp")
    assert rdp == pytest.approx(compute_epsilon([event], target_delta=1e-5, accountant="dp-rdp"), rel=1e-6)
    pld = compute_epsilon([event], target_delta=1e-5, accountant="pld")
    assert compute_epsilon([event], target_delta=1e-5, accountant="prv") == pytest.approx(pld, rel=0.02)


BUDGET = SiteBudget(target_epsilon=10.0, target_delta=1e-5, accountant="rdp")
RELEASE = VocabRelease(noise_multiplier=1.0, max_words_per_record=3, threshold_delta=1e-6)


def test_release_is_written_chained_and_composed_with_dp_sgd(tmp_path):
    many = RECORDS * 50
    ids = [f"r{i}" for i in range(len(many))]
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    with ledger.transaction() as tx:
        released, line = release_vocabulary(tx=tx, record_ids=ids, captions=many, budget=BUDGET, release=RELEASE,
                                            run_id="7", seed=0)
    assert {"a", "circle", "red", "blue"} <= set(released) and "zebra" in released  # 50 records each
    # delta composes: the accountant converts at target-delta minus the release's thresholding delta
    alone = compute_epsilon([RELEASE.event()], target_delta=1e-5 - 1e-6, accountant=BUDGET.enforcing)
    assert line["kind"] == "vocab-gaussian" and line["records_counted"] == len(ids) and line["epsilon"] == alone
    assert line["threshold"] == pytest.approx(RELEASE.threshold) and line["words_released"] == len(released)
    sgd = DPSGDEvent(sample_rate=0.1, noise_multiplier=1.0, steps=20)
    record_round(tmp_path / "ledger.jsonl", sgd, ids[:100], accountant=BUDGET.enforcing)
    lines = ledger.records()  # verifies the chain
    assert [r["kind"] for r in lines] == ["vocab-gaussian", "dp-sgd"] and lines[1]["prev_hash"] == lines[0]["hash"]
    assert lines[1]["epsilon"] == pytest.approx(compute_epsilon([RELEASE.event(), sgd], target_delta=1e-5 - 1e-6,
                                                                accountant=BUDGET.enforcing))

    result = audit([tmp_path], accountants=("rdp", "pld"))
    assert result.status == "ok"
    site = result.sites[0]
    assert [c.kind for c in site.checks] == ["vocab-gaussian", "dp-sgd"] and site.rounds == 1
    assert site.checks[0].recomputed_epsilon == pytest.approx(alone) and site.vocab_releases == 1
    assert site.threshold_delta == 1e-6 and site.spent_epsilon == pytest.approx(lines[1]["epsilon"])

    # an under-reported release is caught: rewrite the line's epsilon (and its hash, as an attacker would)
    from shared_model.privacy.ledger_lines import record_hash

    first = json.loads((tmp_path / "ledger.jsonl").read_text().splitlines()[0])
    first["epsilon"] = alone / 2
    first["hash"] = record_hash(first)
    (tmp_path / "ledger.jsonl").write_text(json.dumps(first, sort_keys=True) + "\n")
    result = audit([tmp_path], accountants=("rdp",))
    assert [f.kind for f in result.findings] == ["under-reported"]


def test_the_site_refuses_a_release_beyond_its_budget(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    cases = [(SiteBudget(target_epsilon=0.5, target_delta=1e-5), RELEASE, "exhausted: only 0 of 4"),
             (BUDGET, VocabRelease(noise_multiplier=1.0, max_words_per_record=3, threshold_delta=1e-4),
              "vocab-delta 0.0001 is not below"),
             (BUDGET, VocabRelease(noise_multiplier=1.0, max_words_per_record=3, threshold_delta=1e-5),
              "vocab-delta 1e-05 is not below"),
             (SiteBudget(target_epsilon=10.0, target_delta=1e-5, max_run_epsilon=1.0), RELEASE, "max-run-epsilon 1:")]
    for budget, release, message in cases:
        with ledger.transaction() as tx, pytest.raises(BudgetExhaustedError, match=message) as err:
            release_vocabulary(tx=tx, record_ids=IDS, captions=RECORDS, budget=budget, release=release, run_id="1")
        assert err.value.ledger_head[1] == 0
    with ledger.transaction() as tx, pytest.raises(BudgetExhaustedError, match="below the run's run-epsilon 2:"):
        release_vocabulary(tx=tx, record_ids=IDS, captions=RECORDS, budget=BUDGET, release=RELEASE, run_id="1",
                           run_epsilon=2.0)
        assert err.value.ledger_head[1] == 0
    assert ledger.records() == []  # nothing written


def test_deltas_compose_and_releases_share_the_runs_allowance(tmp_path):
    """Issue 18 (4, 3): a record's delta is its accounting delta plus every release's thresholding
    delta, never past target-delta; a run's releases together stay below the run's caps."""
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    half = VocabRelease(noise_multiplier=3.0, max_words_per_record=3, threshold_delta=0.5e-5)
    with ledger.transaction() as tx:
        release_vocabulary(tx=tx, record_ids=IDS, captions=RECORDS, budget=BUDGET, release=half, run_id="a", seed=0)
    with ledger.transaction() as tx, pytest.raises(BudgetExhaustedError, match="only 0 of 4 records can be counted"):
        # a second half-delta release would leave the records no conversion delta: all retired
        release_vocabulary(tx=tx, record_ids=IDS, captions=RECORDS, budget=BUDGET, release=half, run_id="b", seed=0)
    histories, _ = build_histories(ledger.records(), ledger.membership)
    assert all(histories.delta_spent(g) == 0.5e-5 for g in histories.live_groups())
    # many cheap releases in one run: refused once the run's spend with the next one reaches run-epsilon
    ledger = PrivacyLedger(tmp_path / "run" / "ledger.jsonl")
    cheap = VocabRelease(noise_multiplier=4.0, max_words_per_record=3, threshold_delta=1e-8)
    done = 0
    with pytest.raises(BudgetExhaustedError, match="not below the run's run-epsilon 2"):
        for _ in range(50):
            with ledger.transaction() as tx:
                release_vocabulary(tx=tx, record_ids=IDS, captions=RECORDS, budget=BUDGET, release=cheap, run_id="r",
                                   run_epsilon=2.0, seed=0)
            done += 1
    spent = run_spend([cheap.event()] * done, accountant=BUDGET.enforcing, target_epsilon=10.0, target_delta=1e-5,
                      extra_delta=done * 1e-8)  # the run's share of the lifetime, as the site counts it
    assert 1 < done < 50 and spent < 2.0


def test_bad_release_settings_name_the_value():
    with pytest.raises(ValueError, match="vocab-noise-multiplier must be a finite number > 0, got 0"):
        VocabRelease(noise_multiplier=0, max_words_per_record=3, threshold_delta=1e-6)
    with pytest.raises(ValueError, match="vocab-max-words-per-record must be an int >= 1, got 0"):
        VocabRelease(noise_multiplier=1.0, max_words_per_record=0, threshold_delta=1e-6)


def test_the_server_merges_releases_by_summed_noisy_count():
    assert merge_releases([{"a": 30.0, "b": 12.0}, {"b": 25.0, "c": 11.0}]) == ["b", "a", "c"]


def test_run_config_private_vocabulary_excludes_other_vocabulary_sources():
    from shared_model.run_settings import default_run_config, validate_run_config

    assert validate_run_config({**default_run_config(), "vocab-source": "private", "vocab-delta": 1e-7})["vocab-source"] == "private"
    with pytest.raises(ValueError, match="excludes init-from '/ckpt'"):
        validate_run_config({**default_run_config(), "vocab-source": "private", "init-from": "/ckpt"})
    with pytest.raises(ValueError, match="needs dp = true, got dp = false"):
        validate_run_config({**default_run_config(), "vocab-source": "private", "dp": False})
    with pytest.raises(ValueError, match="vocab-source must be one of 'server', 'private', got 'sites'"):
        validate_run_config({**default_run_config(), "vocab-source": "sites"})
