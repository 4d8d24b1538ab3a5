"""Accounting over DP-SGD events and the site ledger (real accountants, real files)."""

import json
import os

import pytest
from conftest import record_round, tamper_ledger

from shared_model.data.synthetic import generate_scenes
from shared_model.privacy.accounting import ACCOUNTANTS, DPSGDEvent, compute_epsilon
from shared_model.privacy.history import build_histories
from shared_model.privacy.ledger import PrivacyLedger
from shared_model.privacy.ledger_lines import LedgerError, record_hash
from shared_model.privacy.membership import MembershipError, MembershipStore

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


EVENT = DPSGDEvent(sample_rate=0.05, noise_multiplier=1.0, steps=20)
RECORDS = [f"r{i}" for i in range(20)]


def test_ledger_accumulates_per_record_across_rounds_runs_and_restarts(tmp_path):
    path = tmp_path / "site" / "ledger.jsonl"
    first = record_round(path, EVENT, RECORDS, server_round=1)
    other = record_round(path, EVENT, ["new-1", "new-2"], server_round=2)  # other records: theirs only
    second = record_round(path, EVENT, RECORDS, run_id="run-2", server_round=1)  # a new run, a new process
    expected = compute_epsilon([EVENT] * 2, target_delta=DELTA, accountant="prv")
    assert second["epsilon"] == pytest.approx(expected) and second["epsilon"] > first["epsilon"]
    assert other["epsilon"] == pytest.approx(first["epsilon"])
    ledger = PrivacyLedger(path)
    histories, _ = build_histories(ledger.records(), ledger.membership)
    by_group = histories.groups_of([*RECORDS, "new-1", "never"])
    assert {len(v) for v in by_group.values()} == {20, 1} and by_group[-1] == ["never"]
    assert histories.epsilon(histories.group_of["r0"], target_delta=DELTA, accountant="prv") == pytest.approx(expected)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["run_id"] for r in lines] == ["run-1", "run-1", "run-2"]
    assert lines[1]["prev_hash"] == lines[0]["hash"] and lines[0]["membership"] == lines[2]["membership"]
    assert len(list((path.parent / "membership").glob("*.json"))) == 2  # each distinct set stored once


def test_membership_files_are_deltas_and_self_verifying(tmp_path):
    store = MembershipStore(tmp_path / "membership")
    big = [f"id-{i:05d}" for i in range(5000)]
    v1 = store.put(big)
    v2 = store.put([*big, "id-new"], base=v1)
    v3 = store.put(big[1:], base=v2)
    doc2 = json.loads(store.path(v2).read_text())
    assert (doc2["base"], doc2["added"], doc2["removed"]) == (v1, ["id-new"], [])
    assert store.path(v2).stat().st_size < store.path(v1).stat().st_size / 100  # a few records, a few bytes
    assert MembershipStore(tmp_path / "membership").load(v3) == frozenset(big[1:])
    doc2["added"] = ["id-evil"]
    store.path(v2).write_text(json.dumps(doc2))
    with pytest.raises(MembershipError, match="does not rebuild to its version"):
        MembershipStore(tmp_path / "membership").load(v3)


def test_record_ids_follow_content_not_names_or_decoding_size():
    a = generate_scenes(5, seed=3)
    b = generate_scenes(5, seed=3)
    b.image_ids = [f"renamed-{i}" for i in range(5)]
    assert a.record_ids() == b.record_ids() and len(set(a.record_ids())) == 5
    b.captions[0] = (b.captions[0][0] + " extra",)
    assert b.record_ids()[0] != a.record_ids()[0] and b.record_ids()[1:] == a.record_ids()[1:]
    c = a.subset(range(5))
    c.source_digests = ["f" * 64] * 5  # loaded from files: the file's bytes decide, not the pixels
    c.images = c.images[:, :8, :8].copy()
    assert c.record_ids()[0] != a.record_ids()[0]
    assert c.subset([0]).record_ids() == c.record_ids()[:1]


@pytest.mark.parametrize("tamper", ["edit", "delete", "reorder", "torn", "garbage"])
def test_tampering_is_detected(tmp_path, tamper):
    path = tmp_path / "ledger.jsonl"
    for r in range(1, 4):
        record_round(path, EVENT, RECORDS, server_round=r)
    tamper_ledger(path, tamper)
    with pytest.raises(LedgerError, match="ledger.jsonl line"):
        PrivacyLedger(path).records()


def test_a_failed_write_leaves_the_ledger_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "ledger.jsonl"
    record_round(path, EVENT, RECORDS)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        record_round(path, EVENT, RECORDS, server_round=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ledger")] == []




def _v1_ledger(path, events):
    """A fedcap-ledger/1 file as the previous release wrote it (hash-chained, keyed by fingerprint)."""
    prev, lines = "0" * 64, []
    for k, e in enumerate(events, 1):
        r = {"format": "fedcap-ledger/1", "run_id": "old", "server_round": k, "dataset_fingerprint": "fp",
             "sample_rate": e.sample_rate, "noise_multiplier": e.noise_multiplier, "steps": e.steps,
             "max_grad_norm": 1.0, "target_epsilon": 8.0, "target_delta": DELTA, "accountant": "prv",
             "epsilon": compute_epsilon(events[:k], target_delta=DELTA, accountant="prv"), "time": "2026-11-01T00:00:00Z",
             "prev_hash": prev}
        r["hash"] = record_hash(r)
        prev = r["hash"]
        lines.append(json.dumps(r, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def test_an_old_ledger_is_refused_then_migrated_conservatively(tmp_path, capsys):
    from deploy.site_folders import write_coco_folder
    from shared_model.data.loaders import load_dataset_folder
    from shared_model.data.synthetic import load_embedded
    from runners.cli import main

    state, events = tmp_path / "state", [EVENT, EVENT]
    _v1_ledger(state / "ledger.jsonl", events)
    with pytest.raises(LedgerError, match="fedcap ledger migrate"):
        PrivacyLedger(state / "ledger.jsonl").records()
    data_dir = write_coco_folder(load_embedded("train", 12, image_size=32), tmp_path / "data")
    assert main(["ledger", "migrate", str(state), "--data-dir", str(data_dir), "--image-size", "32"]) == 0
    assert "charged to all 12 current records" in capsys.readouterr().out
    ledger = PrivacyLedger(state / "ledger.jsonl")
    histories, _ = build_histories(ledger.records(), ledger.membership)
    ids = load_dataset_folder("coco", data_dir, image_size=32).record_ids()
    assert {histories.group_of[rid] for rid in ids} == {histories.group_of[ids[0]]}  # every record charged
    assert histories.epsilon(histories.group_of[ids[0]], target_delta=DELTA, accountant="prv") == pytest.approx(
        compute_epsilon(events, target_delta=DELTA, accountant="prv"))
    assert (state / "ledger.v1.jsonl").is_file()
    assert main(["ledger", "migrate", str(state), "--data-dir", str(data_dir)]) == 2  # only once
