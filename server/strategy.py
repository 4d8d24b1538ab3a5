"""FedCap's server-side add-on: a wrapper around the Flower strategy (server/strategy_factory.py) that checks every site reply
against the global model (server/update_checks.py), binds each reply to the node that sent it,
witnesses the ledger head of every bound reply (server/witness.py), sets budget-exhausted sites
aside, records every site's failures and reported budget, fails a round in which fewer sites
trained than `min-train-nodes`, and delegates the rest."""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from shared_model.privacy.reply import BUDGET_METRICS, TRAIN_METRICS

from .nodes import bind_site, recipients, reply_sender, wait_for_nodes
from .strategy_factory import build_strategy
from .update_checks import (UpdateRejected, capped_weights, check_arrays, check_metrics, norm_violations,
                            update_norm)

log = logging.getLogger("flwr")  # Flower's handler prints it


class RoundFailed(RuntimeError):
    """Fewer sites trained in a round than `min-train-nodes`: the run stops, failed."""


class NoSiteCanTrain(RoundFailed):
    """Every site that answered this round refused to train: their budgets are spent."""


class FedCapStrategy(Strategy):
    """Wraps any Flower strategy. `aggregate_train` first sorts the replies: error replies (a
    ClientApp that raised, a site that crashed) and budget refusals are recorded per site with their
    reason; every other reply is checked (update_checks) and rejected for that site only when it
    fails. Each reply's site is the name the replying node (its Flower node id) first gave; a node
    that claims another node's site name, or a new name, is rejected. The ledger head of every
    reply whose site name is bound (trained, refused or rejected by a later check) goes to the
    `witness`: a spend the server saw is never forgotten. Fewer trained sites than
    `min-train-nodes` raise RoundFailed (NoSiteCanTrain when all refused for budget); otherwise the
    valid replies, with capped weights, go to the inner strategy, whose result keeps the model's
    dtype. Federated evaluation: each site's metrics are passed to `on_evaluate(server_round,
    per_site, aggregated)` beside the inner strategy's weighted mean."""

    def __init__(self, inner: Strategy, vocab_words: list[str], on_evaluate=None, *, max_update_norm: float = 0.0,
                 max_update_norm_ratio: float = 10.0, max_num_examples: int = 10_000_000,
                 examples_cap_ratio: float = 4.0, node_wait_timeout: float = 600.0,
                 train_metrics: tuple[str, ...] = TRAIN_METRICS, witness=None, run_id: str = "",
                 evaluate_in_train: bool = False, num_rounds: int = 0) -> None:
        self.on_evaluate = on_evaluate
        # federated evaluation inside the train messages (of the model each site received), and one
        # evaluate message only after the last round: one message per site and round, not two
        self.evaluate_in_train = bool(evaluate_in_train) and float(getattr(inner, "fraction_evaluate", 1.0)) > 0
        self.num_rounds = int(num_rounds)
        self.witness = witness  # server.witness.FederationState, or None
        self.run_id = str(run_id)
        self.inner = inner
        self.vocab_words = vocab_words
        self.max_update_norm, self.max_update_norm_ratio = float(max_update_norm), float(max_update_norm_ratio)
        self.max_num_examples, self.examples_cap_ratio = int(max_num_examples), float(examples_cap_ratio)
        self.train_metrics = tuple(train_metrics)
        self.node_wait_timeout = float(node_wait_timeout)
        self.min_train_nodes = int(getattr(inner, "min_train_nodes", 1))
        self.min_nodes = max(self.min_train_nodes, int(getattr(inner, "min_available_nodes", 1)))
        self.reference: dict[str, np.ndarray] = {}
        self.node_site: dict[int, str] = {}  # Flower node id -> the site name it first gave
        self.site_budget: dict[str, dict[str, float]] = {}  # as each site reported it
        self.exhausted: set[str] = set()
        self.failures: list[dict[str, Any]] = []  # every error, refusal and rejection: round, site, kind, reason
        self.trained_rounds: list[int] = []
        self.sent: dict[int, list[Message]] = {}  # round -> its train messages, until aggregated
        self.sent_evaluate: list[Message] = []
        self.recipients: dict[str, int] = {}  # message id -> the node it went to (a SuperLink error names no node)
        self.timings: dict[int, dict[str, dict[str, float]]] = {}  # round -> site -> where its message's time went

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], vocab_words: list[str], on_evaluate=None, *,
                        witness=None, run_id: str = "") -> "FedCapStrategy":
        return cls(build_strategy(run_config), vocab_words, on_evaluate, witness=witness, run_id=run_id,
                   max_update_norm=float(run_config["max-update-norm"]),
                   max_update_norm_ratio=float(run_config["max-update-norm-ratio"]),
                   max_num_examples=int(run_config["max-num-examples"]),
                   examples_cap_ratio=float(run_config["examples-cap-ratio"]),
                   node_wait_timeout=float(run_config["node-wait-timeout"]),
                   evaluate_in_train=bool(run_config["evaluate-in-train"]),
                   num_rounds=int(run_config["num-server-rounds"]))

    @property
    def site_epsilon(self) -> dict[str, float]:
        return {s: b["epsilon"] for s, b in self.site_budget.items() if "epsilon" in b}

    def summary(self) -> None:
        self.inner.summary()

    def _with_vocab(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        for m in messages:  # one shared ConfigRecord: set once
            m.content["config"]["vocab"] = self.vocab_words
            break
        return messages

    def _connected(self, grid: Grid, needed: int) -> int:
        return wait_for_nodes(grid, needed, timeout=self.node_wait_timeout)

    def expect(self, arrays: ArrayRecord) -> None:
        """The global model this round's replies are checked against."""
        self.reference = {k: v.numpy() for k, v in arrays.items()}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.expect(arrays)
        if (connected := self._connected(grid, self.min_nodes)) < self.min_nodes:
            raise RoundFailed(f"round {server_round}: {connected} node(s) connected, fewer than the {self.min_nodes} "
                              f"needed (min-train-nodes / min-available-nodes), after node-wait-timeout "
                              f"{self.node_wait_timeout:g} s")
        messages = self._with_vocab(self.inner.configure_train(server_round, arrays, config, grid))
        self.sent[server_round] = messages  # their message ids are set when the Grid pushes them
        for m in messages[:1]:  # one ConfigRecord shared by every message
            if self.witness is not None:  # each site finds its own head
                m.content["config"].update(self.witness.train_config())
            if self.evaluate_in_train:
                m.content["config"]["evaluate-received"] = True
        return messages

    def _witness(self, server_round: int, site: str, msg: Message) -> None:
        """Keep the ledger head `site` reported, whatever becomes of the reply (not for simulated
        sites whose ledger is per run)."""
        if self.witness is not None and "site" in msg.content:
            self.witness.observe_reply(site, msg.content["site"], run_id=self.run_id, server_round=server_round)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        if self.evaluate_in_train and server_round < self.num_rounds:
            return []  # round r's global model is evaluated in round r+1's train messages
        needed = max(int(getattr(self.inner, "min_evaluate_nodes", 0)), self.min_nodes)
        if getattr(self.inner, "fraction_evaluate", 1.0) > 0 and (connected := self._connected(grid, needed)) < needed:
            log.warning("round %d: federated evaluation skipped: %d node(s) connected, %d needed, after "
                        "node-wait-timeout %g s", server_round, connected, needed, self.node_wait_timeout)
            return []
        messages = self._with_vocab(self.inner.configure_evaluate(server_round, arrays, config, grid))
        self.sent_evaluate = messages
        return messages

    # -- who sent a reply --------------------------------------------------------------------
    def _sender(self, msg: Message) -> int:
        return reply_sender(msg, self.recipients)

    def _node_label(self, msg: Message) -> str:
        node = self._sender(msg)
        return self.node_site.get(node, f"node-{node}")

    def _site_of(self, msg: Message) -> str:
        """The site bound to the replying node; UpdateRejected when the reply claims another name."""
        claimed = None
        if "site" in msg.content and "name" in msg.content["site"]:
            claimed = str(msg.content["site"]["name"])
        return bind_site(self.node_site, msg.metadata.src_node_id, claimed)

    def _fail(self, server_round: int, site: str, kind: str, reason: str, node: int) -> None:
        self.failures.append({"round": server_round, "site": site, "node": node, "kind": kind, "reason": reason})

    # -- training ----------------------------------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies, sent = list(replies), self.sent.pop(server_round, [])
        candidates: dict[str, tuple[Message, dict[str, np.ndarray], int]] = {}
        evaluations: list[tuple[str, int, MetricRecord]] = []
        refused = 0
        self.recipients = recipients(sent)
        answered = {self._sender(m) for m in replies}
        for node in sorted({m.metadata.dst_node_id for m in sent} - answered):
            reason = "no reply within round-timeout (the node crashed, disconnected or is still training)"
            site = self.node_site.get(node, f"node-{node}")
            log.warning("round %d: %s (node %d): %s", server_round, site, node, reason)
            self._fail(server_round, site, "no reply", reason, node)
        for msg in replies:
            node = self._sender(msg)
            if msg.has_error():
                site = self._node_label(msg)
                reason = f"error code {msg.error.code}: {msg.error.reason}"
                log.warning("round %d: %s (node %d) failed: %s", server_round, site, node, reason)
                self._fail(server_round, site, "error", reason, node)
                continue
            try:
                site = self._site_of(msg)
            except UpdateRejected as e:  # not witnessed: the head may be another site's
                self._reject(server_round, self._node_label(msg), node, e)
                continue
            self._witness(server_round, site, msg)  # refused, rejected below or trained: its spend is seen
            if self.evaluate_in_train and "evaluate" in msg.content:
                evaluations.append((site, node, msg.content["evaluate"]))
            metrics = msg.content["metrics"] if "metrics" in msg.content else MetricRecord()
            if metrics.get("budget-exhausted", 0):
                self._record_budget(site, metrics)
                refused += 1
                self.exhausted.add(site)
                reason = str(msg.content["site"].get("budget-exhausted", "budget exhausted")) \
                    if "site" in msg.content else "budget exhausted"
                log.warning("round %d: %s refused to train: %s", server_round, site, reason)
                self._fail(server_round, site, "refused", reason, node)
                continue
            try:
                if len(msg.content.array_records) != 1 or "arrays" not in msg.content:
                    raise UpdateRejected("arrays", len(msg.content.array_records),
                                         f"expected one ArrayRecord 'arrays', got {list(msg.content.array_records)}")
                if site in candidates:
                    raise UpdateRejected("duplicate", site, f"a second reply for {site} in one round")
                examples = check_metrics(metrics, max_num_examples=self.max_num_examples,
                                         expected=self.train_metrics)
                arrays = check_arrays(msg.content["arrays"], self.reference)
            except UpdateRejected as e:
                self._reject(server_round, site, node, e)
                continue
            candidates[site] = (msg, arrays, examples)
        norms = {site: update_norm(arrays, self.reference) for site, (_, arrays, _) in candidates.items()}
        for site, reason in norm_violations(norms, max_norm=self.max_update_norm,
                                            max_ratio=self.max_update_norm_ratio).items():
            self._reject(server_round, site, candidates.pop(site)[0].metadata.src_node_id,
                         UpdateRejected("update-norm", norms[site], reason))
        for site, (msg, _, _) in candidates.items():  # only from replies that passed every check
            self._record_budget(site, msg.content["metrics"])
            self._record_timing(server_round, site, msg)
        if self.witness is not None:
            self.witness.save()
        if evaluations:  # each site's evaluation of the model it received: round - 1's global model
            self._evaluated(server_round - 1, evaluations)
        if len(candidates) < self.min_train_nodes:
            failed = [f for f in self.failures if f["round"] == server_round]
            detail = "; ".join(f"{f['site']} {f['kind']}: {f['reason']}" for f in failed) or "no replies"
            error = NoSiteCanTrain if refused and refused == len(replies) else RoundFailed
            raise error(f"round {server_round}: {len(candidates)} site(s) trained, fewer than min-train-nodes "
                        f"{self.min_train_nodes} ({detail})")
        weights = capped_weights({s: e for s, (_, _, e) in candidates.items()}, cap_ratio=self.examples_cap_ratio)
        kept = []
        for site, (msg, _, _) in candidates.items():
            msg.content["metrics"]["num-examples"] = weights[site]  # the weight the inner strategy uses
            if "evaluate" in msg.content:  # reported above; the inner strategy expects one MetricRecord
                del msg.content["evaluate"]
            kept.append(msg)
        arrays, metrics = self.inner.aggregate_train(server_round, kept)
        if arrays is None:
            raise RoundFailed(f"round {server_round}: the {type(self.inner).__name__} strategy aggregated nothing")
        self.trained_rounds.append(server_round)
        return self._as_model_dtype(arrays), metrics

    def _reject(self, server_round: int, site: str, node: int, e: UpdateRejected) -> None:
        log.warning("round %d: rejected the update of %s (node %d): check %s, value %r: %s", server_round, site,
                    node, e.check, e.value, e)
        self._fail(server_round, site, "rejected", f"{e.check} check failed: {e}", node)

    def _record_timing(self, server_round: int, site: str, msg: Message) -> None:
        info = msg.content["site"] if "site" in msg.content else {}
        times = {k[5:]: float(v) for k, v in info.items() if k.startswith("time-") and isinstance(v, (int, float))}
        if times:
            self.timings.setdefault(server_round, {})[site] = times

    def _record_budget(self, site: str, metrics: MetricRecord) -> None:
        for key in BUDGET_METRICS:
            value = metrics.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.site_budget.setdefault(site, {})[key] = float(value)

    def _as_model_dtype(self, arrays: ArrayRecord) -> ArrayRecord:
        """The aggregate in the global model's dtypes (a median or weighted mean may promote)."""
        out = ArrayRecord()
        for key, ref in self.reference.items():
            value = arrays[key].numpy()
            out[key] = Array(np.ascontiguousarray(value.astype(ref.dtype, copy=False)))
        return out

    # -- evaluation --------------------------------------------------------------------------
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        self.recipients = recipients(self.sent_evaluate)
        self.sent_evaluate = []
        checked = []
        for msg in replies:
            node = self._sender(msg)
            if msg.has_error():
                reason = f"error code {msg.error.code}: {msg.error.reason}"
                log.warning("round %d: evaluation at %s (node %d) failed: %s", server_round, self._node_label(msg),
                            node, reason)
                self._fail(server_round, self._node_label(msg), "evaluate-error", reason, node)
                continue
            if "metrics" not in msg.content and "site" in msg.content and \
                    msg.content["site"].get("held-out-metrics") == "withheld":
                continue  # a DP site that does not send held-out metrics (its node_config's choice)
            try:
                checked.append((self._site_of(msg), node, msg.content.get("metrics")))
            except UpdateRejected as e:
                self._reject(server_round, self._node_label(msg), node, e)
        return self._evaluated(server_round, checked)

    def _evaluated(self, server_round: int, replies: list[tuple[str, int, MetricRecord | None]]
                   ) -> MetricRecord | None:
        """Each site's held-out metrics (site, node, MetricRecord: an evaluate reply's "metrics", a
        train reply's "evaluate"), checked, weighted by num-examples, reported."""
        per_site, records = {}, []
        for site, node, metrics in replies:
            examples = metrics.get("num-examples") if metrics is not None else None
            if not isinstance(examples, (int, float)) or not 1 <= examples <= self.max_num_examples:
                self._reject(server_round, site, node,
                             UpdateRejected("num-examples", examples, "evaluation without a valid num-examples"))
                continue
            per_site[site] = {k: float(v) for k, v in metrics.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool)}
            records.append(RecordDict({"metrics": metrics}))
        if not records:
            return None
        aggregate = getattr(self.inner, "evaluate_metrics_aggr_fn", aggregate_metricrecords)
        aggregated = aggregate(records, getattr(self.inner, "weighted_by_key", "num-examples"))
        if self.on_evaluate is not None:
            self.on_evaluate(server_round, per_site, dict(aggregated) if aggregated else {})
        return aggregated
