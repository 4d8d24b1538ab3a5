"""Real Flower simulations (local SuperLink, Ray, ClientApp + ServerApp) on a tiny captioner.

Each run is made once and read by the tests that need it (`@pytest.mark.reads_run(name)`): one private
run serves every test that only reads its outputs, a run that tests one failure is its own. The
module's runs are started together when it starts, two at a time, each on its own FLWR_HOME (local
SuperLink): a Flower run is a few processes that mostly wait on each other, so two share 2 cores well.
A test waits for the run it reads; the command-line test starts its own."""

import functools
import json
import queue
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from runners.cli import main
from runners.flower_runtime import ROOT, RunFailed, flower_env, flwr_run, superlink_pids
from server.selection import best_round
from shared_model.model.checkpoint import save_checkpoint
from shared_model.privacy.ledger import PrivacyLedger
from shared_model.run_settings import default_run_config
from simulations.pretrained import pretrain_for
from simulations.run import main as simulation_main
from simulations.run import run_simulation, stop_superlink

TINY = dict(train_size=300, server_eval_size=30, image_size=32, model_d_model=32, model_num_heads=2,
            model_ffn_dim=32, batch_size=32, model_dropout=0.0)
TIMEOUT = 600
WORKERS = 2  # Flower runs at once: each is a few processes that mostly wait on each other


def overrides(**kw):
    return {k.replace("_", "-"): v for k, v in {**TINY, **kw}.items()}


@pytest.fixture(scope="module")
def sites2(tmp_path_factory):
    path = tmp_path_factory.mktemp("scenario") / "sites2.toml"
    path.write_text("[federation]\nnum-supernodes = 2\n")
    return path


def rounds(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def dp_lines(path):
    return [r for r in PrivacyLedger(path).records() if r["kind"] == "dp-sgd"]


def simulate(home, scenario, out, **kw):
    return run_simulation([scenario], output_dir=out, timeout=TIMEOUT, flwr_home=home, stream_to=None,
                          overrides=overrides(**kw))


# ---- the module's runs: job(flwr_home, output folder, the 2-site scenario) -------------------------

def plain_run(home, out, sites2):
    # non-private, so that a tiny model learns visibly in a few rounds
    return simulate(home, sites2, out, num_server_rounds=3, local_epochs=3, dp=False, lr=0.005)


PRIVATE = dict(num_server_rounds=2, trainable="fusion+decoder", target_epsilon=8.0, run_epsilon=8.0,
               grad_sample_mode="ghost", physical_batch_shape="variable")


def private_run(home, out, sites2):
    """Public pretraining -> federated DP fine-tuning of fusion+decoder from it (init-from), 2 rounds,
    each site's budget and the run's allowance 8, ghost clipping with variable physical batches."""
    checkpoint, _ = pretrain_for({**default_run_config(), **overrides(**PRIVATE)}, cache=out / "pretrained",
                                 log=lambda s: None, train_size=300, epochs=2, batch_size=32)
    return simulate(home, sites2, out / "runs", **PRIVATE, init_from=str(checkpoint)), checkpoint


def runs_on_one_state_dir(home, out, sites2):
    """Two runs whose sites keep their ledgers in one state dir, then an attack on it (the test
    below); what the test checks between the runs is read here, as it happened."""
    state, runs = out / "site-state", out / "runs"
    common = dict(num_server_rounds=2, site_state_dir=str(state), noise_multiplier=1.0, run_epsilon=100.0,
                  target_epsilon=100.0)
    seen = {"first": simulate(home, sites2, runs, **common)}
    seen["after-first"] = dp_lines(state / "site-0" / "ledger.jsonl")
    seen["second"] = simulate(home, sites2, runs, **common)
    seen["after-second"] = dp_lines(state / "site-0" / "ledger.jsonl")
    seen["witnessed"] = json.loads((runs / "federation-state.json").read_text())["sites"]
    # attack: site-0's whole state dir is lost, and the server asks for a fixed noise that would pass the
    # sites' grants
    shutil.rmtree(state / "site-0")
    try:
        seen["attack"] = simulate(home, sites2, runs, **{**common, "run_epsilon": 0.5})
    except RunFailed as e:
        seen["attack"] = e
    return seen


def bad_setting_run(home, out, sites2):
    # flwr_run directly: the simulation runner would refuse it before Flower starts
    return flwr_run({**overrides(num_server_rounds=1), "output-dir": str(out), "target-delta": 1.5},
                    flower_env(home), timeout=TIMEOUT, stream_to=None,
                    extra_args=["--federation-config", "num-supernodes=2"])


def too_few_nodes_run(home, out, sites2):
    return simulate(home, sites2, out, num_server_rounds=1, min_available_nodes=3, node_wait_timeout=3.0)


def corrupt_resume_run(home, out, sites2):
    from shared_model.data.synthetic import synthetic_vocabulary
    from shared_model.model.captioner import Captioner

    from conftest import tiny_config

    vocab = synthetic_vocabulary()
    checkpoint = save_checkpoint(out / "ckpt", Captioner(tiny_config(vocab_size=len(vocab))), vocab)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    try:
        return simulate(home, sites2, out, num_server_rounds=1, resume_from=str(checkpoint))
    finally:  # stop_superlink waits until it has exited: the test checks
        stop_superlink(home)
        (out / "superlinks-left.json").write_text(json.dumps(superlink_pids(home)))


def private_vocabulary_run(home, out, sites2):
    return simulate(home, sites2, out, num_server_rounds=1, local_epochs=1, vocab_source="private",
                    vocab_noise_multiplier=1.0, vocab_max_words_per_record=6, target_epsilon=16.0, run_epsilon=16.0)


def no_words_run(home, out, sites2):
    return simulate(home, sites2, out, num_server_rounds=1, vocab_source="private", vocab_noise_multiplier=50.0)


JOBS = {job.__name__: job for job in (  # the longest first
    runs_on_one_state_dir, private_run, plain_run, private_vocabulary_run, no_words_run, too_few_nodes_run,
    corrupt_resume_run, bad_setting_run)}


class Launches:
    """Jobs run WORKERS at a time, each on a FLWR_HOME of its own while it runs; `result(name)`
    returns what the job returned or raises what it raised; `out[name]` is its output folder."""

    def __init__(self, homes: list) -> None:
        self._homes: queue.Queue = queue.Queue()
        for home in homes:
            self._homes.put(home)
        self._pool = ThreadPoolExecutor(len(homes), thread_name_prefix="flower-run")
        self._futures: dict = {}
        self.out: dict = {}

    def start(self, name: str, out, *args) -> None:
        self.out[name] = out
        self._futures[name] = self._pool.submit(self._on_a_home, JOBS[name], out, *args)

    def _on_a_home(self, job, out, *args):
        home = self._homes.get()
        try:
            return job(home, out, *args)
        finally:
            self._homes.put(home)

    def result(self, name: str):
        return self._futures[name].result(timeout=3 * TIMEOUT)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def launches(request, tmp_path_factory, sites2):
    """Starts the runs that this session's selected tests read (their `reads_run` marks)."""
    wanted = {mark.args[0] for item in request.session.items if item.module is request.module
              for mark in item.iter_markers("reads_run")}
    homes = [tmp_path_factory.mktemp("flwr-home") for _ in range(WORKERS)]
    pool = Launches(homes)
    for name in JOBS:
        if name in wanted:
            pool.start(name, tmp_path_factory.mktemp(name.replace("_", "-")), sites2)
    yield pool
    pool.close()
    for home in homes:
        stop_superlink(home)


# ---- the tests ----------------------------------------------------------------------------------

@pytest.mark.reads_run("plain_run")
def test_federated_training_improves_the_global_model(launches):
    # non-private, so that a tiny model learns visibly in a few rounds (DP runs: the tests below)
    run_dir = launches.result("plain_run")["run_dir"]
    rows = rounds(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    cider = [r["CIDEr-D"] for r in rows]
    assert cider[-1] > cider[0] + 0.1 and rows[-1]["loss"] < rows[0]["loss"]
    assert not (run_dir / "sites").exists()  # non-private: no ledger records
    federated = [json.loads(line) for line in (run_dir / "federated.jsonl").read_text().splitlines()]
    # evaluate-in-train: rounds 0-2 are evaluated inside the next round's train messages, round 3 by
    # the one evaluate message after the last round
    assert [r["round"] for r in federated] == [0, 1, 2, 3]
    assert all(set(r["sites"]) == {"site-0", "site-1"} for r in federated)
    held_out = [r["sites"]["site-0"]["num-examples"] for r in federated]
    assert held_out[0] > 0 and len(set(held_out)) == 1  # the same held-out split every round
    assert federated[-1]["mean"]["CIDEr-D"] > federated[0]["mean"]["CIDEr-D"]
    assert (run_dir / "checkpoints" / "round-0003" / "model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "round-0000" / "model.safetensors").is_file()  # the start: a BEST candidate
    best = best_round(rows, candidates={0, 1, 2, 3})["round"]
    assert (run_dir / "checkpoints" / "BEST").read_text() == f"round-{best:04d}\n"
    assert (run_dir / "checkpoints" / "LATEST").read_text() == "round-0003\n"
    summary = (run_dir / "summary.md").read_text()
    assert f"- BEST: round {best} (checkpoints/round-{best:04d})" in summary
    assert "ended: completed" in summary and (run_dir / "rounds.png").is_file()
    assert "| 3 | site-1 |" in summary and "| 3 | weighted mean |" in summary
    assert "## What the model says" in summary and "| round 0 | round 3 |" in summary
    assert (run_dir / "gallery" / "05.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.reads_run("private_run")
def test_private_simulation_writes_each_site_ledger(launches):
    from shared_model.model.checkpoint import checkpoint_sha256

    result, checkpoint = launches.result("private_run")
    run_dir = result["run_dir"]
    for site in ("site-0", "site-1"):
        lines = PrivacyLedger(run_dir / "sites" / site / "ledger.jsonl").records()
        assert [r["kind"] for r in lines] == ["count-gaussian", "grant", "dp-sgd", "dp-sgd"]
        records = lines[2:]
        assert [r["server_round"] for r in records] == [1, 2]
        assert records[0]["epsilon"] < records[-1]["epsilon"] <= 8.0  # calibrated to the grant over the plan
        assert records[-1]["epsilon"] > 8.0 * 0.9 and records[-1]["records_retired"] == 0
        # the ledger names the checkpoint the run started from
        assert {r["init_checkpoint"] for r in lines[1:]} == {checkpoint_sha256(checkpoint)}
    summary = (run_dir / "summary.md").read_text()
    assert "| site-0 |" in summary and "| site-1 |" in summary
    assert "## Where each site's train message spent its time" in summary and "| 2 | site-1 |" in summary
    # simulated sites whose ledgers live in the run folder are new every run: nothing to witness
    state = json.loads((run_dir.parent / "federation-state.json").read_text())
    assert state["sites"] == {}


@pytest.mark.reads_run("private_run")
def test_a_private_simulation_with_ghost_clipping_completes(launches):
    run_dir = launches.result("private_run")[0]["run_dir"]
    assert "ended: completed" in (run_dir / "summary.md").read_text()
    assert json.loads((run_dir / "run_config.json").read_text())["grad-sample-mode"] == "ghost"


@pytest.mark.reads_run("runs_on_one_state_dir")
def test_ledgers_continue_across_runs_and_the_server_witnesses_them(launches):
    seen = launches.result("runs_on_one_state_dir")
    state, runs = launches.out["runs_on_one_state_dir"] / "site-state", launches.out["runs_on_one_state_dir"] / "runs"
    first, second, after_first, records = seen["first"], seen["second"], seen["after-first"], seen["after-second"]
    assert len(after_first) == 2
    assert len(records) == 4 and records[2]["run_id"] == second["run_id"] != first["run_id"]
    assert records[2]["epsilon"] > after_first[-1]["epsilon"]  # continues, does not restart at round 1's value
    witnessed = seen["witnessed"]
    assert witnessed["site-0"]["lines"] == 8 and witnessed["site-0"]["run_id"] == second["run_id"]  # 2 x 4 lines

    # attack: site-0's whole state dir is lost, and the server asks for a fixed noise that would pass the
    # sites' grants. site-0 must refuse (the witness), site-1 must refuse (the noise): nothing trains, the run fails
    err = seen["attack"]
    assert isinstance(err, RunFailed), f"the attack's run completed: {err}"
    assert err.status == "finished:failed"
    assert not (state / "site-0" / "ledger.jsonl").exists()  # refused before writing anything
    assert len(dp_lines(state / "site-1" / "ledger.jsonl")) == 4  # nothing trained (the run's count is kept)
    summary = (err.run_dir / "summary.md").read_text()
    assert "ended: failed" in summary and "rounds trained: 0 of 2" in summary
    assert "lost or rolled back" in summary and "| refused |" in summary and "would spend" in summary
    checkpoints = err.run_dir / "checkpoints"  # nothing trained: BEST is the start, no LATEST
    assert (checkpoints / "BEST").read_text() == "round-0000\n" and not (checkpoints / "LATEST").exists()
    assert main(["audit", str(state), "--federation-state", str(runs / "federation-state.json")]) == 1


@pytest.mark.reads_run("bad_setting_run")
def test_the_server_app_refuses_a_bad_setting_before_round_1(launches):
    """Issue 12: a bad setting ends the run as failed before any site trains, the key and the value
    named in the log. The schema check covers every key (tests/test_run_settings.py), and the runner
    refuses a bad setting before Flower starts (test_the_simulation_runner_refuses_a_bad_setting_
    before_flower_starts there); this one real launch goes past the runner (flwr_run directly) to
    show the ServerApp itself refuses it first thing."""
    run_id, status, log = launches.result("bad_setting_run")
    tmp_path = launches.out["bad_setting_run"]
    assert status == "finished:failed"
    assert "FedCap run refused: invalid run config: target-delta must be" in log and "got 1.5" in log
    assert "[ROUND 1" not in log and not (tmp_path / f"run-{run_id}").exists()  # nothing trained, nothing written


def test_a_round_in_which_no_site_trained_fails_the_run_naming_each_site_error(tmp_path, sites2, capsys,
                                                                              monkeypatch):
    # through the command line; a setting only the sites can check (canary-site beyond the 2
    # partitions): every ClientApp raises. The command line first pretrains on public data and starts
    # the federation from it: here on 300 public records for one epoch, cached in tmp_path (the main
    # job's 20k x 6 epochs would take minutes on a fresh clone)
    import simulations.pretrained

    monkeypatch.setattr(simulations.pretrained, "pretrain_for", functools.partial(
        simulations.pretrained.pretrain_for, cache=tmp_path / "pretrained", train_size=300, epochs=1))
    scenario = tmp_path / "broken-sites.toml"
    scenario.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in overrides(
        num_server_rounds=2, dp=False, canary_count=2, canary_site=5).items()))
    assert simulation_main([str(sites2), str(scenario), "--output-dir", str(tmp_path), "--timeout", str(TIMEOUT)]) == 1
    assert "ended with status 'finished:failed'" in capsys.readouterr().err
    assert superlink_pids(ROOT / ".fedcap" / "flwr-home") == []  # the runner's SuperLink has exited
    (run_dir,) = tmp_path.glob("run-*")
    started = json.loads((run_dir / "init_checkpoint.json").read_text())  # from the public checkpoint
    assert started["source"] == "init-from" and started["checkpoint"].startswith(str(tmp_path / "pretrained"))
    summary = (run_dir / "summary.md").read_text()
    assert "ended: failed: round 1: 0 site(s) trained, fewer than min-train-nodes 2" in summary
    assert summary.count("canary-site must be in [0, 2), got 5") >= 2  # every site's own error text
    assert "rounds trained: 0 of 2" in summary
    assert [r["round"] for r in rounds(run_dir)] == [0] and not (run_dir / "checkpoints" / "LATEST").exists()
    assert (run_dir / "checkpoints" / "BEST").read_text() == "round-0000\n"  # the start, never worse than it


@pytest.mark.reads_run("too_few_nodes_run")
def test_too_few_connected_nodes_fail_the_run_after_node_wait_timeout(launches):
    # Flower alone would wait forever for a third node ("1 connected (minimum required: 2)" in issue 12)
    with pytest.raises(RunFailed) as err:
        launches.result("too_few_nodes_run")
    summary = (err.value.run_dir / "summary.md").read_text()
    assert "2 node(s) connected, fewer than the 3 needed" in summary and "node-wait-timeout 3 s" in summary


@pytest.mark.reads_run("corrupt_resume_run")
def test_a_corrupt_resume_checkpoint_fails_the_run_naming_the_file(launches):
    with pytest.raises(RunFailed) as err:
        launches.result("corrupt_resume_run")
    out = launches.out["corrupt_resume_run"]
    weights = out / "ckpt" / "model.safetensors"  # truncated to 100 bytes
    assert err.value.status == "finished:failed"
    assert f"FedCap run refused: resume-from: checkpoint weights {weights} (100 bytes) are corrupt" in err.value.log
    assert json.loads((out / "superlinks-left.json").read_text()) == []  # stop_superlink waits until it has exited


@pytest.mark.reads_run("private_run")
def test_federation_fine_tunes_a_public_pretrained_checkpoint(launches):
    """Public pretraining -> federated DP fine-tuning of fusion+decoder from it (init-from)."""
    import torch

    from shared_model.data.synthetic import load_embedded
    from shared_model.evaluation.evaluator import evaluate
    from shared_model.model.checkpoint import checkpoint_sha256, load_checkpoint
    from shared_model.model.trainable import parameter_group

    result, checkpoint = launches.result("private_run")
    run_dir = result["run_dir"]
    assert json.loads((run_dir / "init_checkpoint.json").read_text()) == {
        "source": "init-from", "checkpoint": str(checkpoint), "init-checkpoint": checkpoint_sha256(checkpoint)}
    pretrained, vocab, _ = load_checkpoint(checkpoint)
    expected, _ = evaluate(pretrained, load_embedded("test", 30, image_size=32), vocab, meteor=False)
    rows = rounds(run_dir)
    assert rows[0]["CIDEr-D"] == pytest.approx(expected["CIDEr-D"])  # round 0 is the public-only model
    final, _, _ = load_checkpoint(run_dir / "checkpoints" / "round-0002")
    for (name, p), q in zip(pretrained.named_parameters(), final.parameters()):
        if parameter_group(name) == "encoder":  # frozen at every site: no noise, no update
            assert torch.allclose(p, q, atol=1e-6), name
        else:
            assert not torch.equal(p, q), name
    # the sites' ledger lines name it: test_private_simulation_writes_each_site_ledger


@pytest.mark.reads_run("private_vocabulary_run")
def test_private_vocabulary_round_builds_the_model_and_is_audited(launches):
    from shared_model.audit.ledger_audit import audit
    from shared_model.data.vocab import Vocabulary

    run_dir = launches.result("private_vocabulary_run")["run_dir"]
    vocab = Vocabulary.load(run_dir / "vocab.json")
    assert 10 < len(vocab) and vocab == Vocabulary.load(run_dir / "checkpoints" / "round-0001" / "vocab.json")
    for site in ("site-0", "site-1"):
        lines = PrivacyLedger(run_dir / "sites" / site / "ledger.jsonl").records()
        assert [r["kind"] for r in lines] == ["vocab-gaussian", "count-gaussian", "grant", "dp-sgd"]
        release, count, grant, trained = lines
        assert release["noise_multiplier"] == 1.0 and release["max_words_per_record"] == 6
        assert release["words_released"] > 5 and release["records_counted"] > 0
        assert grant["spent_before"] > 0 and trained["epsilon"] > release["epsilon"]  # the run's share so far
        # the run's allowance is shared: release, count and training together stay within the grant
        assert grant["granted_epsilon"] == 16.0 and trained["epsilon"] <= 16.0 * (1 + 1e-6)
    report = audit([run_dir], accountants=("rdp", "pld"))
    assert report.status == "ok"
    for s in report.sites:
        first = s.checks[0]
        assert first.kind == "vocab-gaussian" and first.recomputed_epsilon == pytest.approx(first.recorded_epsilon)
        assert s.vocab_releases == 1 and s.threshold_delta == 1e-7
    assert main(["audit", str(run_dir)]) == 0
    summary = (run_dir / "summary.md").read_text()
    assert "## Private vocabulary (before round 1)" in summary and "| site-0 |" in summary


@pytest.mark.reads_run("no_words_run")
def test_a_private_vocabulary_without_words_fails_the_run_by_name(launches):
    with pytest.raises(RunFailed) as err:
        launches.result("no_words_run")
    assert err.value.status == "finished:failed"
    assert "no word cleared any site's threshold (vocab-noise-multiplier 50" in err.value.log
    for site in ("site-0", "site-1"):  # the release was spent and recorded all the same
        lines = PrivacyLedger(err.value.run_dir / "sites" / site / "ledger.jsonl").records()
        assert [r["kind"] for r in lines] == ["vocab-gaussian"] and lines[0]["words_released"] == 0
    summary = (err.value.run_dir / "summary.md").read_text()  # the failed run still says what happened
    assert "- ended: failed: private vocabulary: no word cleared" in summary and "rounds trained: 0 of 1" in summary
    assert "## Private vocabulary (before round 1)" in summary and "| site-0 | " in summary
