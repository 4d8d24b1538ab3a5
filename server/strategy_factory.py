"""The inner Flower strategy a run names (`strategy` and its settings in the run config)."""

from __future__ import annotations

from typing import Any, Mapping

from flwr.serverapp.strategy import (Bulyan, FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, Krum,
                                     MultiKrum, Strategy)

from shared_model.run_settings import STRATEGIES


def build_strategy(run_config: Mapping[str, Any]) -> Strategy:
    """The inner Flower strategy named by `strategy` (run config validated by shared_model.run_settings)."""
    name = str(run_config["strategy"])
    common = dict(fraction_train=float(run_config["fraction-train"]),
                  fraction_evaluate=float(run_config["fraction-evaluate"]),
                  min_train_nodes=int(run_config["min-train-nodes"]),
                  min_evaluate_nodes=int(run_config["min-evaluate-nodes"]),
                  min_available_nodes=int(run_config["min-available-nodes"]))
    malicious = int(run_config["num-malicious-nodes"])
    if name in ("krum", "multikrum") and common["min_train_nodes"] < 2 * malicious + 3:
        raise ValueError(f"min-train-nodes must be >= 2 x num-malicious-nodes + 3 = {2 * malicious + 3} for {name}, "
                         f"got {common['min_train_nodes']}")
    if name == "bulyan" and common["min_train_nodes"] < 4 * malicious + 3:
        raise ValueError(f"min-train-nodes must be >= 4 x num-malicious-nodes + 3 = {4 * malicious + 3} for bulyan, "
                         f"got {common['min_train_nodes']}")
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=float(run_config["proximal-mu"]))
    if name == "fedavgm":  # the averaged update as a pseudo-gradient, with server-side momentum
        return FedAvgM(**common, server_learning_rate=1.0, server_momentum=float(run_config["server-momentum"]))
    if name == "fedadam":
        return FedAdam(**common, eta=float(run_config["server-lr"]))
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=float(run_config["trimmed-beta"]))
    if name == "krum":
        return Krum(**common, num_malicious_nodes=malicious)
    if name == "multikrum":
        return MultiKrum(**common, num_malicious_nodes=malicious,
                         num_nodes_to_select=int(run_config["multikrum-select"]))
    if name == "bulyan":
        return Bulyan(**common, num_malicious_nodes=malicious)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
