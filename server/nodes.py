"""Which node a reply is from and which site a node is: waiting for nodes, the recipients of sent
messages, a reply's sender, and the binding of a site name to the node that first claimed it."""

from __future__ import annotations

import time
from typing import Iterable, Mapping

from flwr.app import Message
from flwr.serverapp import Grid

from .update_checks import UpdateRejected


def wait_for_nodes(grid: Grid, needed: int, *, timeout: float) -> int:
    """Poll until `needed` nodes are connected or `timeout` s passed (Flower's own sampling would
    wait forever); the number connected."""
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < needed and time.monotonic() < deadline:
        time.sleep(1.0)
    return connected


def recipients(messages: Iterable[Message]) -> dict[str, int]:
    """Message id -> the node it went to (ids are set when the Grid pushes the messages)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}


def reply_sender(msg: Message, sent_to: Mapping[str, int]) -> int:
    """The node a reply is from; for an error the SuperLink made on a node's behalf (node
    unavailable, message expired: its source is the SuperLink), the node the message went to."""
    if msg.has_error() and msg.metadata.reply_to_message_id in sent_to:
        return sent_to[msg.metadata.reply_to_message_id]
    return msg.metadata.src_node_id


def bind_site(node_site: dict[int, str], node: int, claimed: str | None) -> str:
    """The site name of Flower node `node`, bound at its first reply of the run (in `node_site`);
    UpdateRejected when the node later claims another name, or claims a name another node holds
    (a node impersonating a site would otherwise overwrite that site's witnessed ledger head)."""
    bound = node_site.get(node)
    if bound is not None:
        if claimed is not None and claimed != bound:
            raise UpdateRejected("site-name", claimed, f"node {node} is site {bound!r} but claims {claimed!r}")
        return bound
    name = claimed or f"node-{node}"
    owner = next((n for n, s in node_site.items() if s == name), None)
    if owner is not None:
        raise UpdateRejected("site-name", claimed, f"node {node} claims site {name!r}, which is node {owner}")
    node_site[node] = name
    return name
