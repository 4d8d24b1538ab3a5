"""Give a simulation actor's memory back after each message.

Flower's simulation runs every site's messages in a few long-lived Ray actors. glibc keeps the heap
pages freed after a message (the variable-sized Poisson batches and Opacus's per-sample gradients
of each message's fresh model) for reuse, so an actor's resident memory grew with every message it
served. `release_memory` is a ClientApp mod that, after a simulated site's message, asks glibc
to return free pages to the system (`malloc_trim`); what that saved in the 16-site run:
docs/results.md, "Scale: 16 and 64 simulated sites". A deployed site's ClientApp process
exits after its message, so it is skipped there."""

from __future__ import annotations

import ctypes
import sys

from flwr.app import Context, Message


def malloc_trim() -> bool:
    """Return glibc's free heap pages to the system; False where libc is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    return True


def release_memory(msg: Message, context: Context, call_next) -> Message:
    reply = call_next(msg, context)
    from .settings import is_deployed  # after the message: its imports (torch) are loaded by then

    if not is_deployed(context.node_config):  # simulated: the actor lives on
        malloc_trim()
    return reply
