"""Deployment: credentials, COCO site folders, and a real loopback federation (SuperLink with TLS,
node authentication and a database; one authenticated SuperNode per site; `flwr run . <connection>`),
run once, as issue 23's operator walkthrough on the operator's own folders (the only test here that
starts processes)."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from deploy.credentials import make_site_key, make_tls
from deploy.local import LoopbackDeployment, main as deploy_main, run_overrides, site_folders
from deploy.site_folders import export_sites, write_coco_folder
from shared_model.data.loaders import load_dataset
from shared_model.data.public import load_public
from shared_model.data.synthetic import load_embedded
from runners.flower_runtime import alive, descendants, free_port
from shared_model.privacy.reply import BUDGET_METRICS
from shared_model.privacy.ledger import PrivacyLedger
from runners.cli import main as cli_main

TINY = {"num-server-rounds": 2, "local-epochs": 1, "batch-size": 32, "image-size": 32, "model-d-model": 32,
        "model-num-heads": 2, "model-ffn-dim": 32, "model-dropout": 0.0, "server-eval-size": 30,
        "target-epsilon": 100.0, "target-delta": 0.9,
        # no caption gallery: the embedded grammar is small, so the server's own test captions (and the
        # model's) can equal a site's caption word for word, which the leak scan below would report
        "gallery-size": 0}  # the run config's budget must not override the sites' own (tests/test_faults.py)


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


def test_operator_walkthrough_on_its_own_folders(tmp_path, capsys):
    """Issue 23's walkthrough, as a new operator runs it from the docs: three site folders, a public
    folder, the server's validation folder and a test folder, all made here from generated images;
    `fedcap vocab` and `fedcap pretrain` on the public folder, `python -m deploy.local` on the
    sites' folders with DP (real TLS, node authentication, one SuperNode per site),
    `fedcap evaluate` of checkpoints/BEST, its gallery and the audit of the sites' ledgers."""
    sites = tmp_path / "sites"
    records = load_embedded("train", 300, image_size=32)  # 100 per site: the noisy record count (std 20) stays > 0
    for k, name in enumerate(["hospital-a", "hospital-b", "hospital-c"]):
        write_coco_folder(records.subset(range(100 * k, 100 * k + 100)), sites / name)
    public = write_coco_folder(load_public(60, image_size=32), tmp_path / "public")
    val = write_coco_folder(load_embedded("val", 20, image_size=32), tmp_path / "server-val")
    test = write_coco_folder(load_embedded("test", 20, image_size=32), tmp_path / "test")

    # 1. the vocabulary and the pretrained model, from public data only
    assert cli_main(["vocab", str(public), "--out", str(tmp_path / "vocab.json")]) == 0
    assert cli_main(["pretrain", "--data", str(public), "--vocab-file", str(tmp_path / "vocab.json"),
                     "--epochs", "1", "--batch-size", "16", "--test-size", "10", "--out", str(tmp_path / "pre")]) == 0
    pre = json.loads((tmp_path / "pre" / "config.json").read_text())  # what ran: public folder, non-private
    assert pre["kind"] == "pretrained" and pre["private"] is False and pre["data"]["folders"] == [str(public)]
    assert pre["data"]["vocabulary"] == str(tmp_path / "vocab.json") and "accountant" not in pre["centralized"]
    capsys.readouterr()

    # 2. the federation on the sites' own folders, each site with its own budget (6, 1e-5); the run
    # config's (100, 0.9) must not override it. No caption gallery: the embedded grammar is small, so the
    # server's own captions can equal a site's word for word, which the leak scan would report
    (tmp_path / "run.toml").write_text("num-server-rounds = 2\nlocal-epochs = 1\nbatch-size = 32\n"
                                       "server-eval-size = 30\ntarget-epsilon = 100.0\ntarget-delta = 0.9\n"
                                       "gallery-size = 0\n")
    live = {}

    def while_up(deployment, result):
        # a SuperNode whose key was never registered is refused by the SuperLink
        make_site_key(deployment.creds, "intruder")
        stranger = deployment._spawn("intruder", [
            "flower-supernode", "--superlink", f"127.0.0.1:{deployment.port}",
            "--root-certificates", str(deployment.creds / "ca.crt"),
            "--auth-supernode-private-key", str(deployment.creds / "intruder" / "site.key"),
            "--port", str(free_port()), "--node-config", 'site-name="intruder"', "--max-retries", "0"],
            deployment.env)
        stranger.wait(timeout=120)
        live.update(deployment=deployment, result=result, intruder=stranger.returncode,
                    online=deployment.online_nodes(), pids=[p.pid for p in deployment.procs.values()],
                    defunct=defunct_below([p.pid for p in deployment.procs.values()]))

    workdir = tmp_path / "deploy"
    assert deploy_main(["--workdir", str(workdir), "--data-dir", str(sites), "--server-eval-data", str(val),
                        "--init-from", str(tmp_path / "pre" / "checkpoint"), "--run-config", str(tmp_path / "run.toml"),
                        "--target-epsilon", "6", "--timeout", "900"], after_run=while_up) == 0
    printed = capsys.readouterr().out
    deployment, result = live["deployment"], live["result"]
    assert live["intruder"] != 0 and live["online"] == 3
    assert not any(alive(pid) for pid in live["pids"]), "a deployment process outlived stop()"
    # Flower's SuperExec leaves each finished app process <defunct> until it starts the next one
    # (docs/deployment.md, "Stopping"): a few at most (one SuperExec per site and the SuperLink's), all
    # flwr-serverapp/flwr-clientapp, never one of ours
    assert all(name in ("flwr-serverapp", "flwr-clientapp") for name in live["defunct"]), live["defunct"]
    assert len(live["defunct"]) <= 2 * (deployment.num_sites + 1), live["defunct"]
    run_dir = result["run_dir"]
    best = (run_dir / "checkpoints" / "BEST").read_text().strip()
    assert f"selected checkpoint (BEST): {run_dir / 'checkpoints' / best}" in printed
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "round-0002"
    run_config = json.loads((run_dir / "run_config.json").read_text())  # the run as it happened
    assert run_config["server-eval-data"] == str(val)
    assert run_config["init-from"] == str(tmp_path / "pre" / "checkpoint")
    assert json.loads((run_dir / "init_checkpoint.json").read_text())["source"] == "init-from"
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    # DP sites keep their held-out metrics unless their node_config shares them (docs/privacy.md)
    federated = run_dir / "federated.jsonl"
    assert not federated.exists() or all(not json.loads(line)["sites"] for line in federated.read_text().splitlines())
    witness = workdir / "server" / "federation-state.json"
    witnessed = json.loads(witness.read_text())["sites"]
    summary = (run_dir / "summary.md").read_text()
    assert "Scored on the server's evaluation set, greedy decoding (beam 1)" in summary
    assert "evaluate-error" not in summary  # a site that withholds held-out metrics says so, it does not fail
    states = []
    for k, name in enumerate(["hospital-a", "hospital-b", "hospital-c"]):
        states.append(deployment.site_dir(k) / "state")
        lines = PrivacyLedger(states[-1] / "ledger.jsonl").records()
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
        assert not (sites / name / "cache").exists() and not list((sites / name).glob("*.npz"))  # data untouched
    assert "ended: completed" in summary and "rounds trained: 2 of 2" in summary
    assert_no_secrets_or_captions(deployment, result)

    # 3. the selected checkpoint: one score per model (fedcap evaluate's default decoding is the server's),
    # then its score on the test folder, its gallery and the audit
    checkpoint = run_dir / "checkpoints" / best
    assert cli_main(["evaluate", str(checkpoint), str(val), "--no-meteor", "--json", str(tmp_path / "val.json")]) == 0
    again = json.loads((tmp_path / "val.json").read_text())
    assert again["decoding"] == "greedy decoding (beam 1)"
    assert again["metrics"]["CIDEr-D"] == pytest.approx(next(r for r in rounds if f"round-{r['round']:04d}" == best)
                                                        ["CIDEr-D"], abs=1e-9)
    assert cli_main(["evaluate", str(checkpoint), str(test), "--no-meteor"]) == 0
    assert f"on {test} (20 images, greedy decoding (beam 1))" in capsys.readouterr().out
    assert cli_main(["caption", str(checkpoint), "--data", str(test), "--gallery", str(tmp_path / "gallery"),
                     "--gallery-size", "3"]) == 0
    gallery = (tmp_path / "gallery" / "gallery.md").read_text()
    assert gallery.startswith(f"## What the model says: run-{result['run_id']}/{best}, greedy decoding (beam 1)")
    capsys.readouterr()
    assert cli_main(["audit", *map(str, states), "--federation-state", str(witness)]) == 0
    audited = capsys.readouterr().out
    assert all(name in audited for name in ("hospital-a", "hospital-b", "hospital-c"))


def defunct_below(pids: list[int]) -> list[str]:
    """The command names of the zombie processes below `pids`."""
    found = []
    for pid in {d for p in pids for d in descendants(p)}:
        try:
            stat = (Path("/proc") / str(pid) / "stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            found.append(stat[stat.index("(") + 1: stat.rindex(")")])
    return found


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

