"""Node faults on a real loopback deployment (issue 12, item 4): a SuperNode killed mid-run, the same
site restarted with its state dir, a SuperLink killed mid-run and restarted with its `--database`,
then the run resumed from its latest checkpoint (`resume-from`) without repeating finished rounds.
Every wait is bounded; one deployment serves all the cases to keep CI's time down."""

import json
import threading
import time

import pytest

from deploy.local import LoopbackDeployment
from shared_model.privacy.ledger import PrivacyLedger
from runners.cli import main as cli_main
from runners.flower_runtime import RunFailed, alive

from test_deployment import TINY

FAULTY = {**TINY, "min-train-nodes": 1, "min-evaluate-nodes": 1, "min-available-nodes": 1, "round-timeout": 45.0,
          "node-wait-timeout": 30.0, "server-eval-size": 20}


def sgd_rounds(deployment, k: int, run_id: str | None = None) -> list[int]:
    path = deployment.site_dir(k) / "state" / "ledger.jsonl"
    if not path.exists():
        return []
    return [r["server_round"] for r in PrivacyLedger(path).records()
            if r["kind"] == "dp-sgd" and (run_id is None or r["run_id"] == run_id)]


def wait_for(condition, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def run_in_thread(deployment, config: dict, timeout: float) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def target():
        try:
            out["result"] = deployment.run(config, timeout=timeout, stream_to=None)
        except Exception as e:  # noqa: BLE001 - handed to the test thread
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


def test_node_and_superlink_faults_on_loopback(tmp_path):
    deployment = LoopbackDeployment(tmp_path / "deploy", num_sites=2, target_epsilon=6.0)
    with deployment:
        deployment.prepare(train_size=120, image_size=32)
        deployment.start(timeout=180)

        # 1. site-1's SuperNode is killed (SIGKILL, with its ClientApp) as soon as it has trained
        #    round 1: the run goes on with site-0 (min-train-nodes 1) and completes; the lost reply
        #    costs at most round-timeout and is named in the summary.
        started = time.monotonic()
        thread, out = run_in_thread(deployment, {**FAULTY, "num-server-rounds": 2}, timeout=400)
        wait_for(lambda: 1 in sgd_rounds(deployment, 1), "site-1 to train round 1", 300)
        deployment.kill("supernode-1")
        thread.join(420)
        assert "error" not in out, out.get("error")
        first = out["result"]
        assert time.monotonic() - started < 400
        assert sgd_rounds(deployment, 0, first["run_id"]) == [1, 2]
        assert sgd_rounds(deployment, 1, first["run_id"]) == [1]  # killed before its round-2 message
        summary = (first["run_dir"] / "summary.md").read_text()
        assert "rounds trained: 2 of 2" in summary and "| site-0 |" in summary
        # the lost reply is in the failures table: "no reply" (round-timeout), Flower's "Node
        # Unavailable" (heartbeats lapsed) or a half-uploaded reply, depending on when the kill landed
        table = summary.split("## Sites that failed, refused or were rejected")[1].split("##")[0]
        rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ") and "---" not in line]
        lost = [r for r in rows[1:] if r[1].strip() != "site-0"]
        assert lost and int(lost[0][0]) <= 2, table

        # 2. the same site restarted with the same state dir rejoins; its ledger continues
        deployment.start_site(1)
        deployment.wait_online(2, timeout=120)
        # 3. the SuperLink is killed mid-run (after round 1 of 2 is checkpointed) and restarted
        #    with its --database; the interrupted run cannot report completed
        config = {**FAULTY, "num-server-rounds": 2, "min-train-nodes": 2, "min-evaluate-nodes": 2,
                  "min-available-nodes": 2}
        thread, out = run_in_thread(deployment, config, timeout=300)
        server = tmp_path / "deploy" / "server"
        others = lambda: [r for r in server.glob("run-*") if r != first["run_dir"]]  # noqa: E731
        wait_for(lambda: others() and (others()[0] / "checkpoints" / "LATEST").is_file(),
                 "round 1 of the second run to be checkpointed", 300)
        interrupted = others()[0]
        deployment.kill("superlink")
        deployment.start_superlink(timeout=60)
        thread.join(320)
        assert "result" not in out, "a run whose SuperLink crashed reported completed"
        deployment.wait_online(2, timeout=150)  # both SuperNodes reconnect on their own

        # 4. resume from the interrupted run's latest checkpoint: only the rounds left are trained
        latest = interrupted / "checkpoints" / (interrupted / "checkpoints" / "LATEST").read_text().strip()
        done = int(latest.name.split("-")[1])
        before = [len(sgd_rounds(deployment, k)) for k in range(2)]
        resumed = deployment.run({**config, "num-server-rounds": 2 - done, "resume-from": str(latest)}, timeout=300,
                                 stream_to=None)
        for k in range(2):
            assert sgd_rounds(deployment, k, resumed["run_id"]) == list(range(1, 2 - done + 1))
            assert len(sgd_rounds(deployment, k)) == before[k] + 2 - done
        assert json.loads((resumed["run_dir"] / "init_checkpoint.json").read_text())["source"] == "resume-from"

        # 5. site-1 dies again and min-train-nodes 2 cannot be met: the run fails within its bounds
        deployment.kill("supernode-1")
        started = time.monotonic()
        with pytest.raises(RunFailed) as failed:
            deployment.run({**config, "num-server-rounds": 1, "node-wait-timeout": 10.0},
                           timeout=240, stream_to=None)
        assert time.monotonic() - started < 240
        assert failed.value.status != "finished:completed"
        summary = (failed.value.run_dir / "summary.md").read_text()
        assert "ended: failed: round 1: 1 site(s) trained, fewer than min-train-nodes 2" in summary, summary
        assert "checkpoints" not in {p.name for p in failed.value.run_dir.iterdir()} or \
            not (failed.value.run_dir / "checkpoints" / "round-0001").exists()
        pids = [p.pid for p in deployment.procs.values()]

    assert not any(alive(pid) for pid in pids)
    # the sites' ledgers (one hash chain each across the crashes, the restart and four runs) audit
    # clean, and each is at the head the server witnessed last
    states = [str(deployment.site_dir(k) / "state") for k in range(2)]
    witnessed = deployment.workdir / "server" / "federation-state.json"
    assert cli_main(["audit", *states, "--federation-state", str(witnessed), "--accountants", "rdp"]) == 0
