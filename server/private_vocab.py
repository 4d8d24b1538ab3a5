"""The private vocabulary round (run config `vocab-source = "private"`), before round 1.

The server sends one "query.vocab" message to every connected site with the release it asks for
(vocab-noise-multiplier, vocab-max-words-per-record, vocab-delta) and the witnessed ledger heads.
Each site checks its budget and releases, thresholded at the site, the noisy counts of the words of
its own records (client/client_app.py, shared_model/privacy/vocab_release.py), spending it in its
ledger as a "vocab-gaussian" line. The ledger head of every reply whose site name binds to its node
(server.nodes.bind_site), released or refused, is witnessed (server/witness.py). The server only
sums what the sites released (post-processing: no further privacy cost) and builds the vocabulary
of the run's fresh model from every released word, most counted first. The run fails when fewer
sites released than `min-train-nodes`, or when no word cleared any site's threshold.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from shared_model.data.vocab import Vocabulary
from shared_model.privacy.vocab_release import merge_releases

from .nodes import bind_site, recipients, reply_sender, wait_for_nodes
from .strategy import RoundFailed
from .update_checks import UpdateRejected

log = logging.getLogger("flwr")
MESSAGE_TYPE = "query.vocab"


class VocabRoundFailed(RoundFailed):
    """The vocabulary round could not build a vocabulary; `result` holds what the sites reported."""

    def __init__(self, message: str, result: "VocabRound") -> None:
        super().__init__(message)
        self.result = result


@dataclass
class VocabRound:
    vocab: Vocabulary
    node_site: dict[int, str] = field(default_factory=dict)  # Flower node id -> the site name it gave
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)  # what each site reported
    failures: list[dict[str, Any]] = field(default_factory=list)  # errors and refusals (round 0)

    def section(self) -> list[str]:
        """Markdown lines for the run summary."""
        lines = ["", "## Private vocabulary (before round 1)", "",
                 f"{len(self.vocab) - 4} words released by {len(self.sites)} site(s) (the sites' noisy counts, "
                 f"summed; docs/privacy.md).", "", "| site | words released | threshold | epsilon bound after |",
                 "|---|---|---|---|"]
        lines += [f"| {s} | {r['words-released']} | {r['threshold']:.1f} | {r['epsilon']:.4f} |"
                  for s, r in sorted(self.sites.items())]
        lines += [f"| {f['site']} | refused | - | {f['reason']} |" for f in self.failures]
        return lines

    def save(self, run_dir: Path) -> None:
        """<run>/private_vocab.json (per site) and <run>/vocab.json (fedcap-vocab/1)."""
        self.vocab.save(run_dir / "vocab.json")
        (run_dir / "private_vocab.json").write_text(json.dumps({"words": len(self.vocab) - 4, "sites": self.sites,
                                                                "failures": self.failures}, indent=2) + "\n")


def private_vocabulary(grid: Grid, run_config: Mapping[str, Any], *, run_id: str, witness=None) -> VocabRound:
    """Run the round; `witness` (server.witness.FederationState) sends and keeps the ledger heads."""
    rc = run_config
    needed = max(int(rc["min-train-nodes"]), int(rc["min-available-nodes"]))
    if (connected := wait_for_nodes(grid, needed, timeout=float(rc["node-wait-timeout"]))) < needed:
        raise VocabRoundFailed(
            f"private vocabulary: {connected} node(s) connected, fewer than the {needed} needed (min-train-nodes / "
            f"min-available-nodes), after node-wait-timeout {rc['node-wait-timeout']:g} s", VocabRound(Vocabulary([])))
    config = ConfigRecord({"vocab-noise-multiplier": float(rc["vocab-noise-multiplier"]),
                           "vocab-max-words-per-record": int(rc["vocab-max-words-per-record"]),
                           "vocab-delta": float(rc["vocab-delta"]),
                           **(witness.train_config() if witness is not None else {})})
    content = RecordDict({"config": config})
    messages = [Message(content=content, message_type=MESSAGE_TYPE, dst_node_id=node) for node in grid.get_node_ids()]
    result, releases = VocabRound(vocab=Vocabulary([])), []
    replies = list(grid.send_and_receive(messages, timeout=float(rc["round-timeout"])))
    sent_to = recipients(messages)
    for msg in replies:
        node = reply_sender(msg, sent_to)
        if msg.has_error():
            result.failures.append({"round": 0, "site": f"node-{node}", "node": node, "kind": "error",
                                    "reason": f"vocabulary round failed: {msg.error.reason}"})
            continue
        info = msg.content["site"]
        try:  # the training rounds' binding: one name per node, one node per name
            name = bind_site(result.node_site, node, str(info["name"]))
        except UpdateRejected as rejected:
            result.failures.append({"round": 0, "site": f"node-{node}", "node": node, "kind": "site-name",
                                    "reason": str(rejected)})
            continue
        if witness is not None:
            witness.observe_reply(name, info, run_id=str(run_id), server_round=0)
        if "refused" in info:
            result.failures.append({"round": 0, "site": name, "node": node, "kind": "vocab-refused",
                                    "reason": str(info["refused"])})
            continue
        words, counts = list(msg.content["vocab"]["words"]), list(msg.content["vocab"]["counts"])
        releases.append(dict(zip(map(str, words), map(float, counts))))
        metrics = msg.content["metrics"]
        result.sites[name] = {"words-released": len(words), "threshold": float(metrics["threshold"]),
                              "epsilon": float(metrics["epsilon"])}
    if witness is not None:
        witness.save()
    for f in result.failures:
        log.warning("private vocabulary: %s: %s", f["site"], f["reason"])
    if len(releases) < int(rc["min-train-nodes"]):
        raise VocabRoundFailed(f"private vocabulary: {len(releases)} site(s) released word counts, fewer than "
                               f"min-train-nodes {rc['min-train-nodes']}"
                               + "".join(f"; {f['site']}: {f['reason']}" for f in result.failures), result)
    words = merge_releases(releases)
    if not words:
        raise VocabRoundFailed(f"private vocabulary: no word cleared any site's threshold (vocab-noise-multiplier "
                               f"{rc['vocab-noise-multiplier']:g}, vocab-max-words-per-record "
                               f"{rc['vocab-max-words-per-record']}, vocab-delta {rc['vocab-delta']:g}): lower the "
                               f"noise or raise vocab-delta (up to the sites' target-delta)", result)
    result.vocab = Vocabulary(words)
    log.info("private vocabulary: %d words from %d site(s)", len(words), len(releases))
    return result
