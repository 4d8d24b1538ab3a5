import json
import os
import warnings

# One thread per process, set before torch loads and inherited by every process the suite starts (Flower's
# SuperLink, SuperNodes, ServerApp and ClientApps, Ray's actors): a run is several processes on 2 cores, and
# torch's default of one thread per core makes them wait on each other (a DP test ~4x slower beside any
# other busy process). An explicit OMP_NUM_THREADS is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from shared_model.model.config import CaptionerConfig

warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")


def tiny_config(**overrides) -> CaptionerConfig:
    """A captioner small enough for 2 CPU cores; dropout off so gradients are deterministic."""
    base = dict(vocab_size=30, image_size=32, cnn_channels=(8, 16), d_model=32, num_layers=2, num_heads=2,
                ffn_dim=32, dropout=0.0, max_len=10)
    base.update(overrides)
    return CaptionerConfig(**base)


def random_batch(config: CaptionerConfig, batch: int, *, seed: int = 0, lengths=None):
    """Images in [0, 1] and captions <start> w.. <end> <pad>.. of varied lengths."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, config.image_size, config.image_size, generator=g)
    captions = torch.zeros(batch, config.max_len, dtype=torch.long)
    for i in range(batch):
        n = lengths[i] if lengths else int(torch.randint(1, config.max_len - 1, (1,), generator=g))
        captions[i, 0] = 1
        captions[i, 1: n + 1] = torch.randint(4, config.vocab_size, (n,), generator=g)
        captions[i, n + 1] = 2
    return images, captions


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def flower_task():
    """The task identity Flower's runtime sets in a ServerApp/ClientApp process before Messages are
    built (run 1, task 1, the SuperLink's node 0); restored afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield TaskIdentity
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def tamper_ledger(path, kind: str) -> None:
    """Alter a ledger of >= 3 records the way an attacker or a crash would: edit (record 2's noise
    multiplier), delete (record 2), reorder (records 2 and 3), torn (record 3 cut halfway, no final
    newline), garbage (a non-JSON line appended)."""
    lines = path.read_text().splitlines()
    if kind == "edit":
        record = json.loads(lines[1])
        record["noise_multiplier"] = 5.0
        lines[1] = json.dumps(record, sort_keys=True)
    elif kind == "delete":
        del lines[1]
    elif kind == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
    elif kind == "torn":
        lines[2] = lines[2][: len(lines[2]) // 2]
    elif kind == "garbage":
        lines.append("not json")
    else:
        raise ValueError(f"unknown tampering {kind!r}")
    path.write_text("\n".join(lines) + ("" if kind == "torn" else "\n"))


def record_round(path, event, members, *, run_id="run-1", server_round=1, accountant="prv", target_epsilon=10.0,
                 target_delta=1e-5, retired=0):
    """Append one honest dp-sgd line to the ledger at `path`: `event` sampled from `members` (record
    IDs), with the largest per-record epsilon after it computed as the site computes it."""
    from shared_model.privacy.individual import projected_epsilons
    from shared_model.privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger(path)
    with ledger.transaction() as tx:
        histories = tx.histories()
        groups = list(histories.groups_of(members))
        eps = max(projected_epsilons(histories, groups, event, target_delta=target_delta,
                                     accountant=accountant).values())
        return tx.append_round(run_id=run_id, server_round=server_round, event=event, members=list(members),
                               retired=retired, max_grad_norm=1.0, target_epsilon=target_epsilon,
                               target_delta=target_delta, accountant=accountant, epsilon=eps)


def rewrite_ledger(path, edit) -> None:
    """Rewrite a ledger the way someone with write access to the state dir would, so that the hash
    chain still verifies: `edit(records)` changes the parsed lines in place (or returns new ones),
    then every prev_hash and hash is recomputed. Only the server's witness can tell the difference
    for an edit that keeps the ledger self-consistent."""
    from shared_model.privacy.ledger_lines import GENESIS, record_hash

    records = [json.loads(line) for line in path.read_text().splitlines()]
    records = edit(records) or records
    prev = GENESIS
    for r in records:
        r["prev_hash"] = prev
        r["hash"] = record_hash(r)
        prev = r["hash"]
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def pytest_configure(config):
    config.addinivalue_line("markers", "reads_run(name): the test reads the outputs of the module's run `name` "
                                       "(tests/test_federated.py starts the runs its selected tests read)")
