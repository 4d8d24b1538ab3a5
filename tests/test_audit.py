"""`fedcap audit`: recomputed budgets from real ledgers, tampering, under-reporting, outputs."""

import json
import shutil

import pytest
from conftest import tamper_ledger

from shared_model.privacy import DPSGDEvent, PrivacyLedger, audit, compute_epsilon, find_ledgers, record_hash
from shared_model.runners import main

DELTA = 1e-5
SITE0_EVENT = DPSGDEvent(sample_rate=0.1, noise_multiplier=1.0, steps=10)   # site-0 (prv): run-1 rounds 1-2, run-2 round 1
SITE1_EVENT = DPSGDEvent(sample_rate=0.05, noise_multiplier=1.2, steps=20)  # site-1 (pld): run-1 rounds 1-2


def _append(path, event, *, run_id="run-1", server_round=1, fingerprint="fp-a", accountant="prv",
            target_epsilon=10.0):
    return PrivacyLedger(path).append(run_id=run_id, server_round=server_round, dataset_fingerprint=fingerprint,
                                      event=event, max_grad_norm=1.0, target_epsilon=target_epsilon,
                                      target_delta=DELTA, accountant=accountant)


@pytest.fixture(scope="module")
def run_template(tmp_path_factory):
    """A simulation run folder: sites/site-0 (prv, two runs) and sites/site-1 (pld)."""
    run = tmp_path_factory.mktemp("runs") / "run-1"
    for run_id, rnd in (("run-1", 1), ("run-1", 2), ("run-2", 1)):
        _append(run / "sites/site-0/ledger.jsonl", SITE0_EVENT, run_id=run_id, server_round=rnd)
    for rnd in (1, 2):
        _append(run / "sites/site-1/ledger.jsonl", SITE1_EVENT, server_round=rnd, fingerprint="fp-b", accountant="pld")
    return run


@pytest.fixture
def run_dir(run_template, tmp_path):
    return shutil.copytree(run_template, tmp_path / "run-1")


@pytest.fixture
def state_dir(tmp_path):
    """A deployed site's state dir (rdp): two datasets, the budget of one changes between records."""
    path = tmp_path / "hospital-a" / "ledger.jsonl"
    _append(path, DPSGDEvent(sample_rate=0.05, noise_multiplier=1.0, steps=20), fingerprint="fp-a", accountant="rdp")
    _append(path, DPSGDEvent(sample_rate=0.02, noise_multiplier=1.3, steps=50), fingerprint="fp-b", accountant="rdp")
    _append(path, DPSGDEvent(sample_rate=0.05, noise_multiplier=1.0, steps=20), fingerprint="fp-a", accountant="rdp", run_id="run-2", target_epsilon=12.0)
    return path.parent


def _row(out, site):
    return next(line for line in out.splitlines() if line.startswith(site + " "))


def test_recomputed_epsilons_match_the_ledger_and_the_library(run_dir, capsys):
    result = audit([run_dir])
    assert [s.site for s in result.sites] == ["site-0", "site-1"] and result.findings == []
    for site, event, n in ((result.sites[0], SITE0_EVENT, 3), (result.sites[1], SITE1_EVENT, 2)):
        (d,) = site.datasets
        records = PrivacyLedger(site.path).records()
        assert d.rounds == n and d.status == "ok"
        for a in ("prv", "rdp", "pld"):
            assert d.epsilon[a] == pytest.approx(compute_epsilon([event] * n, target_delta=DELTA, accountant=a),
                                                 rel=1e-9)
        assert d.epsilon[d.accountant] == pytest.approx(records[-1]["epsilon"], rel=1e-9) == d.spent_epsilon
        assert [c.recomputed_epsilon for c in d.records] == pytest.approx([r["epsilon"] for r in records], rel=1e-9)
        assert d.epsilon["prv"] == pytest.approx(d.epsilon["pld"], rel=0.02)
        assert d.epsilon["rdp"] >= max(d.epsilon["prv"], d.epsilon["pld"])
        assert d.remaining == pytest.approx(10.0 - d.spent_epsilon)
    assert result.sites[0].datasets[0].run_ids == ["run-1", "run-2"]

    assert main(["audit", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "eps prv" in out and "no findings" in out and _row(out, "site-1").split()[-1] == "ok"


def test_datasets_of_one_ledger_are_audited_separately(state_dir, capsys):
    result = audit([state_dir], accountants=["rdp"])
    (site,) = result.sites
    assert site.site == "hospital-a"
    a, b = site.datasets
    assert (a.dataset_fingerprint, a.rounds, a.run_ids, b.dataset_fingerprint, b.rounds) == (
        "fp-a", 2, ["run-1", "run-2"], "fp-b", 1)
    assert a.epsilon["rdp"] == pytest.approx(compute_epsilon([DPSGDEvent(sample_rate=0.05, noise_multiplier=1.0, steps=20)] * 2, target_delta=DELTA,
                                                             accountant="rdp"), rel=1e-9)
    assert b.epsilon["rdp"] == pytest.approx(PrivacyLedger(state_dir / "ledger.jsonl").records()[1]["epsilon"])
    assert a.target_epsilon == 12.0 and a.remaining == pytest.approx(12.0 - a.spent_epsilon)
    # a budget that changes within one dataset is a warning: exit 0, 1 only with --strict
    assert [(f.kind, f.severity, f.dataset_fingerprint) for f in result.findings] == [
        ("inconsistent-budget", "warning", "fp-a")]
    assert main(["audit", str(state_dir / "ledger.jsonl"), "--accountants", "rdp"]) == 0
    assert main(["audit", str(state_dir), "--accountants", "rdp", "--strict"]) == 1
    assert "WARNING [inconsistent-budget]" in capsys.readouterr().out


@pytest.mark.parametrize("tamper,message", [("edit", "line 2: hash mismatch"),
                                            ("delete", "line 2: prev_hash does not match"),
                                            ("reorder", "line 2: prev_hash does not match"),
                                            ("torn", "line 3: not valid JSON")])
def test_a_tampered_ledger_fails_its_site_only(run_dir, capsys, tamper, message):
    path = run_dir / "sites/site-0/ledger.jsonl"
    tamper_ledger(path, tamper)
    assert main(["audit", str(run_dir)]) == 2
    out = capsys.readouterr().out
    assert f"ERROR [malformed-ledger] site-0: ledger {path} {message}" in out
    assert _row(out, "site-0").split()[-1] == "ERROR" and _row(out, "site-1").split()[-1] == "ok"


def test_a_consistently_rewritten_chain_is_still_caught_under_reporting(run_dir, capsys):
    path = run_dir / "sites/site-0/ledger.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[1]["epsilon"] *= 0.9
    for i in (1, 2):  # the attacker rewrites the chain from the edited record on
        records[i]["prev_hash"] = records[i - 1]["hash"]
        records[i]["hash"] = record_hash(records[i])
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    assert len(PrivacyLedger(path).records()) == 3  # the chain verifies
    assert main(["audit", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "FAILURE [under-reported] site-0 fp-a: line 2: recorded epsilon" in out
    assert _row(out, "site-0").split()[-1] == "FAILURE" and _row(out, "site-1").split()[-1] == "ok"


def test_budget_exceeded_is_a_failure(tmp_path, capsys):
    path = tmp_path / "site-9" / "ledger.jsonl"
    record = _append(path, SITE0_EVENT, accountant="rdp", target_epsilon=1.0)
    assert record["epsilon"] > 1.0  # append records; refusing to train is the site's check_budget
    assert main(["audit", str(tmp_path), "--accountants", "rdp"]) == 1
    out = capsys.readouterr().out
    assert "FAILURE [budget-exceeded] site-9 fp-a" in out and "> target_epsilon 1" in out


def test_accountant_disagreement_is_a_warning_unless_strict(run_dir, capsys):
    # prv and pld differ by ~0.3% here: a tolerance below that must warn
    assert main(["audit", str(run_dir), "--tolerance", "1e-5"]) == 0
    assert "WARNING [accountant-disagreement] site-0 fp-a: prv" in capsys.readouterr().out
    assert main(["audit", str(run_dir), "--tolerance", "1e-5", "--strict"]) == 1


def test_report_and_json_outputs(run_dir, tmp_path, capsys):
    report = tmp_path / "report"
    assert main(["audit", str(run_dir), "--report", str(report), "--json", "-"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # stdout holds only the JSON; the table went to stderr
    assert "site-0" in captured.err
    assert {"format", "status", "exit_code", "accountants", "tolerance", "sites", "findings"} <= result.keys()
    assert (result["status"], result["exit_code"], result["accountants"]) == ("ok", 0, ["prv", "rdp", "pld"])
    dataset = result["sites"][0]["datasets"][0]
    assert {"epsilon", "spent_epsilon", "remaining", "target_epsilon", "target_delta", "run_ids"} <= dataset.keys()
    assert [(r["recorded_epsilon"], r["recomputed_epsilon"]) for r in dataset["records"]] == [
        pytest.approx((r["epsilon"], r["epsilon"]), rel=1e-9)
        for r in PrivacyLedger(run_dir / "sites/site-0/ledger.jsonl").records()]
    md = (report / "audit.md").read_text()
    assert "| site-0 | fp-a |" in md and "## Findings" in md and "## site-1" in md and "epsilon.png" in md
    assert (report / "epsilon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json_file = tmp_path / "new-folder" / "audit.json"  # a folder that does not exist yet
    assert main(["audit", str(run_dir), "--json", str(json_file)]) == 0
    assert json.loads(json_file.read_text())["sites"] == result["sites"]


def test_golden_multi_event_composition(tmp_path):
    events = [DPSGDEvent(sample_rate=0.02, noise_multiplier=1.1, steps=300), DPSGDEvent(sample_rate=0.05, noise_multiplier=0.9, steps=100)]
    for rnd, event in enumerate(events, 1):
        _append(tmp_path / "site-0" / "ledger.jsonl", event, server_round=rnd, accountant="rdp")
    (d,) = audit([tmp_path / "site-0"]).sites[0].datasets
    # computed once with Opacus 1.6 (prv, rdp) and dp-accounting 0.6 (pld) at delta 1e-5
    assert d.epsilon == pytest.approx({"prv": 4.72431, "rdp": 5.40570, "pld": 4.71397}, rel=1e-3)
    assert d.epsilon["prv"] == pytest.approx(d.epsilon["pld"], rel=0.02)
    assert d.epsilon["rdp"] >= max(d.epsilon["prv"], d.epsilon["pld"])


def test_site_names_in_a_federation_of_state_dirs(run_dir, state_dir, tmp_path):
    other = shutil.copytree(run_dir / "sites/site-1", tmp_path / "elsewhere" / "hospital-a")
    sites = find_ledgers([state_dir, other, run_dir / "sites/site-0"])
    assert [name for name, _ in sites] == [str(state_dir.resolve()), str(other.resolve()), "site-0"]


@pytest.mark.parametrize("args,message", [(["{missing}"], "no such file or folder: {missing}"),
                                          (["{empty}"], "no ledger found under {empty}"),
                                          (["{empty}", "--accountants", "prv,gdp"], "got ['prv', 'gdp']"),
                                          (["{empty}", "--tolerance", "-1"], "tolerance must be in [0, 1), got -1.0")])
def test_bad_paths_and_arguments_exit_2(tmp_path, capsys, args, message):
    names = {"missing": tmp_path / "nope", "empty": tmp_path}
    assert main(["audit", *(a.format(**names) for a in args)]) == 2
    assert message.format(**names) in capsys.readouterr().err
