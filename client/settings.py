"""Where a site's settings come from: run_config (the federation's plan), node_config (the site's
identity, data, state folder, ledger mirror and its own privacy budget, which the server cannot
override), and the train message's config (the witnessed ledger heads, the init checkpoint).

Every function takes the run config as Flower hands it (complete: pyproject.toml holds every
default) and reads a node_config key the site may leave out through the schema's default
(`node_setting`), so no default is written here (shared_model/run_settings.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from shared_model.data.records import CaptionSet
from shared_model.privacy.dp import resolve_grad_sample_mode
from shared_model.privacy.ledger import PrivacyLedger
from shared_model.privacy.site_budget import RunRequest, SiteBudget
from shared_model.privacy.vocab_release import VocabRelease
from shared_model.run_folder import run_dir
from shared_model.run_settings import NODE_DEFAULTS

from .trainer import LocalTraining


def node_setting(node_config: Mapping[str, Any], key: str) -> Any:
    """node_config `key`, or its default from the schema (run_settings.NODE_CONFIG)."""
    return node_config[key] if key in node_config else NODE_DEFAULTS[key]


def site_name(node_config: Mapping[str, Any]) -> str:
    if "site-name" in node_config:
        return str(node_config["site-name"])
    if "partition-id" in node_config:
        return f"site-{int(node_config['partition-id'])}"
    raise ValueError("node_config has neither 'site-name' nor 'partition-id'")


def state_dir(run_config: Mapping[str, Any], node_config: Mapping[str, Any], run_id: int | str) -> Path:
    """Deployment: node_config `state-dir`, required (no run-config value can place or discard a
    deployed site's ledger). Simulation: `site-state-dir`/<site> when set (state that outlives runs,
    like a real site's disk), else <run folder>/sites/<site>."""
    if "state-dir" in node_config:
        return Path(str(node_config["state-dir"])).expanduser().absolute()
    if is_deployed(node_config):
        raise ValueError("node_config has no 'state-dir': a deployed site keeps its privacy ledger in its own "
                         "folder (start the SuperNode with --node-config \"state-dir=/path/on/the/site ...\")")
    shared = str(run_config["site-state-dir"])
    base = Path(shared).expanduser().absolute() if shared else run_dir(run_config, run_id) / "sites"
    return base / site_name(node_config)


def site_data(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> tuple[CaptionSet, CaptionSet]:
    from .site_data import deployed_site_data, simulated_site_data

    if "data-dir" in node_config:
        return deployed_site_data(node_config, image_size=int(run_config["image-size"]),
                                  cache_dir=data_cache_dir(node_config))
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise ValueError("node_config needs 'data-dir' (deployment) or 'partition-id' and 'num-partitions' "
                         "(simulation)")
    return simulated_site_data(run_config, partition_id=int(node_config["partition-id"]),
                               num_partitions=int(node_config["num-partitions"]))


def data_cache_dir(node_config: Mapping[str, Any]) -> Path | None:
    """Where a deployed site keeps its decoded records (a copy of its private images, never sent):
    node_config `cache-dir`, else `<state-dir>-cache` beside (not inside) the state dir, so backing
    up or mirroring the ledger never copies images; None (no cache) without either."""
    if "cache-dir" in node_config:
        return Path(str(node_config["cache-dir"])).expanduser().absolute()
    if "state-dir" in node_config:
        state = Path(str(node_config["state-dir"])).expanduser().absolute()
        return state.with_name(state.name + "-cache")
    return None


def mechanism_seed(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> int | None:
    """None at a deployed site: its DP randomness comes from the OS, never from a value the server
    sends (privacy/randomness.py). A simulated site seeds from the run's `seed` and its partition, so
    that a simulation is reproducible."""
    if is_deployed(node_config):
        return None
    return int(run_config["seed"]) * 1_000_003 + int(node_config["partition-id"])


def shares_held_out_metrics(node_config: Mapping[str, Any]) -> bool:
    """Whether this site sends caption metrics of its held-out split (records it never trains on,
    whose metrics no epsilon covers). A deployed DP site only with node_config
    `share-held-out-metrics = true`; a non-private site and a simulated one (whose operator owns
    every partition) always."""
    if not is_deployed(node_config) or node_setting(node_config, "non-private"):
        return True
    return bool(node_setting(node_config, "share-held-out-metrics"))


def is_deployed(node_config: Mapping[str, Any]) -> bool:
    """A real site (its own data-dir) rather than a simulated partition."""
    return "data-dir" in node_config


def ledger_is_ephemeral(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> bool:
    """A simulated site whose ledger lives inside this run's folder: new with every run by design,
    so no witness from an earlier run applies to it."""
    return not is_deployed(node_config) and "state-dir" not in node_config and \
        not str(run_config["site-state-dir"])


_warned: set[str] = set()


def warn_simulation_only(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> None:
    """At a deployed site, a warning naming each simulation-only run-config key the run sets away
    from its default (the site's data, budget and randomness are its own: it ignores them); once
    per process."""
    if not is_deployed(node_config):
        return
    import logging

    from shared_model.run_settings import simulation_only_overrides

    for key, value in simulation_only_overrides(run_config).items():
        if key not in _warned:
            _warned.add(key)
            logging.getLogger("flwr").warning(
                "run-config %s = %r is simulation-only: this deployed site ignores it (its node_config decides)",
                key, value)


def site_budget(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> SiteBudget | None:
    """The site's lifetime budget per record. Deployment: only node_config sets it (target-epsilon
    and target-delta both required; no run-config value can raise either) and the site always trains
    privately. Simulation: the run config's budget for the simulated sites, or None when dp = false.
    A deployed site opts out only in its own node_config (`non-private = true`, no budget, a state-dir
    without a DP ledger) and then takes part in `dp = false` runs only: None."""
    if node_setting(node_config, "non-private"):
        return _non_private_site(run_config, node_config)
    if is_deployed(node_config) or "target-epsilon" in node_config:
        missing = [k for k in ("target-epsilon", "target-delta") if k not in node_config]
        if missing:
            raise ValueError(f"node_config lacks {missing}: a site sets its own privacy budget (start the "
                             f"SuperNode with --node-config \"target-epsilon=8.0 target-delta=1e-6 ...\")")
        source = node_config
        max_run = node_config.get("max-run-epsilon", float(node_config["target-epsilon"]) / 4)
    else:
        if not run_config["dp"]:
            return None
        source = run_config
        max_run = None
    noise = float(run_config["noise-multiplier"])
    return SiteBudget(target_epsilon=_number(source, "target-epsilon"), target_delta=_number(source, "target-delta"),
                      accountant=str(source["accountant"] if source is run_config else
                                     node_setting(node_config, "accountant")),
                      max_run_epsilon=None if max_run is None else float(max_run),
                      min_records=int(node_setting(node_config, "min-records")),
                      max_grad_norm=_number(run_config, "max-grad-norm"), noise_multiplier=noise or None)


def _non_private_site(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> None:
    """Checks for a site that trains without DP (a baseline): never with a budget, never for a run
    that asks for DP, never beside a DP ledger (its records would be trained on outside the ledger)."""
    budget_keys = sorted(k for k in ("target-epsilon", "target-delta", "max-run-epsilon") if k in node_config)
    if budget_keys:
        raise ValueError(f"node_config sets non-private = true and {budget_keys}: a site either has a privacy "
                         f"budget or trains without DP, not both")
    if run_config["dp"]:
        raise ValueError("this site is non-private (node_config non-private = true) and the run asks dp = true: "
                         "a non-private site takes part in dp = false runs only")
    if "state-dir" in node_config and (state_dir(run_config, node_config, run_id="") / "ledger.jsonl").exists():
        raise ValueError(f"state-dir {node_config['state-dir']} holds a DP ledger: a non-private site needs its own, "
                         f"new state-dir")
    return None


def _number(config: Mapping[str, Any], key: str) -> float:
    try:
        return float(config[key])
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number, got {config[key]!r}") from None


def run_request(run_config: Mapping[str, Any], train_config: Mapping[str, Any], run_id: int | str) -> RunRequest:
    return RunRequest(run_id=str(run_id), run_epsilon=_number(run_config, "run-epsilon"),
                      num_rounds=int(run_config["num-server-rounds"]), local_epochs=int(run_config["local-epochs"]),
                      batch_size=int(run_config["batch-size"]),
                      count_noise_multiplier=_number(run_config, "count-noise-multiplier"),
                      init_checkpoint=str(train_config.get("init-checkpoint", "")))


def site_ledger(run_config: Mapping[str, Any], node_config: Mapping[str, Any], run_id: int | str) -> PrivacyLedger:
    """The site's ledger; a deployed site's data-dir is bound to its state dir on the way (one
    folder of records, one ledger: privacy/identity.py bind_data_dir)."""
    mirror = str(node_setting(node_config, "ledger-mirror-dir"))
    folder = state_dir(run_config, node_config, run_id)
    if is_deployed(node_config):
        from shared_model.privacy.identity import bind_data_dir

        bind_data_dir(str(node_config["data-dir"]), folder)
    return PrivacyLedger(folder / "ledger.jsonl", mirror_dir=Path(mirror).expanduser().absolute() if mirror else None)


def witnessed_head(train_config: Mapping[str, Any], site: str) -> tuple[str, int] | None:
    """The head of this site's ledger the server witnessed last (None: never witnessed)."""
    sites = list(train_config.get("witness-sites", []))
    if site not in sites:
        return None
    k = sites.index(site)
    return str(list(train_config["witness-heads"])[k]), int(list(train_config["witness-counts"])[k])


def local_training(run_config: Mapping[str, Any], train_config: Mapping[str, Any]) -> LocalTraining:
    shape = str(run_config["physical-batch-shape"])
    if shape == "auto":
        import torch

        shape = "fixed" if torch.cuda.is_available() else "variable"
    trainable, precision = str(run_config["trainable"]), str(run_config["precision"])
    return LocalTraining(local_epochs=int(run_config["local-epochs"]), batch_size=int(run_config["batch-size"]),
                         lr=float(run_config["lr"]), optimizer=str(run_config["optimizer"]),
                         max_physical_batch_size=run_config["max-physical-batch-size"],
                         proximal_mu=float(train_config.get("proximal-mu", 0.0)),
                         fixed_batch_shapes=shape == "fixed", trainable=trainable,
                         grad_sample_mode=resolve_grad_sample_mode(
                             str(run_config["grad-sample-mode"]), decoder=str(run_config["model-decoder"]),
                             trainable=trainable, precision=precision),
                         precision=precision, encoder_feature_cache=bool(run_config["encoder-feature-cache"]))


def vocab_release(query_config: Mapping[str, Any]) -> VocabRelease:
    """The private vocabulary release the server asks for (the site's budget decides whether it runs)."""
    return VocabRelease(noise_multiplier=_number(query_config, "vocab-noise-multiplier"),
                        max_words_per_record=int(query_config["vocab-max-words-per-record"]),
                        threshold_delta=_number(query_config, "vocab-delta"))

