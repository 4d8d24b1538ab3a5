"""Accounting over DP-SGD events and the site ledger (real accountants, real files)."""

import json
import os

import pytest
from conftest import tamper_ledger

from shared_model.data import generate_scenes
from shared_model.privacy import (ACCOUNTANTS, BudgetExhaustedError, DPSGDEvent, LedgerError, PrivacyLedger,
                                  compute_epsilon)

DELTA = 1e-5


@pytest.mark.parametrize("accountant,expected", [("prv", 1.8384), ("rdp", 2.1014), ("pld", 1.8282),
                                                 ("dp-rdp", 2.1014)])
def test_golden_epsilons(accountant, expected):
    # q = 0.01, sigma = 1.0, 1000 steps, delta 1e-5: values cross-checked between Opacus and dp_accounting
    eps = compute_epsilon([DPSGDEvent(sample_rate=0.01, noise_multiplier=1.0, steps=1000)], target_delta=DELTA, accountant=accountant)
    assert eps == pytest.approx(expected, abs=2e-4)


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
def test_accountant_contract(accountant):
    assert compute_epsilon([], target_delta=DELTA, accountant=accountant) == 0.0
    one = compute_epsilon([DPSGDEvent(sample_rate=0.05, noise_multiplier=1.1, steps=60)], target_delta=DELTA, accountant=accountant)
    split = compute_epsilon([DPSGDEvent(sample_rate=0.05, noise_multiplier=1.1, steps=20)] * 3, target_delta=DELTA, accountant=accountant)
    assert split == pytest.approx(one, rel=1e-6)
    assert compute_epsilon([DPSGDEvent(sample_rate=0.05, noise_multiplier=1.1, steps=61)], target_delta=DELTA, accountant=accountant) > one


def test_tight_accountants_agree_and_rdp_is_an_upper_bound():
    events = [DPSGDEvent(sample_rate=0.064, noise_multiplier=0.9, steps=16), DPSGDEvent(sample_rate=0.02, noise_multiplier=1.3, steps=50)]
    eps = {a: compute_epsilon(events, target_delta=DELTA, accountant=a) for a in ACCOUNTANTS}
    assert eps["prv"] == pytest.approx(eps["pld"], rel=0.02)
    assert eps["rdp"] >= eps["prv"] and eps["dp-rdp"] == pytest.approx(eps["rdp"], rel=1e-3)


@pytest.mark.parametrize("bad,match", [(dict(sample_rate=0.0), "sample_rate must be in"),
                                       (dict(noise_multiplier=-1.0), "noise_multiplier must be"),
                                       (dict(steps=1.5), "steps must be an int")])
def test_bad_events_are_refused(bad, match):
    args = dict(sample_rate=0.1, noise_multiplier=1.0, steps=10) | bad
    with pytest.raises(ValueError, match=match):
        DPSGDEvent(**args)
    with pytest.raises(ValueError, match="accountant must be one of"):
        compute_epsilon([], target_delta=DELTA, accountant="gdp")


def _append(ledger, fingerprint="fp-a", run_id="run-1", server_round=1, steps=20):
    return ledger.append(run_id=run_id, server_round=server_round, dataset_fingerprint=fingerprint,
                         event=DPSGDEvent(sample_rate=0.05, noise_multiplier=1.0, steps=steps), max_grad_norm=1.0, target_epsilon=10.0,
                         target_delta=DELTA)


def test_ledger_accumulates_across_rounds_runs_and_restarts(tmp_path):
    path = tmp_path / "site" / "ledger.jsonl"
    first = _append(PrivacyLedger(path), server_round=1)
    _append(PrivacyLedger(path), fingerprint="fp-other")  # another dataset: does not count
    second = _append(PrivacyLedger(path), run_id="run-2", server_round=1)  # a new run, a new process
    assert second["epsilon"] > first["epsilon"]
    expected = compute_epsilon([DPSGDEvent(sample_rate=0.05, noise_multiplier=1.0, steps=20)] * 2, target_delta=DELTA)
    assert second["epsilon"] == pytest.approx(expected)
    assert PrivacyLedger(path).spent_epsilon("fp-a", target_delta=DELTA) == pytest.approx(expected)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["run_id"] for r in lines] == ["run-1", "run-1", "run-2"]
    assert lines[1]["prev_hash"] == lines[0]["hash"]


def test_budget_is_checked_before_training(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    planned = DPSGDEvent(sample_rate=0.05, noise_multiplier=1.0, steps=20)
    one = ledger.check_budget("fp", planned, target_epsilon=10.0, target_delta=DELTA)
    _append(ledger, fingerprint="fp")
    with pytest.raises(BudgetExhaustedError, match="budget exhausted") as info:
        ledger.check_budget("fp", planned, target_epsilon=one * 1.05, target_delta=DELTA)
    assert info.value.spent == pytest.approx(one) and info.value.projected > one * 1.05


@pytest.mark.parametrize("tamper", ["edit", "delete", "reorder", "torn", "garbage"])
def test_tampering_is_detected(tmp_path, tamper):
    path = tmp_path / "ledger.jsonl"
    for r in range(1, 4):
        _append(PrivacyLedger(path), server_round=r)
    tamper_ledger(path, tamper)
    with pytest.raises(LedgerError, match="ledger.jsonl line"):
        PrivacyLedger(path).records()


def test_a_failed_write_leaves_the_ledger_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "ledger.jsonl"
    _append(PrivacyLedger(path))
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        _append(PrivacyLedger(path), server_round=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ledger")] == []


def test_dataset_fingerprint_is_stable_and_sensitive():
    a, b = generate_scenes(20, seed=3), generate_scenes(20, seed=3)
    assert a.fingerprint() == b.fingerprint()
    assert a.subset(range(19)).fingerprint() != a.fingerprint()
    b.images[0, 0, 0, 0] ^= 1
    assert b.fingerprint() != a.fingerprint()
