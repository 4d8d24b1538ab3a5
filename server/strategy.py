"""Strategy construction and FedCap's server-side add-on: a wrapper that validates site replies,
sets budget-exhausted sites aside, tracks each site's reported epsilon and delegates the rest."""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

log = logging.getLogger("flwr")  # Flower's handler prints it
STRATEGIES = ("fedavg", "fedprox", "fedadam")


class NoSiteCanTrain(RuntimeError):
    """Every site that answered this round refused to train: their budgets are spent."""


def build_strategy(run_config: Mapping[str, Any]) -> Strategy:
    name = str(run_config.get("strategy", "fedavg"))
    common = dict(fraction_train=float(run_config["fraction-train"]),
                  fraction_evaluate=float(run_config["fraction-evaluate"]),
                  min_train_nodes=int(run_config["min-train-nodes"]),
                  min_evaluate_nodes=int(run_config["min-evaluate-nodes"]),
                  min_available_nodes=int(run_config["min-available-nodes"]))
    for key in ("fraction-train", "fraction-evaluate"):
        if not 0.0 <= float(run_config[key]) <= 1.0:
            raise ValueError(f"{key} must be in [0, 1], got {run_config[key]}")
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=float(run_config["proximal-mu"]))
    if name == "fedadam":
        return FedAdam(**common, eta=float(run_config["server-lr"]))
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")


def check_update(arrays: ArrayRecord, reference: Mapping[str, np.ndarray]) -> None:
    """Raise ValueError naming the first array that is missing, unexpected, mis-shaped or non-finite."""
    keys = set(arrays.keys())
    if keys != set(reference):
        missing, extra = sorted(set(reference) - keys), sorted(keys - set(reference))
        raise ValueError(f"update has missing arrays {missing[:3]} / unexpected arrays {extra[:3]}")
    for key, ref in reference.items():
        value = arrays[key].numpy()
        if value.shape != ref.shape:
            raise ValueError(f"update array {key!r} has shape {value.shape}, expected {ref.shape}")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise ValueError(f"update array {key!r} has non-finite values")


def _site_of(msg: Message) -> str:
    """The site name a reply carries (node_config site-name or partition), else its node id."""
    return str(msg.content["site"]["name"]) if "site" in msg.content else f"node-{msg.metadata.src_node_id}"


class FedCapStrategy(Strategy):
    """Wraps any Flower strategy. Before delegating `aggregate_train` it drops replies that are
    budget-exhausted refusals (no weights) or malformed updates, logging each with its reason, and
    records each site's reported cumulative epsilon. Raises NoSiteCanTrain when every reply of a
    round was a budget refusal. Federated evaluation: each site's held-out metrics are passed to
    `on_evaluate(server_round, per_site, aggregated)` beside the inner strategy's weighted mean."""

    def __init__(self, inner: Strategy, vocab_words: list[str], on_evaluate=None, witness=None,
                 run_id: str = "") -> None:
        self.on_evaluate = on_evaluate
        self.witness = witness  # server.witness.FederationState, or None
        self.run_id = run_id
        self.inner = inner
        self.vocab_words = vocab_words
        self.reference: dict[str, np.ndarray] = {}
        self.site_epsilon: dict[str, float] = {}
        self.exhausted: set[str] = set()
        self.rejected: list[dict[str, Any]] = []

    def summary(self) -> None:
        self.inner.summary()

    def _with_vocab(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        for m in messages:  # one shared ConfigRecord: set once
            m.content["config"]["vocab"] = self.vocab_words
            break
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.reference = {k: v.numpy() for k, v in arrays.items()}
        messages = self._with_vocab(self.inner.configure_train(server_round, arrays, config, grid))
        if self.witness is not None:
            for m in messages[:1]:  # one shared ConfigRecord
                m.content["config"].update(self.witness.train_config())
        return messages

    def _witness(self, server_round: int, site: str, msg: Message) -> None:
        info = msg.content["site"] if "site" in msg.content else {}
        if self.witness is None or "ledger-head" not in info or info.get("ledger-ephemeral", False):
            return
        self.witness.observe(site, head=str(info["ledger-head"]), records=int(info["ledger-records"]),
                             run_id=self.run_id, server_round=server_round)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return self._with_vocab(self.inner.configure_evaluate(server_round, arrays, config, grid))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        kept, refused = [], 0
        for msg in replies:
            if msg.has_error():
                kept.append(msg)  # the inner strategy logs error replies
                continue
            site = _site_of(msg)
            self._witness(server_round, site, msg)
            metrics = msg.content["metrics"] if "metrics" in msg.content else {}
            if "epsilon" in metrics:
                self.site_epsilon[site] = float(metrics["epsilon"])
            if metrics.get("budget-exhausted", 0):
                refused += 1
                self.exhausted.add(site)
                log.warning("round %d: %s refused to train: %s", server_round, site,
                            msg.content["site"].get("budget-exhausted", "budget exhausted"))
                continue
            try:
                if len(msg.content.array_records) != 1:
                    raise ValueError(f"expected one ArrayRecord, got {len(msg.content.array_records)}")
                check_update(msg.content["arrays"], self.reference)
                examples = metrics.get("num-examples", -1)
                if not (isinstance(examples, (int, float)) and examples > 0 and math.isfinite(examples)):
                    raise ValueError(f"num-examples must be > 0, got {examples}")
            except (ValueError, KeyError, TypeError) as e:
                log.warning("round %d: rejected the update of %s: %s", server_round, site, e)
                self.rejected.append({"round": server_round, "site": site, "reason": str(e)})
                continue
            kept.append(msg)
        if self.witness is not None:
            self.witness.save()
        if refused and not any(not m.has_error() for m in kept):
            raise NoSiteCanTrain(f"round {server_round}: every site that answered has exhausted its privacy budget")
        return self.inner.aggregate_train(server_round, kept)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        per_site: dict[str, dict[str, float]] = {}
        for msg in replies:
            if msg.has_error() or "metrics" not in msg.content:
                continue
            site = _site_of(msg)
            per_site[site] = {k: float(v) for k, v in msg.content["metrics"].items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool)}
        aggregated = self.inner.aggregate_evaluate(server_round, replies)
        if self.on_evaluate is not None:
            self.on_evaluate(server_round, per_site, dict(aggregated) if aggregated else {})
        return aggregated
