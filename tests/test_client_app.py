"""The ClientApp checks its node_config before anything else: a site with a bad setting answers with
an error that names the key and the value (Flower turns the exception into the error reply the
server records in summary.md)."""

import pytest
from flwr.app import Context, Message, RecordDict

from client.client_app import app
from runners.flower_runtime import default_run_config

BAD_SITES = [
    ({"site-name": "a", "data-dir": "/d", "target-epsilon": -1.0}, "target-epsilon must be a number > 0, got -1.0"),
    ({"site-name": "a", "data-dir": "/d", "target-delta": 1.5}, "target-delta must be a number in (0, 1), got 1.5"),
    ({"site-name": "a", "data-dir": "/d", "dataset-format": "parquet"}, "dataset-format must be one of"),
    ({"site-name": "a", "data-dir": "/d", "epsilon": 8.0}, "unknown node_config key 'epsilon'"),
    ({"partition-id": 3, "num-partitions": 2}, "partition-id must be < num-partitions (2), got 3"),
]


@pytest.mark.parametrize("message_type", ["train", "evaluate"])
@pytest.mark.parametrize("node_config, expected", BAD_SITES, ids=[m.split(" must")[0] for _, m in BAD_SITES])
def test_a_bad_node_config_is_a_named_error_before_any_work(flower_task, node_config, expected, message_type):
    # no arrays, no vocabulary, no data folder: the handler must fail on the node_config first
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                      run_config=default_run_config())
    message = Message(content=RecordDict(), dst_node_id=7, message_type=message_type)
    with pytest.raises((TypeError, ValueError)) as err:
        app(message=message, context=context)
    assert expected in str(err.value)


def test_simulated_sites_give_freed_heap_memory_back_after_a_message():
    """The release_memory mod: glibc keeps freed heap chunks in the process (as a simulation actor's
    memory grew message after message); after a simulated site's message the mod trims them.
    Measured in a fresh interpreter: how much a free returns depends on the heap's history (glibc
    raises its trim threshold after large mmapped frees), which a test process shares with every
    test before it."""
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("malloc_trim is glibc's")
    out = subprocess.run([sys.executable, "-c", MEASURE_RELEASE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    simulated, deployed = (float(v) for v in out.stdout.split())
    assert simulated < 190  # simulated: the freed half trimmed (128 MB still held)
    assert deployed > 200  # deployed: left to the process's exit


MEASURE_RELEASE = """
import client.settings  # loaded before measuring (release_memory imports it after a message)
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from client.memory import release_memory

TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # as conftest's flower_task

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

keep, drop = [], []

def handler(msg, context):  # a message that keeps 128 MB and frees 128 MB of chunks in between
    for i in range(4000):
        (keep if i % 2 else drop).append(bytearray(64 * 1024))
    drop.clear()
    return msg

def released(node_config):
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
    before = rss_mb()
    message = Message(content=RecordDict(), dst_node_id=7, message_type="train")
    assert release_memory(message, context, handler) is message
    after = rss_mb()  # 128 MB still held in `keep`, 128 MB freed in between
    keep.clear()  # the next call starts from the same state
    return after - before

print(released({"partition-id": 0, "num-partitions": 2}), released({"site-name": "a", "data-dir": "/d"}))
"""
