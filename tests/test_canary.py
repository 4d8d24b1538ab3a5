"""The one-run canary audit: the Steinke-Nasr-Jagielski bound, canaries at one site, scoring and the
audit of a run folder (a fabricated one: the real Flower runs are in docs/empirical-audit.md)."""

import json
import math

import numpy as np
import pytest
import torch

from client.site_data import simulated_site_data
from conftest import record_round, tiny_config
from shared_model.data.datasets import encode_captions, image_tensor
from shared_model.data.synthetic import load_embedded, synthetic_vocabulary
from shared_model.evaluation.canaries import (CAPTION_WORDS, canary_scores, draw_membership, included_canaries,
    make_canaries)
from shared_model.model.captioner import Captioner, caption_loss
from shared_model.model.checkpoint import save_checkpoint
from shared_model.privacy.accounting import DPSGDEvent, compute_epsilon
from shared_model.audit.canary_bound import correct_guesses, epsilon_lower_bound, guess_counts, one_run_audit, p_value
from runners.flower_runtime import default_run_config
from simulations.canary_audit import audit_run, main

ALPHA = 0.05


def logit(p):
    return math.log(p / (1 - p))


# ---- the bound -----------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [10, 100, 1000])
def test_all_correct_pure_dp_bound_is_the_binomial_closed_form(r):
    # q^r <= alpha  <=>  epsilon <= logit(alpha^(1/r))
    assert epsilon_lower_bound(m=r, r=r, v=r, delta=0.0) == pytest.approx(logit(ALPHA ** (1 / r)), abs=1e-5)


def test_bound_by_hand():
    # r = 100 guesses, all correct: alpha^(1/100) = exp(ln(0.05)/100) = 0.970487, logit = ln(32.883) = 3.4930
    assert epsilon_lower_bound(m=100, r=100, v=100, delta=0.0) == pytest.approx(3.4930, abs=1e-3)
    # and nothing with at most 100 guesses about 100 canaries can exceed it, whatever delta
    for r, v in [(100, 99), (50, 50), (100, 80), (10, 10)]:
        for delta in (0.0, 1e-5, 1e-3):
            assert epsilon_lower_bound(m=100, r=r, v=v, delta=delta) <= 3.4930 + 1e-4


def test_p_value_at_epsilon_zero_is_a_fair_coin_tail():
    assert p_value(m=10, r=10, v=10, epsilon=0.0, delta=0.0) == pytest.approx(2.0 ** -10)
    assert p_value(m=10, r=10, v=0, epsilon=3.0, delta=0.0) == 1.0


def test_random_guesses_give_about_zero():
    rng = np.random.default_rng(0)
    bounds = []
    for _ in range(20):
        truth, guesses = rng.random(1000) < 0.5, rng.random(1000) < 0.5
        bounds.append(epsilon_lower_bound(m=1000, r=1000, v=int((truth == guesses).sum()), delta=1e-5))
    assert max(bounds) < 0.3 and sum(b > 0 for b in bounds) <= 4  # a 95% bound is positive ~5% of the time


def test_bound_is_monotone_in_correct_guesses():
    for delta in (0.0, 1e-5):
        bounds = [epsilon_lower_bound(m=500, r=200, v=v, delta=delta) for v in range(90, 201, 5)]
        assert all(b2 >= b1 for b1, b2 in zip(bounds, bounds[1:]))
        assert bounds[0] == 0.0 and bounds[-1] > 3.5


def test_delta_lowers_the_bound():
    for m, r, v in [(1000, 1000, 1000), (500, 200, 180), (200, 50, 50)]:
        pure = epsilon_lower_bound(m=m, r=r, v=v, delta=0.0)
        assert epsilon_lower_bound(m=m, r=r, v=v, delta=1e-5) < pure
        assert epsilon_lower_bound(m=m, r=r, v=v, delta=1e-3) < epsilon_lower_bound(m=m, r=r, v=v, delta=1e-5)


def test_the_bound_is_valid_for_randomized_response():
    # epsilon-DP randomized response of each coin, the guess = the answer: the 95% lower bound may
    # exceed the true epsilon in at most ~5% of runs
    rng = np.random.default_rng(1)
    eps, m = 1.0, 200
    q = math.exp(eps) / (1 + math.exp(eps))
    over = sum(epsilon_lower_bound(m=m, r=m, v=int(rng.binomial(m, q)), delta=0.0) > eps for _ in range(300))
    assert over <= 0.05 * 300 + 8


def test_argument_errors_name_the_value():
    with pytest.raises(ValueError, match="v=5, r=4"):
        epsilon_lower_bound(m=10, r=4, v=5, delta=0.0)
    with pytest.raises(ValueError, match="-0.1"):
        p_value(m=10, r=4, v=2, epsilon=1.0, delta=-0.1)


# ---- guesses -------------------------------------------------------------------------------------

def test_correct_guesses_counts_both_ends():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    included = np.array([True, False, True, False, False, True])
    assert correct_guesses(scores, included, k_plus=2, k_minus=0) == 1
    assert correct_guesses(scores, included, k_plus=1, k_minus=2) == 2  # 0.1 in (right); 0.5 out (right), 0.6 (wrong)
    assert guess_counts(500) == [(25, 25), (50, 50), (75, 75), (125, 125), (188, 187), (250, 250)]


def test_audit_of_perfect_scores_and_bonferroni():
    included = draw_membership(400, seed=3)
    n_in = int(included.sum())
    scores = np.where(included, 1.0, 5.0)
    result = one_run_audit(scores, included, delta=1e-5)
    k = len(result.tried)
    for g in result.tried:  # perfect separation: wrong only where a side asks for more than it holds
        assert g.correct == min(g.k_plus, n_in) + min(g.k_minus, 400 - n_in)
        assert g.epsilon_lower_bound == pytest.approx(epsilon_lower_bound(m=400, r=g.guesses, v=g.correct,
                                                                          delta=1e-5, alpha=ALPHA / k))
    assert result.epsilon_lower_bound == max(g.epsilon_lower_bound for g in result.tried) > 3
    single = one_run_audit(scores, included, delta=1e-5, pairs=[(result.best.k_plus, result.best.k_minus)])
    assert single.epsilon_lower_bound > result.epsilon_lower_bound  # one test: no correction


# ---- canaries at a site --------------------------------------------------------------------------

def test_canaries_are_deterministic_and_distinct():
    a, b = make_canaries(30, seed=5, image_size=32), make_canaries(30, seed=5, image_size=32)
    assert np.array_equal(a.images, b.images) and a.captions == b.captions and a.image_ids == b.image_ids
    other = make_canaries(30, seed=6, image_size=32)
    assert not np.array_equal(a.images, other.images) and a.captions != other.captions
    assert np.array_equal(draw_membership(30, seed=5), draw_membership(30, seed=5))
    coins = draw_membership(2000, seed=0)
    assert 900 < coins.sum() < 1100
    vocab = synthetic_vocabulary()
    for (caption,) in a.captions:
        ids = vocab.encode(caption)
        assert len(ids) == CAPTION_WORDS + 2 and vocab.unk_id not in ids
    assert len(set(a.captions)) == 30
    scenes = load_embedded("train", 30, image_size=32)
    assert a.images.mean() > 2 * scenes.images.mean()  # bright colour blocks, not dark scenes


def run_config(**kw):
    return {**default_run_config(), "train-size": 120, "image-size": 32, "partitioner": "iid", **kw}


def test_site_data_holds_exactly_the_included_canaries_at_the_canary_site():
    m, seed = 40, 7
    rc = run_config(**{"canary-count": m, "canary-seed": seed, "canary-site": 1})
    expected = included_canaries(m, seed=seed, image_size=32)
    assert 0 < len(expected) < m
    for site in range(3):
        plain_train, plain_held = simulated_site_data(run_config(), partition_id=site, num_partitions=3)
        train, held = simulated_site_data(rc, partition_id=site, num_partitions=3)
        assert held.image_ids == plain_held.image_ids and not any(i.startswith("canary") for i in held.image_ids)
        canary_ids = [i for i in train.image_ids if i.startswith("canary")]
        if site == 1:
            assert canary_ids == expected.image_ids and train.image_ids[: len(plain_train)] == plain_train.image_ids
            assert np.array_equal(train.images[len(plain_train):], expected.images)
            assert train.record_ids() != plain_train.record_ids()
        else:
            assert canary_ids == [] and train.record_ids() == plain_train.record_ids()
    eval_set = load_embedded("test", 50, image_size=32)
    assert not set(eval_set.image_ids) & set(make_canaries(m, seed=seed, image_size=32).image_ids)
    with pytest.raises(ValueError, match="canary-site must be in \\[0, 3\\), got 3"):
        simulated_site_data(run_config(**{"canary-count": 5, "canary-site": 3}), partition_id=0, num_partitions=3)


# ---- scoring a real model ------------------------------------------------------------------------

def tiny_model():
    torch.manual_seed(0)
    return Captioner(tiny_config(vocab_size=len(synthetic_vocabulary()), max_len=12))


def memorize(model, canaries, steps=60):
    vocab = synthetic_vocabulary()
    ids, _ = encode_captions(canaries.captions, vocab, max_len=model.config.max_len)
    images, captions = image_tensor(canaries.images), ids[:, 0]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(images, captions)[1].backward()
        opt.step()
    return model.eval()


def test_scores_are_per_caption_losses_and_members_score_lower_after_training():
    vocab = synthetic_vocabulary()
    canaries = make_canaries(16, seed=2, image_size=32)
    included = draw_membership(16, seed=2)
    model = tiny_model().eval()
    scores = canary_scores(model, canaries, vocab, batch_size=5)
    ids, _ = encode_captions(canaries.captions[:3], vocab, max_len=12)
    with torch.no_grad():
        logits, _ = model(image_tensor(canaries.images[:3]), ids[:, 0])
        expected = caption_loss(logits, ids[:, 0, 1:], reduction="none").numpy()
    assert scores.shape == (16,) and np.allclose(scores[:3], expected, atol=1e-5)
    memorize(model, canaries.subset(np.flatnonzero(included)))
    scores = canary_scores(model, canaries, vocab)
    assert scores[included].max() < scores[~included].min()
    assert correct_guesses(scores, included, k_plus=int(included.sum()), k_minus=int((~included).sum())) == 16


# ---- auditing a run folder -----------------------------------------------------------------------

def fake_run(tmp_path, *, memorized: bool, noise_multiplier: float):
    """A run folder as the ServerApp and sites leave it: run_config.json, a final checkpoint, and the
    canary site's ledger for the dataset holding its canaries."""
    m, seed = 24, 4
    overrides = {"train-size": 60, "image-size": 32, "partitioner": "iid", "model-max-len": 12,
                 "canary-count": m, "canary-seed": seed, "canary-site": 0}
    run_dir = tmp_path / "run-1"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "scenario.json").write_text(json.dumps({"scenarios": [], "run-config": overrides,
                                                       "federation": {"num-supernodes": 2}}))
    (run_dir / "run_config.json").write_text(json.dumps(run_config(**overrides)))
    model = tiny_model()
    if memorized:
        memorize(model, included_canaries(m, seed=seed, image_size=32))
    save_checkpoint(run_dir / "checkpoints" / "round-0001", model, synthetic_vocabulary())
    (run_dir / "checkpoints" / "LATEST").write_text("round-0001\n")
    train, _ = simulated_site_data(run_config(**overrides), partition_id=0, num_partitions=2)
    event = DPSGDEvent(sample_rate=0.5, noise_multiplier=noise_multiplier, steps=4)
    record_round(run_dir / "sites" / "site-0" / "ledger.jsonl", event, train.record_ids(), run_id="1",
                 accountant="rdp", target_epsilon=100.0)
    return run_dir, compute_epsilon([event], target_delta=1e-5, accountant="rdp")


def test_the_bound_follows_the_model_and_an_honest_ledger_stays_above_it(tmp_path):
    # the same honest ledger (noise 1.0: epsilon ~7.4) beside an untrained model and beside one that
    # memorized its included canaries: the bound comes from the model's scores, so only the second
    # guesses every canary and gets a clearly positive bound; both stay within the ledger's epsilon
    untrained_dir, eps = fake_run(tmp_path / "untrained", memorized=False, noise_multiplier=1.0)
    memorized_dir, _ = fake_run(tmp_path / "memorized", memorized=True, noise_multiplier=1.0)
    untrained, memorized = audit_run(untrained_dir), audit_run(memorized_dir)
    for report in (untrained, memorized):
        assert report["theoretical_epsilon"] == pytest.approx(eps) and report["delta"] == 1e-5 and report["m"] == 24
        assert report["epsilon_lower_bound"] <= eps and report["verdict"].startswith("consistent")
    assert memorized["correct"] == memorized["guesses"] >= 12  # every guess right, at least half the canaries
    assert untrained["epsilon_lower_bound"] < 0.5 < 0.9 < memorized["epsilon_lower_bound"]  # ~0 and ~1.2 here


def test_a_bound_above_the_ledger_epsilon_is_a_failure(tmp_path, capsys):
    # a model that memorized its canaries, but a ledger claiming almost no privacy loss
    run_dir, eps = fake_run(tmp_path, memorized=True, noise_multiplier=50.0)
    assert eps < 0.5
    assert main(["--audit-only", str(run_dir)]) == 1
    report = json.loads((run_dir / "canary_audit.json").read_text())
    assert report["epsilon_lower_bound"] > eps and report["verdict"].startswith("FAILURE")
    assert report["correct"] == report["guesses"]
    assert "FAILURE" in capsys.readouterr().out


def test_pyproject_turns_canaries_off_by_default():
    config = run_config()
    assert config["canary-count"] == 0 and config["canary-site"] == 0 and config["canary-seed"] == 0


def test_the_generated_split_kept_between_messages_is_never_changed_by_a_site():
    """client.site_data keeps the generated training split in the process (a simulation actor serves
    many sites); building a site with feature skew and canaries must leave it as generated."""
    from client.site_data import _embedded_train

    rc = run_config(**{"canary-count": 10, "canary-site": 0, "feature-skew": True})
    first = [simulated_site_data(rc, partition_id=k, num_partitions=3) for k in range(3)]
    kept = _embedded_train(120, int(rc["seed"]), 32, rc["data-scenario"])
    fresh = load_embedded("train", 120, seed=int(rc["seed"]), image_size=32)
    assert np.array_equal(kept.images, fresh.images) and kept.captions == fresh.captions
    assert kept.image_ids == fresh.image_ids
    again = [simulated_site_data(rc, partition_id=k, num_partitions=3) for k in range(3)]
    for (train, held), (train2, held2) in zip(first, again):
        assert train.image_ids == train2.image_ids and held.image_ids == held2.image_ids
        assert np.array_equal(train.images, train2.images)
