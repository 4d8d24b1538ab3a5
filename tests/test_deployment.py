"""Deployment: credentials, COCO site folders, and a real loopback federation (SuperLink with TLS,
node authentication and a database; one authenticated SuperNode per site; `flwr run . <connection>`)."""

import json

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from deploy.credentials import make_site_key, make_tls
from deploy.local import LoopbackDeployment
from shared_model.runners.flower_runtime import alive, free_port
from deploy.site_data import export_sites, write_coco_folder
from shared_model.data import load_dataset, load_embedded
from shared_model.privacy import PrivacyLedger
from shared_model.runners import main as cli_main

TINY = {"num-server-rounds": 2, "local-epochs": 1, "batch-size": 32, "image-size": 32, "model-d-model": 32,
        "model-num-heads": 2, "model-ffn-dim": 32, "model-dropout": 0.0, "server-eval-size": 30,
        "target-epsilon": 100.0, "target-delta": 0.9,
        # no caption gallery: the embedded grammar is small, so the server's own test captions (and the
        # model's) can equal a site's caption word for word, which the leak scan below would report
        "gallery-size": 0}  # the run config's budget must not override the sites' own


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


def test_loopback_deployment_with_tls_and_node_auth(tmp_path):
    # the server's own evaluation folder and operator-supplied vocabulary (item 5), as files
    eval_dir = write_coco_folder(load_embedded("test", 30, image_size=32), tmp_path / "server-eval")
    # the operator builds the vocabulary from public text (here: the server's own folder) with fedcap vocab
    assert cli_main(["vocab", str(eval_dir), "--out", str(tmp_path / "vocab.json")]) == 0
    run_config = {**TINY, "server-eval-data": str(eval_dir), "vocab-file": str(tmp_path / "vocab.json")}
    deployment = LoopbackDeployment(tmp_path / "deploy", num_sites=2, target_epsilon=6.0)
    with deployment:
        deployment.prepare(train_size=200, image_size=32)
        deployment.start(timeout=180)
        result = deployment.run(run_config, timeout=600, stream_to=None)

        # a SuperNode whose key was never registered is refused by the SuperLink
        make_site_key(deployment.creds, "intruder")
        stranger = deployment._spawn("intruder", [
            "flower-supernode", "--superlink", f"127.0.0.1:{deployment.port}",
            "--root-certificates", str(deployment.creds / "ca.crt"),
            "--auth-supernode-private-key", str(deployment.creds / "intruder" / "site.key"),
            "--port", str(free_port()), "--node-config", 'site-name="intruder"', "--max-retries", "0"],
            deployment.env)
        stranger.wait(timeout=120)
        assert stranger.returncode != 0
        assert deployment.online_nodes() == 2
        pids = [p.pid for p in deployment.procs.values()]

    assert not any(alive(pid) for pid in pids), "a deployment process outlived stop()"
    run_dir = result["run_dir"]
    assert (run_dir / "checkpoints" / "round-0002" / "model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "round-0002"
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    federated = [json.loads(line) for line in (run_dir / "federated.jsonl").read_text().splitlines()]
    assert [r["round"] for r in federated] == [0, 1, 2]  # 0 and 1 inside the train messages (evaluate-in-train)
    assert [sorted(r["sites"]) for r in federated] == [["site-0", "site-1"]] * 3  # names from node_config
    witnessed = json.loads((deployment.workdir / "server" / "federation-state.json").read_text())["sites"]
    summary = (run_dir / "summary.md").read_text()
    for k in range(2):
        lines = PrivacyLedger(deployment.site_dir(k) / "state" / "ledger.jsonl").records()
        records = [r for r in lines if r["kind"] == "dp-sgd"]
        assert [r["server_round"] for r in records] == [1, 2]
        assert {r["run_id"] for r in lines} == {result["run_id"]}
        # the site's budget and delta, never the run config's (100, 0.9); a quarter of it granted per run
        assert all((r["target_epsilon"], r["target_delta"]) == (6.0, 1e-5) for r in lines)
        assert lines[0]["kind"] == "grant" and lines[0]["granted_epsilon"] == 1.5
        assert 0 < records[-1]["epsilon"] <= 1.5 * (1 + 1e-6)
        assert witnessed[f"site-{k}"]["head"] == lines[-1]["hash"] and witnessed[f"site-{k}"]["records"] == 3
        # the summary shows the budget the site reported (its ledger's epsilon), never the run config's
        assert f"| site-{k} | {records[-1]['epsilon']:.4g} | 1e-05 |" in summary
    assert "site budget (simulation)" not in summary and "ended: completed" in summary and "rounds trained: 2 of 2" in summary
    assert_no_secrets_or_captions(deployment, result)


def assert_no_secrets_or_captions(deployment, result):
    """Issue 12: no private-key material and no caption text from the sites' data in any log, metric
    or output of the deployment (process logs, the streamed run log, the server's run folder)."""
    texts = {"flwr run": result["log"]}
    for path in [*(deployment.workdir / "logs").glob("*.log"), *result["run_dir"].rglob("*")]:
        if path.is_file() and path.suffix != ".safetensors" and path.suffix != ".png":
            texts[str(path)] = path.read_text(errors="replace")
    assert len(texts) > 5
    secrets = [deployment.creds / "server.key", deployment.creds / "ca.key",
               *(deployment.creds / f"site-{k}" / "site.key" for k in range(deployment.num_sites))]
    needles = []
    for key in secrets:
        if key.exists():
            body = [line for line in key.read_text().splitlines() if line and not line.startswith("-----")]
            needles += [line for line in body if len(line) >= 40][:2]
    assert needles, "no private key found to look for"
    captions = set()
    for k in range(deployment.num_sites):
        doc = json.loads((deployment.site_dir(k) / "data" / "captions.json").read_text())
        captions |= {a["caption"] for a in doc["annotations"]}
    assert len(captions) > 5
    for where, text in texts.items():
        assert "PRIVATE KEY" not in text, where
        assert not any(n in text for n in needles), f"private-key material in {where}"
        leaked = [c for c in captions if c in text]
        assert not leaked, f"site caption {leaked[0]!r} in {where}"

