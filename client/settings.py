"""Where a site's settings come from: run_config (the federation's plan), node_config (the site's
identity, data, state folder and its own privacy budget, which the server cannot override)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from shared_model.data import CaptionSet
from shared_model.run_folder import run_dir

from .trainer import LocalTraining, SitePrivacy


def site_name(node_config: Mapping[str, Any]) -> str:
    if "site-name" in node_config:
        return str(node_config["site-name"])
    if "partition-id" in node_config:
        return f"site-{int(node_config['partition-id'])}"
    raise ValueError("node_config has neither 'site-name' nor 'partition-id'")


def state_dir(run_config: Mapping[str, Any], node_config: Mapping[str, Any], run_id: int | str) -> Path:
    """Deployment: node_config `state-dir`. Simulation: `site-state-dir`/<site> when set (state that
    outlives runs, like a real site's disk), else <run folder>/sites/<site>."""
    if "state-dir" in node_config:
        return Path(str(node_config["state-dir"])).expanduser().absolute()
    shared = str(run_config.get("site-state-dir", ""))
    base = Path(shared).expanduser().absolute() if shared else run_dir(run_config, run_id) / "sites"
    return base / site_name(node_config)


def site_data(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> tuple[CaptionSet, CaptionSet]:
    from .site_data import deployed_site_data, simulated_site_data

    if "data-dir" in node_config:
        return deployed_site_data(node_config, image_size=int(run_config["image-size"]))
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise ValueError("node_config needs 'data-dir' (deployment) or 'partition-id' and 'num-partitions' "
                         "(simulation)")
    return simulated_site_data(run_config, partition_id=int(node_config["partition-id"]),
                               num_partitions=int(node_config["num-partitions"]))


def site_privacy(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> SitePrivacy | None:
    """The site's budget comes from node_config when it has one (deployment), else from run_config
    (simulation). A site with its own budget always trains privately, whatever `dp` says."""
    own_budget = "target-epsilon" in node_config
    if not own_budget and not run_config.get("dp", True):
        return None
    source = node_config if own_budget else run_config
    noise = float(run_config.get("noise-multiplier", 0.0))
    return SitePrivacy(target_epsilon=float(source["target-epsilon"]),
                       target_delta=float(source.get("target-delta", run_config["target-delta"])),
                       max_grad_norm=float(run_config["max-grad-norm"]), noise_multiplier=noise or None,
                       accountant=str(run_config.get("accountant", "prv")))


def local_training(run_config: Mapping[str, Any], train_config: Mapping[str, Any]) -> LocalTraining:
    return LocalTraining(local_epochs=int(run_config["local-epochs"]), batch_size=int(run_config["batch-size"]),
                         lr=float(run_config["lr"]),
                         max_physical_batch_size=int(run_config["max-physical-batch-size"]),
                         proximal_mu=float(train_config.get("proximal-mu", 0.0)))
