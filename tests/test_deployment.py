"""Deployment: credentials, COCO site folders, and one real loopback federation (SuperLink with TLS,
node authentication and a database; one authenticated SuperNode per site; `flwr run . <connection>`)
started once for this module by `python -m deploy.local` on the operator's own folders and held open
(tests/deployment_fixture.py). Issue 23's operator walkthrough reads its first run; the node and
SuperLink faults of issue 12 (item 4) come last, since they kill and restart its processes; the last
test lets `python -m deploy.local` stop them all."""

import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from deploy.credentials import make_site_key, make_tls
from deploy.local import LoopbackDeployment, run_overrides, site_folders
from deploy.site_folders import export_sites, write_coco_folder
from deployment_fixture import HeldDeployment, run_in_thread, sgd_rounds, wait_for
from runners.cli import main as cli_main
from runners.flower_runtime import RunFailed, alive, free_port
from shared_model.data.loaders import load_dataset
from shared_model.data.public import load_public
from shared_model.data.synthetic import load_embedded
from shared_model.privacy.ledger import PrivacyLedger
from shared_model.privacy.reply import BUDGET_METRICS

TINY = {"num-server-rounds": 2, "local-epochs": 1, "batch-size": 32, "image-size": 32, "model-d-model": 32,
        "model-num-heads": 2, "model-ffn-dim": 32, "model-dropout": 0.0, "server-eval-size": 30,
        "target-epsilon": 100.0, "target-delta": 0.9,
        # no caption gallery: the embedded grammar is small, so the server's own test captions (and the
        # model's) can equal a site's caption word for word, which the leak scan below would report
        "gallery-size": 0}  # the run config's budget must not override the sites' own
SITES = ["hospital-a", "hospital-b"]


def test_tls_certificate_names_the_hosts_and_is_signed_by_the_ca(tmp_path):
    paths = make_tls(tmp_path, ["127.0.0.1", "superlink.example.org"])
    ca = x509.load_pem_x509_certificate(paths["ca_cert"].read_bytes())
    server = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert oct(paths["server_key"].stat().st_mode & 0o777) == "0o600"
    with pytest.raises(FileExistsError, match="server.pem|ca"):
        make_tls(tmp_path, ["127.0.0.1"])
    with pytest.raises(ValueError, match="without port"):
        make_tls(tmp_path / "other", ["127.0.0.1:9092"])


def test_site_key_is_an_openssh_ecdsa_pair(tmp_path):
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    private, public = make_site_key(tmp_path, "site-0")
    key = load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key.curve, ec.SECP384R1)
    assert load_ssh_public_key(public.read_bytes()).public_numbers() == key.public_key().public_numbers()
    with pytest.raises(ValueError, match="plain folder name"):
        make_site_key(tmp_path, "../escape")


def test_exported_site_folders_load_back_unchanged(tmp_path):
    folders = export_sites(tmp_path, 2, train_size=60, partitioner="iid", image_size=32)
    full = load_embedded("train", 60, image_size=32)
    loaded = [load_dataset("coco", f / "captions.json", image_dir=f / "images", image_size=32) for f in folders]
    assert sum(len(d) for d in loaded) == 60
    by_caption = {c: img for img, c in zip(full.images, full.captions)}
    for d in loaded:
        for img, caps in zip(d.images, d.captions):
            np.testing.assert_array_equal(img, by_caption[caps])
    with pytest.raises(FileExistsError, match="captions.json"):
        export_sites(tmp_path, 2, train_size=60, image_size=32)


def test_site_folders_are_the_given_folders_or_a_folder_of_site_folders(tmp_path):
    a = write_coco_folder(load_embedded("train", 2, image_size=32), tmp_path / "sites" / "hospital-a")
    b = write_coco_folder(load_embedded("train", 2, seed=1, image_size=32), tmp_path / "sites" / "hospital-b")
    assert site_folders([a, b]) == [a, b] == site_folders([tmp_path / "sites"])  # each folder, or their parent
    assert site_folders([a]) == [a]  # a site folder holds files: never taken for a folder of sites
    (tmp_path / "other" / "hospital-a").mkdir(parents=True)
    with pytest.raises(ValueError, match="same name"):
        site_folders([a, tmp_path / "other" / "hospital-a"])
    (tmp_path / "bad name").mkdir()
    with pytest.raises(ValueError, match="not a plain name"):
        site_folders([tmp_path / "bad name"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        site_folders([tmp_path / "nowhere"])
    deployment = LoopbackDeployment(tmp_path / "deploy", data_dirs=[tmp_path / "sites"], dataset_format="csv")
    assert deployment.names == ["hospital-a", "hospital-b"] and deployment.data_dir(1) == b
    assert f'site-name="hospital-b" data-dir="{b}" dataset-format="csv"' in deployment.node_config(1)
    assert f'state-dir="{tmp_path / "deploy" / "sites" / "hospital-b" / "state"}"' in deployment.node_config(1)


def test_init_from_gives_the_run_its_checkpoints_model_and_a_conflicting_flag_is_an_error(tmp_path):
    from shared_model.data.synthetic import synthetic_vocabulary
    from shared_model.model.captioner import Captioner
    from shared_model.model.checkpoint import save_checkpoint
    from shared_model.model.config import CaptionerConfig

    vocab = synthetic_vocabulary()
    checkpoint = save_checkpoint(tmp_path / "pre" / "checkpoint", Captioner(CaptionerConfig(
        vocab_size=len(vocab), image_size=32, d_model=48, num_heads=2, ffn_dim=64, dropout=0.1)), vocab)
    server = write_coco_folder(load_embedded("val", 2, image_size=32), tmp_path / "val")
    def args(*flags):
        return SimpleNamespace(**{"run_config": None, "server_eval_data": None, "image_size": None, "init_from": None,
                                  "format": "coco", **dict(flags)})

    overrides = run_overrides(args(("init_from", checkpoint), ("server_eval_data", server)))
    assert overrides["init-from"] == str(checkpoint) and overrides["server-eval-data"] == str(server)
    assert (overrides["image-size"], overrides["model-d-model"], overrides["model-ffn-dim"]) == (32, 48, 64)
    assert "model-dropout" not in overrides  # training-only: the run config's own
    with pytest.raises(ValueError, match="image-size = 32 .* gives 64"):
        run_overrides(args(("init_from", checkpoint), ("image_size", 64)))
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        run_overrides(args(("init_from", tmp_path)))


# ---- one deployment, on the operator's own folders, for the rest of this module -------------------

@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    """Issue 23's walkthrough, as a new operator runs it from the docs: two site folders, a public
    folder, the server's validation folder and a test folder, all made here from generated images;
    `fedcap vocab` and `fedcap pretrain` on the public folder, then `python -m deploy.local` on the
    sites' folders with DP (real TLS, node authentication, one SuperNode per site), each site with
    its own budget (6, 1e-5) which the run config's (100, 0.9) must not override. Its processes stay
    up for the tests below (HeldDeployment) until the last one lets it stop them."""
    root = tmp_path_factory.mktemp("walkthrough")
    sites = root / "sites"
    records = load_embedded("train", 100 * len(SITES), image_size=32)  # 100 per site: the noisy count (std 20) stays > 0
    for k, name in enumerate(SITES):
        write_coco_folder(records.subset(range(100 * k, 100 * k + 100)), sites / name)
    public = write_coco_folder(load_public(60, image_size=32), root / "public")
    val = write_coco_folder(load_embedded("val", 20, image_size=32), root / "server-val")
    test = write_coco_folder(load_embedded("test", 20, image_size=32), root / "test")

    # 1. the vocabulary and the pretrained model, from public data only
    assert cli_main(["vocab", str(public), "--out", str(root / "vocab.json")]) == 0
    assert cli_main(["pretrain", "--data", str(public), "--vocab-file", str(root / "vocab.json"), "--image-size", "32",
                     "--epochs", "1", "--batch-size", "16", "--test-size", "10", "--out", str(root / "pre")]) == 0

    # 2. the federation on the sites' own folders. No caption gallery: the embedded grammar is small, so
    # the server's own captions can equal a site's word for word, which the leak scan would report
    (root / "run.toml").write_text("num-server-rounds = 2\nlocal-epochs = 1\nbatch-size = 32\n"
                                   "server-eval-size = 30\ntarget-epsilon = 100.0\ntarget-delta = 0.9\n"
                                   "gallery-size = 0\n")
    held = HeldDeployment(["--workdir", str(root / "deploy"), "--data-dir", str(sites), "--server-eval-data", str(val),
                           "--init-from", str(root / "pre" / "checkpoint"), "--run-config", str(root / "run.toml"),
                           "--target-epsilon", "6", "--timeout", "900"])
    try:
        held.start(timeout=1200)
        yield SimpleNamespace(root=root, sites=sites, public=public, val=val, test=test, held=held,
                              deployment=held.deployment, result=held.result, run_dir=held.result["run_dir"],
                              witness=root / "deploy" / "server" / "federation-state.json")
    finally:
        held.finish()  # a no-op once the last test has let it stop


def test_operator_walkthrough_on_its_own_folders(walkthrough, capsys):
    """The walkthrough's run (the fixture above), then its selected checkpoint as the operator uses it."""
    root, deployment, result, run_dir = walkthrough.root, walkthrough.deployment, walkthrough.result, walkthrough.run_dir
    # 1. the vocabulary and the pretrained model: what ran read the public folder only, non-private
    pre = json.loads((root / "pre" / "config.json").read_text())
    assert pre["kind"] == "pretrained" and pre["private"] is False and pre["data"]["folders"] == [str(walkthrough.public)]
    assert pre["data"]["vocabulary"] == str(root / "vocab.json") and "accountant" not in pre["centralized"]

    # 2. the federation on the sites' own folders
    best = (run_dir / "checkpoints" / "BEST").read_text().strip()
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "round-0002"
    run_config = json.loads((run_dir / "run_config.json").read_text())  # the run as it happened
    assert run_config["server-eval-data"] == str(walkthrough.val)
    assert run_config["init-from"] == str(walkthrough.root / "pre" / "checkpoint")
    assert json.loads((run_dir / "init_checkpoint.json").read_text())["source"] == "init-from"
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    # DP sites keep their held-out metrics unless their node_config shares them (docs/privacy.md)
    federated = run_dir / "federated.jsonl"
    assert not federated.exists() or all(not json.loads(line)["sites"] for line in federated.read_text().splitlines())
    witnessed = json.loads(walkthrough.witness.read_text())["sites"]
    summary = (run_dir / "summary.md").read_text()
    assert "Scored on the server's evaluation set, greedy decoding (beam 1)" in summary
    assert "evaluate-error" not in summary  # a site that withholds held-out metrics says so, it does not fail
    for k, name in enumerate(SITES):
        assert deployment.names[k] == name  # each site is named after its folder
        lines = PrivacyLedger(deployment.site_dir(k) / "state" / "ledger.jsonl").records()
        records = [r for r in lines if r["kind"] == "dp-sgd"]
        assert [r["server_round"] for r in records] == [1, 2]
        assert {r["run_id"] for r in lines} == {result["run_id"]}
        # the site's budget and delta, never the run config's (100, 0.9); a quarter of it granted per run
        assert all((r["target_epsilon"], r["target_delta"]) == (6.0, 1e-5) for r in lines)
        assert [r["kind"] for r in lines[:2]] == ["count-gaussian", "grant"] and lines[1]["granted_epsilon"] == 1.5
        assert 0 < records[-1]["epsilon"] <= 6.0
        assert witnessed[name]["head"] == lines[-1]["hash"] and witnessed[name]["lines"] == 4
        # the summary shows the budget the site reported (its ledger's epsilon), never the run config's;
        # the run spent at most the 1.5 the site granted it
        row = next(line for line in summary.splitlines() if line.startswith(f"| {name} | "))
        assert row.startswith(f"| {name} | {records[-1]['epsilon']:.4g} | 1e-05 | 6 | ")
        cells = dict(zip(BUDGET_METRICS, (c.strip() for c in row.split("|")[2:])))
        assert float(cells["run-epsilon-granted"]) == 1.5 and 0 < float(cells["run-epsilon-spent"]) <= 1.5 * (1 + 1e-3)
        assert float(cells["epsilon-remaining"]) == pytest.approx(6 - records[-1]["epsilon"], abs=1e-3)
        sites = walkthrough.sites
        assert not (sites / name / "cache").exists() and not list((sites / name).glob("*.npz"))  # data untouched
    assert "ended: completed" in summary and "rounds trained: 2 of 2" in summary
    assert_no_secrets_or_captions(deployment, result)

    # 3. the selected checkpoint: one score per model (fedcap evaluate's default decoding is the server's),
    # then its score on the test folder, its gallery and the audit
    test = walkthrough.test
    checkpoint = run_dir / "checkpoints" / best
    assert cli_main(["evaluate", str(checkpoint), str(walkthrough.val), "--no-meteor", "--json",
                     str(root / "val.json")]) == 0
    again = json.loads((root / "val.json").read_text())
    assert again["decoding"] == "greedy decoding (beam 1)"
    assert again["metrics"]["CIDEr-D"] == pytest.approx(next(r for r in rounds if f"round-{r['round']:04d}" == best)
                                                        ["CIDEr-D"], abs=1e-9)
    assert cli_main(["evaluate", str(checkpoint), str(test), "--no-meteor"]) == 0
    assert f"on {test} (20 images, greedy decoding (beam 1))" in capsys.readouterr().out
    assert cli_main(["caption", str(checkpoint), "--data", str(test), "--gallery", str(root / "gallery"),
                     "--gallery-size", "3"]) == 0
    gallery = (root / "gallery" / "gallery.md").read_text()
    assert gallery.startswith(f"## What the model says: run-{walkthrough.result['run_id']}/{best}, "
                              f"greedy decoding (beam 1)")
    capsys.readouterr()
    states = [walkthrough.deployment.site_dir(k) / "state" for k in range(len(SITES))]
    assert cli_main(["audit", *map(str, states), "--federation-state", str(walkthrough.witness)]) == 0
    audited = capsys.readouterr().out
    assert all(name in audited for name in SITES)


def test_an_unregistered_supernode_is_refused_and_finished_apps_are_flowers_own(walkthrough):
    deployment, held = walkthrough.deployment, walkthrough.held
    # Flower's SuperExec leaves each finished app process <defunct> until it starts the next one
    # (docs/deployment.md, "Stopping"): a few at most (one SuperExec per site and the SuperLink's), all
    # flwr-serverapp/flwr-clientapp, never one of ours (as the run completed)
    assert all(name in ("flwr-serverapp", "flwr-clientapp") for name in held.defunct), held.defunct
    assert len(held.defunct) <= 2 * (deployment.num_sites + 1), held.defunct
    # a SuperNode whose key was never registered is refused by the SuperLink
    make_site_key(deployment.creds, "intruder")
    stranger = deployment._spawn("intruder", [
        "flower-supernode", "--superlink", f"127.0.0.1:{deployment.port}",
        "--root-certificates", str(deployment.creds / "ca.crt"),
        "--auth-supernode-private-key", str(deployment.creds / "intruder" / "site.key"),
        "--port", str(free_port()), "--node-config", 'site-name="intruder"', "--max-retries", "0"],
        deployment.env)
    stranger.wait(timeout=120)
    deployment.kill("intruder")  # gone already: only taken off the deployment's list
    assert stranger.returncode != 0 and deployment.online_nodes() == len(SITES)


# ---- node faults on the same deployment (issue 12, item 4): last, they kill its processes ---------

# each fault run asks the sites for 1.0 of their budget (the walkthrough's run had 1.5 of 6). round-timeout
# bounds the wait for a killed site's reply; runs in which every site is up get a looser bound
FAULTY = {**TINY, "run-epsilon": 1.0, "min-train-nodes": 1, "min-evaluate-nodes": 1, "min-available-nodes": 1,
          "round-timeout": 45.0, "node-wait-timeout": 30.0, "server-eval-size": 20}


def test_node_and_superlink_faults_on_loopback(walkthrough):
    """A SuperNode killed mid-run, the same site restarted with its state dir, the SuperLink killed
    mid-run and restarted with its `--database`, then the run resumed from its latest checkpoint
    (`resume-from`) without repeating finished rounds, and a run that cannot meet min-train-nodes.
    Every wait is bounded."""
    deployment = walkthrough.deployment
    n, names = deployment.num_sites, deployment.names
    alive_sites = [k for k in range(n) if k != 1]
    server = deployment.workdir / "server"
    t0 = time.monotonic()

    def mark(what):  # in the captured output: where a slow or failed run spent its time
        print(f"{time.monotonic() - t0:6.1f} s  {what}", flush=True)

    # 1. site 1's SuperNode is killed (SIGKILL, with its ClientApp) as soon as its round-1 reply is in
    #    (the server has checkpointed round 1; a kill while the reply uploads would cost Flower's
    #    object-push expiry, minutes): the run goes on with the others (min-train-nodes 1) and completes;
    #    the lost reply costs at most round-timeout and is named in the summary.
    earlier = set(server.glob("run-*"))
    new_runs = lambda: [r for r in server.glob("run-*") if r not in earlier]  # noqa: E731
    started = time.monotonic()
    thread, out = run_in_thread(deployment, {**FAULTY, "num-server-rounds": 2}, timeout=400)
    wait_for(lambda: new_runs() and (new_runs()[0] / "checkpoints" / "LATEST").is_file(),
             "round 1 of the first fault run to be checkpointed", 300)
    deployment.kill("supernode-1")
    mark("killed supernode-1")
    thread.join(420)
    assert "error" not in out, out.get("error")
    first = out["result"]
    mark("run 1 completed")
    assert time.monotonic() - started < 400
    for k in alive_sites:
        assert sgd_rounds(deployment, k, first["run_id"]) == [1, 2]
    assert sgd_rounds(deployment, 1, first["run_id"]) == [1]  # killed before its round-2 message
    summary = (first["run_dir"] / "summary.md").read_text()
    assert "rounds trained: 2 of 2" in summary and all(f"| {names[k]} |" in summary for k in alive_sites)
    # the lost reply is in the failures table: "no reply" (round-timeout), Flower's "Node
    # Unavailable" (heartbeats lapsed) or a half-uploaded reply, depending on when the kill landed
    table = summary.split("## Sites that failed, refused or were rejected")[1].split("##")[0]
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    lost = [r for r in rows[1:] if r[1].strip() not in {names[k] for k in alive_sites}]
    assert lost and int(lost[0][0]) <= 2, table

    # 2. the same site restarted with the same state dir rejoins; its ledger continues
    deployment.start_site(1)
    deployment.wait_online(n, timeout=120)
    mark("site 1 back online")
    # 3. the SuperLink is killed mid-run (after round 1 of 2 is checkpointed) and restarted
    #    with its --database; the interrupted run cannot report completed
    config = {**FAULTY, "num-server-rounds": 2, "min-train-nodes": n, "min-evaluate-nodes": n,
              "min-available-nodes": n, "round-timeout": 120.0}
    earlier = set(server.glob("run-*"))
    thread, out = run_in_thread(deployment, config, timeout=300)
    wait_for(lambda: new_runs() and (new_runs()[0] / "checkpoints" / "LATEST").is_file(),
             "round 1 of the second fault run to be checkpointed", 300)
    interrupted = new_runs()[0]
    deployment.kill("superlink")
    mark("killed the SuperLink")
    deployment.start_superlink(timeout=60)
    thread.join(320)
    assert "result" not in out, "a run whose SuperLink crashed reported completed"
    mark("run 2 ended")
    deployment.wait_online(n, timeout=150)  # every SuperNode reconnects on its own
    mark(f"{n} SuperNodes back online")

    # 4. resume from the interrupted run's latest checkpoint: only the rounds left are trained
    latest = interrupted / "checkpoints" / (interrupted / "checkpoints" / "LATEST").read_text().strip()
    done = int(latest.name.split("-")[1])
    before = [len(sgd_rounds(deployment, k)) for k in range(n)]
    resumed = deployment.run({**config, "num-server-rounds": 2 - done, "resume-from": str(latest)}, timeout=300,
                             stream_to=None)
    mark("run 3 (resumed) completed")
    for k in range(n):
        assert sgd_rounds(deployment, k, resumed["run_id"]) == list(range(1, 2 - done + 1))
        assert len(sgd_rounds(deployment, k)) == before[k] + 2 - done
    assert json.loads((resumed["run_dir"] / "init_checkpoint.json").read_text())["source"] == "resume-from"

    # 5. site 1 dies again and min-train-nodes (every site) cannot be met: the run fails within its bounds
    deployment.kill("supernode-1")
    started = time.monotonic()
    with pytest.raises(RunFailed) as failed:
        deployment.run({**config, "num-server-rounds": 1, "node-wait-timeout": 10.0, "round-timeout": 45.0},
                       timeout=240, stream_to=None)
    mark("run 4 failed")
    assert time.monotonic() - started < 240
    assert failed.value.status != "finished:completed"
    summary = (failed.value.run_dir / "summary.md").read_text()
    assert f"ended: failed: round 1: {n - 1} site(s) trained, fewer than min-train-nodes {n}" in summary, summary
    assert "checkpoints" not in {p.name for p in failed.value.run_dir.iterdir()} or \
        not (failed.value.run_dir / "checkpoints" / "round-0001").exists()


def test_the_deployment_stops_every_process_and_its_ledgers_audit_clean(walkthrough, capsys):
    """Last: `python -m deploy.local` goes on from its after_run hook, stops every process it
    started (the restarted ones too) and prints where the outputs are."""
    held, deployment, run_dir = walkthrough.held, walkthrough.deployment, walkthrough.run_dir
    pids = held.pids + [p.pid for p in deployment.procs.values()]
    assert held.finish() == 0
    printed = capsys.readouterr().out
    best = (run_dir / "checkpoints" / "BEST").read_text().strip()
    assert f"selected checkpoint (BEST): {run_dir / 'checkpoints' / best}" in printed
    assert not any(alive(pid) for pid in pids), "a deployment process outlived stop()"
    # the sites' ledgers (one hash chain each across the walkthrough's run, the crashes, the restart and
    # the fault runs) audit clean, and each is at the head the server witnessed last
    states = [str(deployment.site_dir(k) / "state") for k in range(deployment.num_sites)]
    assert cli_main(["audit", *states, "--federation-state", str(walkthrough.witness), "--accountants", "rdp"]) == 0


def assert_no_secrets_or_captions(deployment, result):
    """Issue 12: no private-key material and no caption text from the sites' data in any log, metric
    or output of the deployment (process logs, the streamed run log, the server's run folder)."""
    texts = {"flwr run": result["log"]}
    for path in [*(deployment.workdir / "logs").glob("*.log"), *result["run_dir"].rglob("*")]:
        if path.is_file() and path.suffix != ".safetensors" and path.suffix != ".png":
            texts[str(path)] = path.read_text(errors="replace")
    assert len(texts) > 5
    secrets = [deployment.creds / "server.key", deployment.creds / "ca.key",
               *(deployment.creds / name / "site.key" for name in deployment.names)]
    needles = []
    for key in secrets:
        if key.exists():
            body = [line for line in key.read_text().splitlines() if line and not line.startswith("-----")]
            needles += [line for line in body if len(line) >= 40][:2]
    assert needles, "no private key found to look for"
    captions = set()
    for k in range(deployment.num_sites):
        doc = json.loads((deployment.data_dir(k) / "captions.json").read_text())
        captions |= {a["caption"] for a in doc["annotations"]}
    assert len(captions) > 5
    for where, text in texts.items():
        assert "PRIVATE KEY" not in text, where
        assert not any(n in text for n in needles), f"private-key material in {where}"
        leaked = [c for c in captions if c in text]
        assert not leaked, f"site caption {leaked[0]!r} in {where}"

