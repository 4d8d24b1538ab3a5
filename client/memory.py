"""Give a simulation actor's memory back after each message.

Flower's simulation runs every site's messages in a few long-lived Ray actors. Without help, an
actor's resident memory grows with the messages it serves: tensors freed in reference cycles
(Opacus's hooks around each message's fresh model) wait for the cyclic collector, and glibc keeps
freed heap pages of the variable-sized Poisson batches. `release_memory` is a ClientApp mod that,
after a simulated site's message, collects cycles and asks glibc to return free pages
(`malloc_trim`). A deployed site's ClientApp process exits after its message, so it is skipped."""

from __future__ import annotations

import ctypes
import gc
import sys

from flwr.app import Context, Message


def _malloc_trim() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
            pass


def release_memory(msg: Message, context: Context, call_next) -> Message:
    reply = call_next(msg, context)
    if "data-dir" not in context.node_config:  # simulated: the actor lives on (client.settings.is_deployed)
        gc.collect()
        _malloc_trim()
    return reply
