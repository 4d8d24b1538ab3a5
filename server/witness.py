"""The server's witness of each site's ledger head, kept in a federation state file across runs.

Every reply of a site with a budget and a persistent ledger carries its ledger head (last line's
hash, number of lines): a train reply whose update is aggregated, one rejected by an update check,
a budget refusal, a private-vocabulary reply (released or refused); an error reply carries none.
The server keeps the latest head of every site from every such reply whose site name is bound to
the replying node (server.nodes.bind_site: a node claiming another node's site never moves that
site's head), whatever became of the reply, so no spent or recorded ledger line escapes the
witness. A head with fewer lines than the witnessed one, or a malformed one, is ignored with a
warning. The server sends all heads with the next train and vocabulary messages; a site whose
ledger does not hold its witnessed head (deleted, restored from an older backup, rewritten) refuses
to train. The heads are hashes: they reveal nothing about the records. Simulated sites whose ledger
lives inside the run folder (`ledger-ephemeral`) are new in every run by design and not witnessed.

The file (shared_model/privacy/federation_state.py, which alone reads and writes it) is written after the vocabulary round and after every training
round's replies are sorted (before a round that failed stops the run). `fedcap audit
--federation-state` checks every ledger against it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from shared_model.privacy.federation_state import load_federation_state, save_federation_state
from shared_model.util import utc_now

log = logging.getLogger("flwr")


def federation_state_path(run_config: Mapping[str, Any]) -> Path:
    """`federation-state`, or <output-dir>/federation-state.json: beside the run folders, so it
    outlives every run."""
    path = str(run_config["federation-state"])
    return Path(path).expanduser().absolute() if path else \
        Path(str(run_config["output-dir"])).expanduser().absolute() / "federation-state.json"


class FederationState:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.sites = load_federation_state(self.path)

    def train_config(self) -> dict[str, list]:
        """The witnessed heads as ConfigRecord lists, for every site (each finds its own)."""
        names = sorted(self.sites)
        return {"witness-sites": names, "witness-heads": [self.sites[s]["head"] for s in names],
                "witness-counts": [int(self.sites[s]["lines"]) for s in names]}

    def observe(self, site: str, *, head: str, lines: int, run_id: str, server_round: int) -> None:
        before = self.sites.get(site)
        if before is not None and lines < before["lines"]:
            log.warning("%s reported a ledger of %d lines, fewer than the %d witnessed: ignored", site, lines,
                        before["lines"])
            return
        self.sites[site] = {"head": head, "lines": int(lines), "run_id": str(run_id),
                            "server_round": int(server_round), "time": utc_now()}

    def observe_reply(self, site: str, info, *, run_id: str, server_round: int) -> None:
        """Keep the ledger head a reply's "site" record reports, whether or not the reply is used;
        not for simulated sites whose ledger is per run (ledger-ephemeral), nor for replies without
        a head. The caller has bound `site` to the replying node."""
        if "ledger-head" not in info or info.get("ledger-ephemeral", False):
            return
        head, lines = info["ledger-head"], info.get("ledger-lines")
        if not isinstance(head, str) or not isinstance(lines, int) or isinstance(lines, bool) or lines < 0:
            log.warning("%s reported a malformed ledger head %r of %r lines: ignored", site, head, lines)
            return
        self.observe(site, head=head, lines=lines, run_id=run_id, server_round=server_round)

    def save(self) -> None:
        save_federation_state(self.path, self.sites)
