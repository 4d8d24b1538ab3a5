"""`fedcap audit`: per-record epsilons recomputed from real ledgers and membership files, tampering,
under-reporting, witnessed heads, outputs, scale."""

import json
import shutil

import pytest
from conftest import record_round, tamper_ledger

from shared_model.privacy.accounting import DPSGDEvent, compute_epsilon
from shared_model.privacy.ledger import PrivacyLedger
from shared_model.privacy.ledger_lines import record_hash
from shared_model.audit.ledger_audit import audit, find_ledgers
from runners.cli import main

DELTA = 1e-5
SITE0_EVENT = DPSGDEvent(sample_rate=0.1, noise_multiplier=1.0, steps=10)   # site-0 (prv): run-1 rounds 1-2, run-2 round 1
SITE1_EVENT = DPSGDEvent(sample_rate=0.05, noise_multiplier=1.2, steps=20)  # site-1 (rdp): run-1 rounds 1-2
OLD, NEW = [f"a{i}" for i in range(10)], [f"b{i}" for i in range(3)]


@pytest.fixture(scope="module")
def run_template(tmp_path_factory):
    """A simulation run folder: sites/site-0 (prv, two runs; 3 records added before the last round)
    and sites/site-1 (rdp)."""
    run = tmp_path_factory.mktemp("runs") / "run-1"
    for run_id, rnd, members in (("run-1", 1, OLD), ("run-1", 2, OLD), ("run-2", 1, OLD + NEW)):
        record_round(run / "sites/site-0/ledger.jsonl", SITE0_EVENT, members, run_id=run_id, server_round=rnd)
    for rnd in (1, 2):
        record_round(run / "sites/site-1/ledger.jsonl", SITE1_EVENT, OLD, server_round=rnd, accountant="rdp")
    return run


@pytest.fixture
def run_dir(run_template, tmp_path):
    return shutil.copytree(run_template, tmp_path / "run-1")


def _row(out, site):
    return next(line for line in out.splitlines() if line.startswith(site + " "))


def test_per_record_epsilons_match_the_ledger_and_the_library(run_dir, capsys):
    result = audit([run_dir])
    assert [s.site for s in result.sites] == ["site-0", "site-1"] and result.findings == []
    s0, s1 = result.sites
    assert (s0.rounds, s0.run_ids, s0.records, s0.records_retired) == (3, ["run-1", "run-2"], 13, 0)
    for site, n in ((s0, 3), (s1, 2)):
        event = SITE0_EVENT if site is s0 else SITE1_EVENT
        for a in ("prv", "rdp", "pld"):  # the most-spent record was in every round
            assert site.epsilon[a] == pytest.approx(compute_epsilon([event] * n, target_delta=DELTA, accountant=a),
                                                    rel=1e-9)
        records = [r for r in PrivacyLedger(site.path).records() if r["kind"] == "dp-sgd"]
        assert [c.recomputed_epsilon for c in site.checks] == pytest.approx([r["epsilon"] for r in records], rel=1e-9)
        assert site.epsilon[site.accountant] == pytest.approx(records[-1]["epsilon"]) == site.spent_epsilon
        assert site.epsilon["rdp"] >= max(site.epsilon["prv"], site.epsilon["pld"])
        assert site.remaining == pytest.approx(10.0 - site.spent_epsilon)
    assert main(["audit", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "eps prv" in out and "no findings" in out and _row(out, "site-1").split()[-1] == "ok"


def test_independent_recomputation_with_dp_accounting_alone(run_dir):
    """The documented format is enough: rebuild each line's membership from the JSON files, compose
    each record's events with dp_accounting (PLD and RDP), compare with the audit's per-record values."""
    import dp_accounting

    folder = run_dir / "sites/site-0"

    def members(version):
        doc = json.loads((folder / "membership" / f"{version}.json").read_text())
        base = members(doc["base"]) if doc["base"] else set()
        return (base - set(doc["removed"])) | set(doc["added"])

    per_record: dict[str, list] = {}
    for line in (folder / "ledger.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] != "dp-sgd":
            continue
        event = (r["sample_rate"], r["noise_multiplier"], r["steps"])
        for rid in members(r["membership"]):
            per_record.setdefault(rid, []).append(event)
    assert len(per_record) == 13 and len(per_record["a0"]) == 3 and len(per_record["b0"]) == 1
    (site,) = [s for s in audit([run_dir], accountants=["pld", "dp-rdp"]).sites if s.site == "site-0"]
    for name, acc in (("pld", dp_accounting.pld.PLDAccountant), ("dp-rdp", dp_accounting.rdp.RdpAccountant)):
        by_history: dict[tuple, float] = {}  # records with the same events have the same epsilon: compose once

        def epsilon(history: tuple) -> float:
            if history not in by_history:
                accountant = acc()
                for q, sigma, steps in history:
                    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
                        q, dp_accounting.GaussianDpEvent(sigma)), steps))
                by_history[history] = accountant.get_epsilon(DELTA)
            return by_history[history]

        eps = {rid: epsilon(tuple(events)) for rid, events in per_record.items()}
        assert max(eps.values()) == pytest.approx(site.epsilon[name], rel=1e-6)
        assert eps["b0"] < eps["a0"]  # the records added later spent less


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


def test_an_altered_membership_file_is_an_error(run_dir, capsys):
    folder = run_dir / "sites/site-0"
    first = json.loads((folder / "ledger.jsonl").read_text().splitlines()[0])
    path = folder / "membership" / f"{first['membership']}.json"
    doc = json.loads(path.read_text())
    doc["added"] = doc["added"][1:]  # hide a record from the first round
    path.write_text(json.dumps(doc))
    assert main(["audit", str(run_dir)]) == 2
    assert "does not rebuild to its version" in capsys.readouterr().out


def test_a_consistently_rewritten_chain_is_still_caught_under_reporting(run_dir, capsys):
    path = run_dir / "sites/site-0/ledger.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[1]["epsilon"] *= 0.9
    for i in (1, 2):  # the attacker rewrites the chain from the edited line on
        records[i]["prev_hash"] = records[i - 1]["hash"]
        records[i]["hash"] = record_hash(records[i])
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    assert len(PrivacyLedger(path).records()) == 3  # the chain verifies
    assert main(["audit", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "FAILURE [under-reported] site-0: line 2: recorded epsilon" in out
    assert _row(out, "site-0").split()[-1] == "FAILURE" and _row(out, "site-1").split()[-1] == "ok"


def test_budget_exceeded_is_a_failure(tmp_path, capsys):
    record = record_round(tmp_path / "site-9" / "ledger.jsonl", SITE0_EVENT, OLD, accountant="rdp",
                          target_epsilon=1.0)
    assert record["epsilon"] > 1.0  # the ledger records; refusing to train is the site's filter
    assert main(["audit", str(tmp_path), "--accountants", "rdp"]) == 1
    out = capsys.readouterr().out
    assert "FAILURE [budget-exceeded] site-9: line 1: a record reached epsilon" in out and "> target_epsilon 1" in out


def test_a_changing_budget_is_a_warning_unless_strict(tmp_path, capsys):
    path = tmp_path / "hospital-a" / "ledger.jsonl"
    record_round(path, SITE1_EVENT, OLD, accountant="rdp")
    record_round(path, SITE1_EVENT, OLD, accountant="rdp", run_id="run-2", target_epsilon=12.0)
    result = audit([path.parent], accountants=["rdp"])
    assert [(f.kind, f.severity) for f in result.findings] == [("inconsistent-budget", "warning")]
    assert result.sites[0].target_epsilon == 12.0
    assert main(["audit", str(path), "--accountants", "rdp"]) == 0
    assert main(["audit", str(path.parent), "--accountants", "rdp", "--strict"]) == 1
    assert "WARNING [inconsistent-budget]" in capsys.readouterr().out


def test_witnessed_heads_missing_or_behind_are_failures(run_dir, tmp_path, capsys):
    def head(site):
        lines = (run_dir / "sites" / site / "ledger.jsonl").read_text().splitlines()
        return {"head": json.loads(lines[-1])["hash"], "records": len(lines), "run_id": "run-2"}

    state = tmp_path / "federation-state.json"
    state.write_text(json.dumps({"format": "fedcap-federation-state/1",
                                 "sites": {"site-0": head("site-0"), "site-1": head("site-1")}}))
    assert main(["audit", str(run_dir), "--federation-state", str(state)]) == 0
    capsys.readouterr()
    # site-1's ledger deleted (its whole state dir), site-0's rolled back to a copy one line shorter
    shutil.rmtree(run_dir / "sites/site-1")
    path = run_dir / "sites/site-0/ledger.jsonl"
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines()[:-1]))
    assert main(["audit", str(run_dir), "--federation-state", str(state)]) == 1
    out = capsys.readouterr().out
    assert "FAILURE [witness-missing] site-0" in out and "FAILURE [witness-missing] site-1" in out


def test_a_site_checks_only_its_own_witnessed_head(run_dir, tmp_path, capsys):
    lines = (run_dir / "sites/site-0/ledger.jsonl").read_text().splitlines()
    other = {"head": "0" * 64, "records": 3, "run_id": "run-2"}  # another site's ledger, not here
    state = tmp_path / "federation-state.json"
    state.write_text(json.dumps({"format": "fedcap-federation-state/1", "sites": {
        "site-0": {"head": json.loads(lines[-1])["hash"], "records": len(lines), "run_id": "run-2"},
        "hospital-b": other}}))
    own = str(run_dir / "sites/site-0")
    assert main(["audit", own, "--federation-state", str(state)]) == 1  # hospital-b's ledger is not audited here
    assert main(["audit", own, "--federation-state", str(state), "--site", "site-0"]) == 0
    capsys.readouterr()
    assert main(["audit", own, "--federation-state", str(state), "--site", "site-9"]) == 2
    assert "witnesses no site named site-9" in capsys.readouterr().out
    assert main(["audit", own, "--site", "site-0"]) == 2  # --site without --federation-state


def test_accountant_disagreement_is_a_warning_unless_strict(run_dir, capsys):
    # prv and pld differ by ~0.3% here: a tolerance below that must warn
    assert main(["audit", str(run_dir), "--tolerance", "1e-5"]) == 0
    assert "WARNING [accountant-disagreement] site-0: prv" in capsys.readouterr().out
    assert main(["audit", str(run_dir), "--tolerance", "1e-5", "--strict"]) == 1


def test_report_and_json_outputs(run_dir, tmp_path, capsys):
    report = tmp_path / "report"
    assert main(["audit", str(run_dir), "--report", str(report), "--json", "-"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # stdout holds only the JSON; the table went to stderr
    assert "site-0" in captured.err
    assert {"format", "status", "exit_code", "accountants", "tolerance", "sites", "findings"} <= result.keys()
    assert (result["status"], result["exit_code"], result["accountants"]) == ("ok", 0, ["prv", "rdp", "pld"])
    site = result["sites"][0]
    assert {"epsilon", "spent_epsilon", "remaining", "target_epsilon", "target_delta", "run_ids", "records",
            "records_retired", "grants"} <= site.keys()
    assert [(c["recorded_epsilon"], c["recomputed_epsilon"]) for c in site["checks"]] == [
        pytest.approx((r["epsilon"], r["epsilon"]), rel=1e-9)
        for r in PrivacyLedger(run_dir / "sites/site-0/ledger.jsonl").records()]
    md = (report / "audit.md").read_text()
    assert "| site-0 | 3 |" in md and "## Findings" in md and "## site-1" in md and "epsilon.png" in md
    assert (report / "epsilon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json_file = tmp_path / "new-folder" / "audit.json"  # a folder that does not exist yet
    assert main(["audit", str(run_dir), "--json", str(json_file)]) == 0
    assert json.loads(json_file.read_text())["sites"] == result["sites"]


def test_golden_multi_event_composition(tmp_path):
    events = [DPSGDEvent(sample_rate=0.02, noise_multiplier=1.1, steps=300),
              DPSGDEvent(sample_rate=0.05, noise_multiplier=0.9, steps=100)]
    for rnd, event in enumerate(events, 1):
        record_round(tmp_path / "site-0" / "ledger.jsonl", event, OLD, server_round=rnd, accountant="rdp")
    (site,) = audit([tmp_path / "site-0"]).sites
    # computed once with Opacus 1.6 (prv, rdp) and dp-accounting 0.6 (pld) at delta 1e-5
    assert site.epsilon == pytest.approx({"prv": 4.72431, "rdp": 5.40570, "pld": 4.71397}, rel=1e-3)


def test_site_names_in_a_federation_of_state_dirs(run_dir, tmp_path):
    shutil.copytree(run_dir / "sites/site-0", tmp_path / "deploy" / "sites" / "hospital-a" / "state")
    other = shutil.copytree(run_dir / "sites/site-1", tmp_path / "elsewhere" / "site-0")
    sites = find_ledgers([tmp_path / "deploy", other, run_dir / "sites/site-0"])
    assert [name for name, _ in sites] == ["hospital-a", str(other.resolve()), str((run_dir / "sites/site-0").resolve())]


@pytest.mark.parametrize("args,message", [(["{missing}"], "no such file or folder: {missing}"),
                                          (["{empty}"], "no ledger found under {empty}"),
                                          (["{empty}", "--accountants", "prv,gdp"], "got ['prv', 'gdp']"),
                                          (["{empty}", "--tolerance", "-1"], "tolerance must be in [0, 1), got -1.0")])
def test_bad_paths_and_arguments_exit_2(tmp_path, capsys, args, message):
    names = {"missing": tmp_path / "nope", "empty": tmp_path}
    assert main(["audit", *(a.format(**names) for a in args)]) == 2
    assert message.format(**names) in capsys.readouterr().err
