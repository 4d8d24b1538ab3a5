"""Issue 18: the guarantee holds against the server. Each test plays the server with the site's own
code (in process, as client_app.train calls it): real Opacus rounds on a tiny captioner, real ledgers."""

import pytest
import torch
from conftest import tiny_config

from client.settings import mechanism_seed, shares_held_out_metrics, state_dir
from client.trainer import train_round
from client.settings import local_training
from shared_model.run_settings import default_run_config
from shared_model.privacy.reply import TRAIN_METRICS
from shared_model.data.synthetic import load_embedded, synthetic_vocabulary
from shared_model.model.captioner import Captioner
from shared_model.privacy.ledger import PrivacyLedger
from shared_model.privacy.site_budget import BudgetExhaustedError
from shared_model.privacy.site_budget import RunRequest, SiteBudget
from shared_model.run_settings import validate_node_config

VOCAB = synthetic_vocabulary()
TRAINING = local_training({**default_run_config(), "local-epochs": 1, "batch-size": 16, "lr": 1e-3}, {})
BUDGET = SiteBudget(target_epsilon=4.0, target_delta=1e-3, accountant="rdp")
DEPLOYED = {"site-name": "a", "data-dir": "/data", "state-dir": "/state", "target-epsilon": 4.0, "target-delta": 1e-3}


def records(n=40, seed=0):
    return load_embedded("train", n, seed=seed, image_size=32)


def site_round(tmp, data, *, seed, server_round=1, rounds=2, run_id="r1", budget=BUDGET, init=0):
    torch.manual_seed(init)  # the server's global model: the same weights every time
    model = Captioner(tiny_config(vocab_size=len(VOCAB), max_len=20))
    request = RunRequest(run_id=run_id, run_epsilon=2.0, num_rounds=rounds, local_epochs=1, batch_size=16,
                         count_noise_multiplier=5.0)
    reply = train_round(model=model, data=data, vocab=VOCAB, training=TRAINING, budget=budget,
                        ledger=PrivacyLedger(tmp / "ledger.jsonl"), request=request, server_round=server_round,
                        seed=seed)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), reply


def test_a_deployed_site_draws_its_randomness_from_the_os_not_from_the_server(tmp_path):
    # whatever seed the run config holds, a deployed site's mechanism is not seeded by it
    assert mechanism_seed({"seed": 7}, DEPLOYED) is None
    assert mechanism_seed({"seed": 7}, {"partition-id": 1, "num-partitions": 2}) == 7 * 1_000_003 + 1
    data = records()
    a, _ = site_round(tmp_path / "a", data, seed=None)
    b, _ = site_round(tmp_path / "b", data, seed=None)
    assert not torch.equal(a, b)  # same weights, data, round: different noise
    c, _ = site_round(tmp_path / "c", data, seed=5)
    d, _ = site_round(tmp_path / "d", data, seed=5)
    assert torch.equal(c, d)  # a simulation reproduces its run


def test_the_servers_dummy_data_replay_no_longer_matches(tmp_path):
    """The attack of issue 18 (1): the server reruns the site's code on random records of the same
    count with the values it sent; with the site's OS-drawn randomness the replay matches neither the
    real records' update nor another replay."""
    real, reply = site_round(tmp_path / "site", records(40, seed=0), seed=None)
    replays = [site_round(tmp_path / f"replay{k}", records(40, seed=1), seed=s)[0] for k, s in enumerate((0, 1))]
    assert not any(torch.equal(real, r) for r in replays)


def test_a_dp_reply_carries_public_values_only(tmp_path):
    _, reply = site_round(tmp_path, records(), seed=0)
    metrics = {k: v for k, v in reply.items() if not k.startswith("ledger-")}
    assert set(metrics) == set(TRAIN_METRICS) and "train-loss" not in reply
    assert not {"records-trained", "records-retired"} & set(reply)
    lines = PrivacyLedger(tmp_path / "ledger.jsonl").records()
    assert [r["kind"] for r in lines] == ["count-gaussian", "grant", "dp-sgd"]
    assert reply["num-examples"] == round(lines[0]["noisy_count"]) and lines[0]["records_counted"] == 40


def test_the_site_enforces_the_run_allowance(tmp_path):
    data = records()
    site_round(tmp_path, data, seed=0, server_round=1, rounds=2)
    with pytest.raises(BudgetExhaustedError, match="round 1 asked again"):  # a re-sent round number
        site_round(tmp_path, data, seed=0, server_round=1, rounds=2)
    with pytest.raises(BudgetExhaustedError, match="outside that plan"):
        site_round(tmp_path, data, seed=0, server_round=3, rounds=2)
    _, last = site_round(tmp_path, data, seed=0, server_round=2, rounds=2)
    assert last["run-epsilon-spent"] <= last["run-epsilon-granted"] * (1 + 1e-6)
    kinds = [r["kind"] for r in PrivacyLedger(tmp_path / "ledger.jsonl").records()]
    assert kinds == ["count-gaussian", "grant", "dp-sgd", "dp-sgd"]  # refusals wrote nothing
    # a noise multiplier from the run config that would pass the grant is refused, not overspent
    noisy_server = SiteBudget(target_epsilon=8.0, target_delta=1e-3, accountant="rdp", noise_multiplier=0.3)
    with pytest.raises(BudgetExhaustedError, match="noise-multiplier 0.3 set by the run config would spend"):
        site_round(tmp_path / "other", data, seed=0, budget=noisy_server)
    generous = SiteBudget(target_epsilon=8.0, target_delta=1e-3, accountant="rdp", noise_multiplier=50.0)
    _, ok = site_round(tmp_path / "generous", data, seed=0, budget=generous)
    assert ok["noise-multiplier"] == 50.0 and ok["run-epsilon-spent"] < 2.0


def test_a_deployed_site_owns_its_ledger_and_its_held_out_metrics():
    node = {k: v for k, v in DEPLOYED.items() if k != "state-dir"}
    with pytest.raises(ValueError, match="data-dir '/data' but no 'state-dir'"):
        validate_node_config(node)
    with pytest.raises(ValueError, match="no 'state-dir'"):
        state_dir({"site-state-dir": "/server/chooses"}, node, run_id=1)
    assert str(state_dir({"site-state-dir": "/server/chooses"}, DEPLOYED, run_id=1)) == "/state"
    assert not shares_held_out_metrics(DEPLOYED)  # no epsilon covers held-out metrics: off by default
    assert shares_held_out_metrics({**DEPLOYED, "share-held-out-metrics": True})
    assert shares_held_out_metrics({"partition-id": 0, "num-partitions": 2})  # simulation: one operator
