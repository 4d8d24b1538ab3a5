"""The one settings schema: every pyproject key is known, bad values are refused with the key and the
value named, node_config is checked the same way, and the simulation runner uses the same schema."""

import pytest

from shared_model.privacy.accounting import DEFAULT_ACCOUNTANT
from shared_model.run_settings import (NODE_CONFIG, NODE_DEFAULTS, RUN_CONFIG, SIMULATION_ONLY, default_run_config,
                                       simulation_only_overrides, validate_node_config, validate_run_config)
from simulations.run import load_scenario

# issue 12's bad settings (plus num-server-rounds = 0 and an unknown key): key, value, what the message says
BAD_RUN_CONFIG = [
    ("target-epsilon", -1.0, "target-epsilon must be a number > 0, got -1.0"),
    ("target-epsilon", 0.0, "target-epsilon must be a number > 0, got 0.0"),
    ("target-delta", 0.0, "target-delta must be a number in (0, 1), got 0.0"),
    ("target-delta", 1.5, "target-delta must be a number in (0, 1), got 1.5"),
    ("batch-size", 0, "batch-size must be an integer >= 1, got 0"),
    ("lr", -0.1, "lr must be a number > 0, got -0.1"),
    ("lr", "fast", "lr must be a number > 0, got 'fast'"),
    ("partitioner", "foo", "partitioner must be one of 'iid', 'dirichlet', 'quantity', got 'foo'"),
    ("max-grad-norm", 0.0, "max-grad-norm must be a number > 0, got 0.0"),
    ("noise-multiplier", -1.0, "noise-multiplier must be a number >= 0, got -1.0"),
    ("num-server-rounds", 0, "num-server-rounds must be an integer >= 1, got 0"),
    ("dp", "yes", "dp must be a boolean (true or false), got 'yes'"),
    ("strategy", "fedbest", "strategy must be one of"),
    ("num-server-rounds", 2.5, "num-server-rounds must be an integer >= 1, got 2.5"),
    ("round-timeout", float("inf"), "round-timeout must be a number > 0, got inf"),
    ("datasett", "embedded", "unknown run-config key 'datasett'"),
    ("grad-sample-mode", "functorch", "grad-sample-mode must be one of 'hooks', 'ghost', 'auto', got 'functorch'"),
]


def test_every_pyproject_key_is_in_the_schema_and_the_defaults_pass():
    defaults = default_run_config()
    assert set(defaults) <= set(RUN_CONFIG)
    assert "dataset" not in defaults  # read nowhere: removed
    checked = validate_run_config(defaults)
    assert checked["lr"] == defaults["lr"] and isinstance(validate_run_config({**default_run_config(), "lr": 1})["lr"], float)


@pytest.mark.parametrize("key, value, message", BAD_RUN_CONFIG, ids=[f"{k}={v!r}" for k, v, _ in BAD_RUN_CONFIG])
def test_bad_run_config_is_refused_naming_key_and_value(key, value, message):
    with pytest.raises((TypeError, ValueError)) as err:
        validate_run_config({**default_run_config(), key: value})
    assert message in str(err.value)
    # a wrong type is a TypeError, a wrong value a ValueError
    assert isinstance(err.value, TypeError) == ((key, value) in {("lr", "fast"), ("dp", "yes"),
                                                                 ("num-server-rounds", 2.5)})


def test_keys_added_by_the_privacy_and_init_work_are_known():
    rc = validate_run_config({**default_run_config(), "run-epsilon": 2, "federation-state": "", "init-from": "ckpt",
                              "trainable": "fusion+decoder"})
    assert rc["run-epsilon"] == 2.0
    with pytest.raises(ValueError, match="trainable must be one of 'all', 'decoder', 'fusion\\+decoder', got 'head'"):
        validate_run_config({**default_run_config(), "trainable": "head"})
    with pytest.raises(ValueError, match="run-epsilon must be a number > 0, got 0"):
        validate_run_config({**default_run_config(), "run-epsilon": 0})


def test_cross_key_checks_name_both_keys():
    with pytest.raises(ValueError, match="model-d-model must be divisible by model-num-heads \\(3\\), got 32"):
        validate_run_config({**default_run_config(), "model-d-model": 32, "model-num-heads": 3})
    with pytest.raises(ValueError, match="init-from and resume-from"):
        validate_run_config({**default_run_config(), "init-from": "a", "resume-from": "b"})
    with pytest.raises(ValueError, match="grad-sample-mode 'ghost' cannot train the 'lstm' decoder"):
        validate_run_config({**default_run_config(), "grad-sample-mode": "ghost", "model-decoder": "lstm"})
    assert validate_run_config({**default_run_config(), "grad-sample-mode": "ghost", "model-decoder": "transformer"})
    assert validate_run_config({**default_run_config(), "grad-sample-mode": "hooks", "model-decoder": "lstm"})


def test_node_config_schema():
    site = {"site-name": "clinic-a", "data-dir": "/data", "dataset-format": "coco", "state-dir": "/state",
            "target-epsilon": 4, "target-delta": 1e-6, "max-run-epsilon": 1.0, "min-records": 50,
            "ledger-mirror-dir": "", "accountant": "rdp", "skip-bad-records": True}
    assert set(site) <= set(NODE_CONFIG)
    assert validate_node_config(site)["target-epsilon"] == 4.0
    # the keys a site leaves out get the schema's defaults, the one place a node_config default lives
    assert validate_node_config({"partition-id": 1, "num-partitions": 2}) == {"partition-id": 1, "num-partitions": 2,
                                                                             **NODE_DEFAULTS}
    assert NODE_DEFAULTS["accountant"] == DEFAULT_ACCOUNTANT == default_run_config()["accountant"]
    cases = [({**site, "target-epsilon": -1.0}, "target-epsilon must be a number > 0, got -1.0"),
             ({**site, "target-delta": 1.0}, "target-delta must be a number in (0, 1), got 1.0"),
             ({**site, "min-records": 0}, "min-records must be an integer >= 1, got 0"),
             ({**site, "accountant": "gdp"}, "accountant must be one of 'prv', 'rdp', got 'gdp'"),
             ({**site, "target-epsilon": "8"}, "target-epsilon must be a number > 0, got '8'"),
             ({**site, "budget": 8.0}, "unknown node_config key 'budget'"),
             ({"data-dir": "/data"}, "must hold 'site-name'"),
             ({"site-name": "x"}, "must hold 'data-dir'"),
             ({"partition-id": 2, "num-partitions": 2}, "partition-id must be < num-partitions (2), got 2")]
    for node_config, message in cases:
        with pytest.raises((TypeError, ValueError)) as err:
            validate_node_config(node_config)
        assert message in str(err.value), (node_config, str(err.value))


def test_scenario_files_are_checked_with_the_same_schema(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('lr = 0.01\n[federation]\nnum-supernodes = 2\n')
    assert load_scenario([good]) == ({"lr": 0.01}, {"num-supernodes": 2, "client-resources-num-cpus": 1})
    bad = tmp_path / "bad.toml"
    bad.write_text('lr = "fast"\n')
    with pytest.raises(TypeError, match="lr must be a number > 0, got 'fast'"):
        load_scenario([bad])
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("learning-rate = 0.1\n")
    with pytest.raises(ValueError, match="unknown run-config key 'learning-rate'"):
        load_scenario([unknown])
    broken = tmp_path / "broken.toml"
    broken.write_text("lr = = 0.1\n")
    with pytest.raises(ValueError, match=f"scenario file {broken} is not valid TOML"):
        load_scenario([broken])


def test_a_run_config_lacking_a_key_is_refused_by_name():
    """pyproject.toml holds every run-config default; a run config without a key is an error, not a
    fallback written in code."""
    partial = {k: v for k, v in default_run_config().items() if k != "lr"}
    with pytest.raises(ValueError, match=r"run-config lacks \['lr'\]"):
        validate_run_config(partial)
    assert set(default_run_config()) == set(RUN_CONFIG)  # every schema key has its one default


def test_simulation_only_keys_are_named_and_overrides_found():
    assert {"seed", "partitioner", "train-size", "site-state-dir", "canary-count", "target-epsilon"} <= \
        set(SIMULATION_ONLY)
    assert "lr" not in SIMULATION_ONLY and "run-epsilon" not in SIMULATION_ONLY  # the sites use these
    rc = {**default_run_config(), "seed": 3, "lr": 0.1, "target-epsilon": 100.0}
    assert simulation_only_overrides(rc) == {"seed": 3, "target-epsilon": 100.0}
    assert simulation_only_overrides(default_run_config()) == {}


def test_no_code_reads_a_run_config_key_with_a_fallback_of_its_own():
    """One default per setting: `run_config.get("lr", 3e-3)` would be a second one. Scan the apps,
    the library and the programs for a .get(<run-config key>, <default>) on a run config (a message's
    config, such as the proximal-mu FedProx sends, is what the server sent, not a setting's default)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found = []
    for folder in ("shared_model", "client", "server", "runners", "simulations", "deploy"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                        and len(node.args) == 2 and isinstance(node.args[0], ast.Constant)
                        and node.args[0].value in RUN_CONFIG
                        and ast.unparse(node.func.value) in ("run_config", "rc", "context.run_config")):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, found


# issue 12's bad settings as the simulation runner meets them: refused before Flower starts, a wrong
# type as a TypeError and a wrong value as a ValueError naming the key (the ServerApp's own refusal:
# one real launch in tests/test_federated.py)
RUNNER_CASES = [{"lr": "fast"}, {"target-delta": 1.5}, {"num-server-rounds": 0}]


@pytest.mark.parametrize("bad", RUNNER_CASES, ids=[str(c) for c in RUNNER_CASES])
def test_the_simulation_runner_refuses_a_bad_setting_before_flower_starts(tmp_path, bad):
    from simulations.run import run_simulation

    key = next(iter(bad))
    with pytest.raises(TypeError if key == "lr" else ValueError, match=key):
        run_simulation([], output_dir=tmp_path, timeout=60, flwr_home=tmp_path / "flwr-home", stream_to=None,
                       overrides=bad)
    assert not list(tmp_path.glob("run-*"))  # nothing started, nothing written
