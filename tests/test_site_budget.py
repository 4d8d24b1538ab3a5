"""The site's budget cannot be bypassed: per-record accounting with retirement, witnessed ledgers,
site-owned budgets, per-run allowances. Real Opacus training rounds on a tiny captioner, real files."""

import shutil

import pytest
from conftest import tiny_config

from client.settings import site_budget, witnessed_head
from shared_model.run_settings import default_run_config, validate_node_config
from client.trainer import train_round
from client.settings import local_training
from shared_model.data.synthetic import load_embedded, synthetic_vocabulary
from shared_model.model.captioner import Captioner
from shared_model.privacy.history import build_histories
from shared_model.privacy.ledger import PrivacyLedger
from shared_model.privacy.ledger_lines import LedgerRollbackError, ledger_head
from shared_model.privacy.site_budget import BudgetExhaustedError, RunRequest, SiteBudget

VOCAB = synthetic_vocabulary()
TRAINING = local_training({**default_run_config(), "local-epochs": 1, "batch-size": 16, "lr": 1e-3}, {})
BUDGET = SiteBudget(target_epsilon=3.0, target_delta=1e-3, accountant="rdp")


def data(n, offset=0):
    full = load_embedded("train", offset + n, seed=0, image_size=32)
    return full.subset(range(offset, offset + n))


def run(ledger, records, *, run_id="r1", rounds=2, run_epsilon=2.0, server_round=1, budget=BUDGET, witness=None,
        seed=0, model=None):
    model = model or Captioner(tiny_config(vocab_size=len(VOCAB), max_len=20))
    request = RunRequest(run_id=run_id, run_epsilon=run_epsilon, num_rounds=rounds, local_epochs=1, batch_size=16,
                         count_noise_multiplier=5.0)
    return train_round(model=model, data=records, vocab=VOCAB, training=TRAINING, budget=budget, ledger=ledger,
                       request=request, server_round=server_round, witness=witness, seed=seed)


def trained(ledger):
    """records_trained of the ledger's last dp-sgd line (a site-local figure: never in a reply)."""
    return [r for r in ledger.records() if r["kind"] == "dp-sgd"][-1]["records_trained"]


def per_record(ledger):
    histories, _ = build_histories(ledger.records(), ledger.membership)
    return {rid: histories.epsilon(g, target_delta=1e-3, accountant="rdp") for rid, g in histories.group_of.items()}


def test_adding_a_record_after_exhaustion_does_not_reset_anyone(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    old = data(40)
    assert 2.9 < run(ledger, old, run_id="r1", run_epsilon=3.0, rounds=1)["epsilon"] <= 3.0 * (1 + 1e-6)
    with pytest.raises(BudgetExhaustedError, match="budget exhausted") as refusal:  # nothing left for a new run
        run(ledger, old, run_id="r2", rounds=1, run_epsilon=3.0)
    assert refusal.value.ledger_head == ledger_head(ledger.records())  # what the refusal reply carries
    before = per_record(ledger)
    grown = load_embedded("train", 60, seed=0, image_size=32)  # the same 40 records and 20 new ones
    metrics = run(ledger, grown, run_id="r3", rounds=1, run_epsilon=3.0)
    last = [r for r in ledger.records() if r["kind"] == "dp-sgd"][-1]
    assert (last["records_trained"], last["records_retired"]) == (20, 40)  # in the ledger, not in the reply
    count = [r for r in ledger.records() if r["kind"] == "count-gaussian"][-1]
    assert count["records_counted"] == 20 and metrics["num-examples"] == round(count["noisy_count"]) != 20
    after = per_record(ledger)
    assert all(after[rid] == pytest.approx(eps) for rid, eps in before.items())  # no one's epsilon went down
    assert max(after.values()) <= 3.0 * (1 + 1e-9)
    five_new = load_embedded("train", 65, seed=0, image_size=32).subset([*range(40), *range(60, 65)])
    with pytest.raises(BudgetExhaustedError, match="below min-records 15"):  # on the noisy count: 5 + noise
        run(ledger, five_new, run_id="r4", rounds=1, run_epsilon=3.0,
            budget=SiteBudget(target_epsilon=3.0, target_delta=1e-3, accountant="rdp", min_records=15))


def test_removing_and_re_adding_a_record_keeps_its_history(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    records = data(30)
    run(ledger, records, rounds=3)
    first = per_record(ledger)
    run(ledger, records.subset(range(1, 30)), server_round=2, rounds=3)
    run(ledger, records, server_round=3, rounds=3)
    after = per_record(ledger)
    ids = records.record_ids()
    assert after[ids[0]] > first[ids[0]]  # back in: its history went on, not from zero
    assert after[ids[1]] > after[ids[0]]  # it missed one round
    assert len(list((tmp_path / "membership").glob("*.json"))) == 2


def test_a_run_spends_its_allowance_not_the_lifetime(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    records = data(40)
    budget = SiteBudget(target_epsilon=8.0, target_delta=1e-3, accountant="rdp", max_run_epsilon=2.0)
    for rnd in (1, 2):
        metrics = run(ledger, records, rounds=2, run_epsilon=6.0, server_round=rnd, budget=budget)
    assert metrics["run-epsilon-granted"] == 2.0  # the site's own cap beats the server's request
    assert metrics["run-epsilon-spent"] == pytest.approx(2.0, rel=0.01)  # a quarter of the lifetime's budget
    assert metrics["epsilon"] + metrics["epsilon-remaining"] == pytest.approx(8.0)
    with pytest.raises(BudgetExhaustedError, match="outside that plan"):
        run(ledger, records, rounds=2, run_epsilon=6.0, server_round=3, budget=budget)
    second = run(ledger, records, run_id="r2", rounds=1, run_epsilon=6.0, budget=budget)
    assert trained(ledger) == 40 and second["epsilon"] > metrics["epsilon"]  # room for another run
    assert second["epsilon"] - metrics["epsilon"] <= 2.0  # moved by at most its grant


@pytest.mark.parametrize("lifetime, ask", [(4.0, 2.0), (8.0, 2.0)])
def test_grants_are_in_lifetime_terms_and_fill_the_budget(tmp_path, lifetime, ask):
    """Issue 19 (3): runs asking for `ask` at a lifetime of `lifetime` used to spend 1.99, 0.78, 0.28,
    ... of it (3.52 of 4 after seven runs). Now a run's grant is a share of the lifetime's Rényi
    budget, calibrated against the ledger's composed history: the runs fill the lifetime to within
    1%, each moves a record that trained before by at most its grant, and the next run is refused."""
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    records = data(40)
    budget = SiteBudget(target_epsilon=lifetime, target_delta=1e-3, accountant="rdp")
    spent = []
    with pytest.raises(BudgetExhaustedError, match="budget exhausted"):
        for k in range(7):
            spent.append(run(ledger, records, run_id=f"r{k}", rounds=1, run_epsilon=ask, budget=budget)["epsilon"])
    assert len(spent) == round(lifetime / ask)
    assert spent[-1] == pytest.approx(lifetime, rel=0.01) and spent[-1] <= lifetime * (1 + 1e-6)
    assert all(0 < b - a <= ask for a, b in zip(spent, spent[1:]))
    assert max(per_record(ledger).values()) <= lifetime  # the best order after the fact is below the filter's


@pytest.mark.parametrize("loss", ["delete-ledger", "delete-state", "old-backup"])
def test_a_lost_or_rolled_back_ledger_refuses(tmp_path, loss):
    state = tmp_path / "state"
    ledger = PrivacyLedger(state / "ledger.jsonl", mirror_dir=tmp_path / "mirror")
    records = data(30)
    run(ledger, records, rounds=3)
    backup = tmp_path / "backup"
    shutil.copytree(state, backup)
    metrics = run(ledger, records, rounds=3, server_round=2)
    witness = (metrics["ledger-head"], metrics["ledger-lines"])  # what the server keeps
    if loss == "delete-ledger":
        (state / "ledger.jsonl").unlink()
        match = "missing but this site has trained before"
    elif loss == "delete-state":  # the whole state dir: only the server's witness remembers
        shutil.rmtree(state)
        shutil.move(tmp_path / "mirror", tmp_path / "mirror-offline")
        match = "lost or rolled back"
    else:
        shutil.rmtree(state)
        shutil.copytree(backup, state)
        match = "lost or rolled back"
    with pytest.raises(LedgerRollbackError, match=match):
        run(ledger, records, rounds=3, server_round=3, witness=witness)
    # the mirror, written in the same transaction, restores it
    shutil.rmtree(state, ignore_errors=True)
    if loss == "delete-state":
        shutil.move(tmp_path / "mirror-offline", tmp_path / "mirror")
    shutil.copytree(tmp_path / "mirror", state)
    assert run(ledger, records, rounds=3, server_round=3, witness=witness)["ledger-lines"] == 5  # count, grant, 3


def test_the_witness_travels_in_the_train_config():
    config = {"witness-sites": ["site-0", "site-1"], "witness-heads": ["aa", "bb"], "witness-counts": [3, 5]}
    assert witnessed_head(config, "site-1") == ("bb", 5) and witnessed_head(config, "site-9") is None


def test_in_deployment_only_the_site_sets_its_budget():
    run_config = {**default_run_config(), "dp": False, "target-epsilon": 100.0, "target-delta": 0.9, "accountant": "prv",
                  "max-grad-norm": 1.0, "noise-multiplier": 0.0}
    node = {"data-dir": "/data", "state-dir": "/state", "target-epsilon": 6.0, "target-delta": 1e-6}
    budget = site_budget(run_config, node)
    assert (budget.target_epsilon, budget.target_delta, budget.accountant) == (6.0, 1e-6, "rdp")
    assert budget.max_run_epsilon == 1.5  # a quarter of the lifetime: room for several runs
    with pytest.raises(ValueError, match=r"node_config lacks \['target-delta'\]"):
        site_budget(run_config, {"data-dir": "/data", "state-dir": "/state", "target-epsilon": 6.0})
    simulated = site_budget({**run_config, "dp": True, "target-delta": 1e-5}, {"partition-id": 0})
    assert (simulated.target_epsilon, simulated.target_delta, simulated.accountant) == (100.0, 1e-5, "prv")


def test_a_delta_above_one_over_n_is_refused(tmp_path):
    budget = SiteBudget(target_epsilon=8.0, target_delta=0.05, accountant="rdp")
    with pytest.raises(ValueError, match=r"target-delta 0.05 is above 1/\(number of records\)"):
        run(PrivacyLedger(tmp_path / "ledger.jsonl"), data(30), budget=budget)


def test_a_non_private_deployed_site_is_the_sites_own_choice(tmp_path):
    """Issue 13: the documented non-private baseline. Only the site's node_config can opt out; such
    a site has no budget, joins dp = false runs only, and never shares a state-dir with a DP ledger."""
    run_config = {**default_run_config(), "dp": False, "max-grad-norm": 1.0, "noise-multiplier": 0.0}
    node = {"site-name": "a", "data-dir": "/data", "state-dir": str(tmp_path / "np"), "non-private": True}
    assert site_budget(run_config, node) is None
    with pytest.raises(ValueError, match=r"run asks dp = true"):
        site_budget({**run_config, "dp": True}, node)
    with pytest.raises(ValueError, match=r"non-private = true and \['target-epsilon'\]"):
        site_budget(run_config, {**node, "target-epsilon": 8.0})
    dp_state = tmp_path / "dp"
    dp_state.mkdir()
    (dp_state / "ledger.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"holds a DP ledger"):
        site_budget(run_config, {**node, "state-dir": str(dp_state)})
    # without the opt-out a deployed site has a budget whatever the run config says
    with pytest.raises(ValueError, match=r"node_config lacks"):
        site_budget(run_config, {"site-name": "a", "data-dir": "/data"})
    assert validate_node_config(node)["non-private"] is True
    with pytest.raises((TypeError, ValueError), match="non-private"):
        validate_node_config({**node, "non-private": "yes"})
