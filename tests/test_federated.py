"""Real Flower simulations (local SuperLink, Ray, ClientApp + ServerApp) on a tiny captioner."""

import json

import pytest

from shared_model.privacy import PrivacyLedger
from simulations.run import run_simulation, stop_superlink

TINY = dict(train_size=300, server_eval_size=30, image_size=32, model_d_model=32, model_num_heads=2,
            model_ffn_dim=32, batch_size=32, model_dropout=0.0)
TIMEOUT = 600


def overrides(**kw):
    return {k.replace("_", "-"): v for k, v in {**TINY, **kw}.items()}


@pytest.fixture(scope="module")
def flwr_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("flwr-home")
    yield home
    stop_superlink(home)


@pytest.fixture(scope="module")
def sites2(tmp_path_factory):
    path = tmp_path_factory.mktemp("scenario") / "sites2.toml"
    path.write_text("[federation]\nnum-supernodes = 2\n")
    return path


def rounds(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_federated_training_improves_the_global_model(tmp_path, flwr_home, sites2):
    # non-private, so that a tiny model learns visibly in a few rounds (DP runs: the tests below)
    result = run_simulation([sites2], output_dir=tmp_path, timeout=TIMEOUT, flwr_home=flwr_home, stream_to=None,
                            overrides=overrides(num_server_rounds=3, local_epochs=3, dp=False, lr=0.005))
    run_dir = result["run_dir"]
    rows = rounds(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    cider = [r["CIDEr-D"] for r in rows]
    assert cider[-1] > cider[0] + 0.1 and rows[-1]["loss"] < rows[0]["loss"]
    assert not (run_dir / "sites").exists()  # non-private: no ledger records
    federated = [json.loads(line) for line in (run_dir / "federated.jsonl").read_text().splitlines()]
    assert [r["round"] for r in federated] == [1, 2, 3]
    assert all(set(r["sites"]) == {"site-0", "site-1"} for r in federated)
    held_out = [r["sites"]["site-0"]["num-examples"] for r in federated]
    assert held_out[0] > 0 and len(set(held_out)) == 1  # the same held-out split every round
    assert federated[-1]["mean"]["CIDEr-D"] > federated[0]["mean"]["CIDEr-D"]
    assert (run_dir / "checkpoints" / "round-0003" / "model.safetensors").is_file()
    summary = (run_dir / "summary.md").read_text()
    assert "ended: completed" in summary and (run_dir / "rounds.png").is_file()
    assert "| 3 | site-1 |" in summary and "| 3 | weighted mean |" in summary


def test_private_simulation_writes_each_site_ledger(tmp_path, flwr_home, sites2):
    result = run_simulation([sites2], output_dir=tmp_path, timeout=TIMEOUT, flwr_home=flwr_home, stream_to=None,
                            overrides=overrides(num_server_rounds=2, target_epsilon=8.0))
    run_dir = result["run_dir"]
    for site in ("site-0", "site-1"):
        records = PrivacyLedger(run_dir / "sites" / site / "ledger.jsonl").records()
        assert [r["server_round"] for r in records] == [1, 2]
        assert records[0]["epsilon"] < records[-1]["epsilon"] <= 8.0  # calibrated over the 2-round plan
        assert records[-1]["epsilon"] > 8.0 * 0.9
    summary = (run_dir / "summary.md").read_text()
    assert "| site-0 |" in summary and "| site-1 |" in summary


def test_second_run_continues_the_site_ledger_and_budget_is_enforced(tmp_path, flwr_home, sites2):
    state = tmp_path / "site-state"
    common = dict(num_server_rounds=2, site_state_dir=str(state), noise_multiplier=1.0)
    first = run_simulation([sites2], output_dir=tmp_path / "runs", timeout=TIMEOUT, flwr_home=flwr_home,
                           stream_to=None, overrides=overrides(target_epsilon=100.0, **common))
    ledger = PrivacyLedger(state / "site-0" / "ledger.jsonl")
    after_first = ledger.records()
    assert len(after_first) == 2
    second = run_simulation([sites2], output_dir=tmp_path / "runs", timeout=TIMEOUT, flwr_home=flwr_home,
                            stream_to=None, overrides=overrides(target_epsilon=100.0, **common))
    records = ledger.records()
    assert len(records) == 4 and records[2]["run_id"] == second["run_id"] != first["run_id"]
    assert records[2]["epsilon"] > after_first[-1]["epsilon"]  # continues, does not restart at round 1's value
    # a budget just above what is spent: no site can train another round, the run ends cleanly
    spent = max(PrivacyLedger(state / s / "ledger.jsonl").records()[-1]["epsilon"] for s in ("site-0", "site-1"))
    third = run_simulation([sites2], output_dir=tmp_path / "runs", timeout=TIMEOUT, flwr_home=flwr_home,
                           stream_to=None, overrides=overrides(target_epsilon=spent * 1.01, **common))
    assert len(ledger.records()) == 4  # nothing trained, nothing recorded
    summary = (third["run_dir"] / "summary.md").read_text()
    assert "stopped early" in summary and "exhausted" in summary


def test_a_failing_server_app_fails_the_run(tmp_path, flwr_home, sites2):
    with pytest.raises(RuntimeError, match="status"):
        run_simulation([sites2], output_dir=tmp_path, timeout=TIMEOUT, flwr_home=flwr_home, stream_to=None,
                       overrides=overrides(num_server_rounds=1, resume_from=str(tmp_path / "no-such-checkpoint")))


def test_federation_fine_tunes_a_public_pretrained_checkpoint(tmp_path, flwr_home, sites2):
    """Public pretraining -> federated DP fine-tuning of fusion+decoder from it (init-from)."""
    import torch

    from shared_model.evaluation import evaluate
    from shared_model.model import checkpoint_sha256, load_checkpoint, parameter_group
    from shared_model.runners import default_run_config
    from simulations.pretrained import pretrain_for

    rc = overrides(num_server_rounds=2, trainable="fusion+decoder", target_epsilon=8.0)
    checkpoint, public = pretrain_for({**default_run_config(), **rc}, cache=tmp_path / "pretrained",
                                      log=lambda s: None, train_size=300, epochs=2, batch_size=32)
    result = run_simulation([sites2], output_dir=tmp_path / "runs", timeout=TIMEOUT, flwr_home=flwr_home,
                            stream_to=None, overrides={**rc, "init-from": str(checkpoint)})
    run_dir = result["run_dir"]
    assert json.loads((run_dir / "init_checkpoint.json").read_text()) == {
        "source": "init-from", "checkpoint": str(checkpoint), "init-checkpoint": checkpoint_sha256(checkpoint)}
    pretrained, vocab, _ = load_checkpoint(checkpoint)
    from shared_model.data import load_embedded
    expected, _ = evaluate(pretrained, load_embedded("test", 30, image_size=32), vocab, meteor=False)
    rows = rounds(run_dir)
    assert rows[0]["CIDEr-D"] == pytest.approx(expected["CIDEr-D"])  # round 0 is the public-only model
    final, _, _ = load_checkpoint(run_dir / "checkpoints" / "round-0002")
    for (name, p), q in zip(pretrained.named_parameters(), final.parameters()):
        if parameter_group(name) == "encoder":  # frozen at every site: no noise, no update
            assert torch.allclose(p, q, atol=1e-6), name
        else:
            assert not torch.equal(p, q), name
    for site in ("site-0", "site-1"):
        assert len(PrivacyLedger(run_dir / "sites" / site / "ledger.jsonl").records()) == 2
