"""Issue 21, item 3: `fedcap rehearse` runs the planned federation on public data over a grid of
settings and writes the chosen ones as a run config, spending no site budget. A real tiny
rehearsal (2 sites of 60 public records, 2 rounds, a 2-point grid) through the CLI: real
train_round rounds with real site budgets and ledgers, FedAvg, the server's evaluation."""

import json
import tempfile
import tomllib

import numpy as np
import pytest
import torch

from runners.cli import main
from runners.flower_runtime import default_run_config
from shared_model.run_settings import validate_run_config
from simulations.rehearsal import GRID_KEYS, PointResult, Rehearsal, _fedavg, grid_points

TINY = {"image-size": 32, "model-d-model": 32, "model-num-heads": 2, "model-ffn-dim": 32, "model-max-len": 12,
        "server-eval-size": 16, "batch-size": 32, "max-physical-batch-size": 32, "lr": 0.003,
        # a count noise of std 1 keeps each site's noisy count of 60 within (32, 64]: 2 batches, as the plan's
        "count-noise-multiplier": 1.0}
RECORDS = ["60", "60"]


def toml_file(path, settings: dict):
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    return path


@pytest.fixture(scope="module")
def rehearsed(tmp_path_factory):
    """One rehearsal through the CLI, its site state, federation state and output folders named in
    the run config (none may appear) and the temporary folder watched."""
    from shared_model.data.synthetic import synthetic_vocabulary
    from shared_model.model.captioner import Captioner
    from shared_model.model.checkpoint import save_checkpoint
    from shared_model.model.config import captioner_config_from_run_config

    tmp = tmp_path_factory.mktemp("rehearsal")
    state = {"site-state-dir": str(tmp / "site-state"), "federation-state": str(tmp / "federation-state.json"),
             "output-dir": str(tmp / "runs")}
    run_config = toml_file(tmp / "tiny.toml", {**TINY, **state})
    torch.manual_seed(0)
    rc = validate_run_config({**default_run_config(), **TINY})
    checkpoint = save_checkpoint(tmp / "public-checkpoint", Captioner(captioner_config_from_run_config(
        rc, vocab_size=len(synthetic_vocabulary()))), synthetic_vocabulary(), metadata={"kind": "pretrained"})
    (tmp / "temp").mkdir()
    saved, tempfile.tempdir = tempfile.tempdir, str(tmp / "temp")
    try:
        code = main(["rehearse", "--records", *RECORDS, "--rounds", "2", "--local-epochs", "1", "2",
                     "--trainable", "decoder", "--run-config", str(run_config), "--init-from", str(checkpoint),
                     "--device", "cpu", "--out", str(tmp / "chosen.toml"), "--json", str(tmp / "rehearsal.json")])
    finally:
        tempfile.tempdir = saved
    return tmp, code, state, checkpoint


def test_the_grid_is_a_table_of_one_row_per_point_and_the_chosen_point_is_written_as_a_run_config(
        rehearsed, capsys):
    tmp, code, state, checkpoint = rehearsed
    assert code == 0
    result = json.loads((tmp / "rehearsal.json").read_text())
    assert [p["settings"]["local-epochs"] for p in result["points"]] == [1, 2]
    for p in result["points"]:
        assert len(p["scores"]) == 3  # round 0 (the public checkpoint) and 2 rounds
        assert p["scores"][p["best_round"]] == max(p["scores"]) == p["best_score"]
        assert p["scores"][0] == result["points"][0]["scores"][0]  # one start for every point
    chosen = result["points"][result["chosen"]]
    assert chosen["best_score"] == max(p["best_score"] for p in result["points"])
    # the written file: a flat run config that parses, validates and holds the chosen point
    text = (tmp / "chosen.toml").read_text()
    written = tomllib.loads(text)
    rc = validate_run_config({**default_run_config(), **written})
    assert {k: rc[k] for k in GRID_KEYS} == chosen["settings"]
    assert rc["num-server-rounds"] == 2 and rc["init-from"] == str(checkpoint.absolute())
    assert {k: written[k] for k in TINY if k not in GRID_KEYS} == {k: v for k, v in TINY.items() if k not in GRID_KEYS}
    # the table (in the file's header comments, as printed): one row per grid point, the chosen marked
    rows = [line for line in text.splitlines() if line.startswith("# | ") and not line.startswith("# | #")]
    assert len(rows) == 2 and sum("**chosen**" in r for r in rows) == 1
    assert f"| {result['chosen']} **chosen** |" in "\n".join(rows)


def test_when_no_point_improves_on_the_start_none_is_chosen_and_the_run_configs_settings_are_written(
        rehearsed, tmp_path, capsys):
    """A learning rate too small to change a greedy caption: every round scores as round 0, so the
    grid cannot be ranked by what it learns; the rehearsal says so and writes the run config's own
    settings, not an arbitrary point."""
    tmp, _, _, checkpoint = rehearsed
    run_config = toml_file(tmp_path / "tiny.toml", TINY)
    code = main(["rehearse", "--records", *RECORDS, "--rounds", "1", "--local-epochs", "1", "--lr", "1e-12", "2e-12",
                 "--run-config", str(run_config), "--init-from", str(checkpoint), "--device", "cpu",
                 "--out", str(tmp_path / "chosen.toml"), "--json", str(tmp_path / "rehearsal.json")])
    assert code == 0
    result = json.loads((tmp_path / "rehearsal.json").read_text())
    assert [p["best_round"] for p in result["points"]] == [0, 0] and result["chosen"] is None
    assert "warning: no grid point scored above round 0" in capsys.readouterr().out
    text = (tmp_path / "chosen.toml").read_text()
    rc = validate_run_config({**default_run_config(), **tomllib.loads(text)})
    assert rc["lr"] == TINY["lr"] and rc["local-epochs"] == default_run_config()["local-epochs"]
    assert "**chosen**" not in text and "Kept the run config's: lr = 0.003" in text


def test_the_rehearsal_spends_no_site_budget(rehearsed):
    tmp, code, state, _ = rehearsed
    assert code == 0
    for path in state.values():  # the run config's site state, federation state and run folders: untouched
        assert not (tmp / path).exists(), path
    # its ledgers lived in a temporary folder, removed when it ended
    assert not list((tmp / "temp").glob("fedcap-rehearsal-*"))


def test_each_simulated_site_used_the_noise_multiplier_and_steps_fedcap_plan_reports(rehearsed):
    from runners.plan_cmd import print_plan

    tmp, code, _, _ = rehearsed
    result = json.loads((tmp / "rehearsal.json").read_text())
    for point in result["points"]:
        rc = validate_run_config({**default_run_config(), **TINY, "num-server-rounds": 2, **point["settings"]})
        lines = []
        print_plan(rc, [int(n) for n in RECORDS], out=lines.append)
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line[:4] in ("| 0 ", "| 1 ")]
        assert [row[4] for row in rows] == [f"{s:.3f}" for s in point["noise_multipliers"]]  # sigma
        assert [int(row[3]) for row in rows] == point["steps_per_round"] == [2 * point["settings"]["local-epochs"]] * 2
        assert all(s > 0 for s in point["noise_multipliers"])
    # more local epochs, more steps over the run: more noise for the same allowance
    assert result["points"][1]["noise_multipliers"][0] > result["points"][0]["noise_multipliers"][0]


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "-1", "lr must be a number > 0, got -1.0"),
    ("--local-epochs", "0", "local-epochs must be an integer >= 1, got 0"),
    ("--trainable", "encoder", "trainable must be one of 'all', 'decoder', 'fusion+decoder', got 'encoder'"),
    ("--optimizer", "adam", "got 'adam'"),
])
def test_a_bad_grid_value_is_refused_by_name_before_anything_trains(tmp_path, capsys, monkeypatch, flag, value,
                                                                    message):
    import simulations.rehearsal

    def no_training(*args, **kwargs):
        raise AssertionError("trained despite a bad grid value")

    monkeypatch.setattr(simulations.rehearsal, "rehearse", no_training)
    monkeypatch.setattr("runners.rehearse_cmd._data", no_training)
    code = main(["rehearse", "--records", "60", flag, value, "--out", str(tmp_path / "chosen.toml")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "chosen.toml").exists()


def test_grid_points_cover_every_combination_and_refuse_a_setting_outside_the_grid():
    rc = default_run_config()
    points = grid_points(rc, {"lr": [0.001, 0.003, 0.001], "optimizer": ["adamw", "sgd"]})
    assert [(p["lr"], p["optimizer"]) for p in points] == [(0.001, "adamw"), (0.001, "sgd"), (0.003, "adamw"),
                                                          (0.003, "sgd")]
    assert all(p["local-epochs"] == rc["local-epochs"] and p["trainable"] == rc["trainable"] for p in points)
    with pytest.raises(ValueError, match="'batch-size'"):
        grid_points(rc, {"batch-size": [64, 128]})


def test_ties_go_to_fewer_trainable_parameters():
    def point(trainable: str, d: int, scores: list[float]) -> PointResult:
        return PointResult(settings={"lr": 0.003, "local-epochs": 1, "trainable": trainable, "optimizer": "adamw"},
                           trainable_parameters=d, noise_multipliers=[1.0], steps_per_round=[2], noise_to_signal=0.5,
                           scores=scores)

    result = Rehearsal(records=[60], rounds=2, points=[point("all", 1000, [1.0, 1.5, 1.2]),
                                                      point("decoder", 100, [1.0, 1.2, 1.5])])
    assert result.chosen is result.points[1]
    assert (result.points[0].best_round, result.points[1].best_round) == (1, 2)
    # a point that never beat its start is never chosen, however few its parameters
    result = Rehearsal(records=[60], rounds=2, points=[point("all", 1000, [1.0, 1.1, 0.9]),
                                                      point("decoder", 100, [1.0, 0.8, 0.9])])
    assert result.chosen is result.points[0]
    assert Rehearsal(records=[60], rounds=2, points=[point("decoder", 100, [1.0, 0.8, 0.9])]).chosen is None


def test_fedavg_is_flowers_weighted_mean():
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)} for _ in range(3)]
    weights = [60, 45, 120]
    records = [RecordDict({"arrays": ArrayRecord(s), "metrics": MetricRecord({"num-examples": w})})
               for s, w in zip(states, weights)]
    flower = aggregate_arrayrecords(records, "num-examples").to_torch_state_dict()
    ours = _fedavg(states, weights)
    for key in ours:
        assert ours[key].dtype == torch.float32
        np.testing.assert_allclose(ours[key].numpy(), flower[key].numpy(), rtol=1e-6, atol=1e-7)
