"""A complete FedCap deployment on one machine, over loopback, exactly as real sites run it.

    python -m deploy.local [--sites 2] [--workdir .fedcap/deploy] [--run-config FILE] [--timeout 3600]
    python -m deploy.local --data-dir SITE_A --data-dir SITE_B ... [--format coco]
                           [--server-eval-data DIR] [--init-from CHECKPOINT] [--image-size N]

1. credentials: a CA, a SuperLink certificate for 127.0.0.1, one ECDSA key pair per site
   (deploy.credentials);
2. site data: the operator's own folders (`--data-dir`, one per site, or one folder of site
   folders; each site is named after its folder and reads it in place), else one COCO captions
   folder per site cut from the embedded data (deploy.site_folders);
3. `flower-superlink` with TLS, `--enable-supernode-auth`, a `--database` file and no runtime
   dependency install;
4. `flwr supernode register` of each site's public key;
5. one `flower-supernode` per site: TLS against the CA, its private key, its own port, and its
   node_config (`site-name`, `data-dir`, `dataset-format`, `state-dir`, and the site's own budget
   `target-epsilon`/`target-delta`, which the server cannot override);
6. `flwr run . <connection> --stream`, bounded by a timeout, then the run's real status from
   `flwr list`;
7. every process it started is stopped by PID (with its children), also on error or Ctrl-C.

Everything it writes lives under --workdir: credentials/, sites/<site>/{state,state-cache,flwr-home}/
(and data/ for the embedded demo), server/ (the run folders), logs/, pids/ and the SuperLink's
state.db. Real sites run the same commands on their own machines (docs/deployment.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from shared_model.run_settings import simulation_only_overrides, validate_run_config
from runners.flower_runtime import (ROOT, RunFailed, alive, default_run_config, flower_env, flwr_run,
                                                 free_port, stop_pids)
from runners.progress import RoundLines

CONNECTION = "fedcap-deploy"
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a node_config value, a file name and a log label
# CaptionerConfig fields a run config cannot or need not restate for init-from (server/initial_model.py)
_TRAINING_ONLY = ("encoder_weights", "freeze_encoder", "dropout")


def site_folders(data_dirs: list[str | Path]) -> list[Path]:
    """The sites' data folders: each given folder, or the subfolders of a single folder that holds
    only folders (a folder of site folders). A site is named after its folder."""
    folders = [Path(d).expanduser().absolute() for d in data_dirs]
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"--data-dir folder not found: {folder}")
    if len(folders) == 1:
        entries = [e for e in folders[0].iterdir() if not e.name.startswith(".")]
        if entries and all(e.is_dir() for e in entries):  # no file of its own: a folder of site folders
            folders = sorted(entries)
    names = [f.name for f in folders]
    for folder in folders:
        if not SITE_NAME.fullmatch(folder.name):
            raise ValueError(f"a site is named after its folder, and {folder} is not a plain name "
                             f"(letters, digits, '.', '_', '-'): rename the folder")
    if len(set(names)) != len(names):
        raise ValueError(f"two site folders have the same name (a site's name is its folder's): "
                         f"{[str(f) for f in folders if names.count(f.name) > 1]}")
    return folders


def checkpoint_model_keys(checkpoint: str | Path) -> dict:
    """The run config's model keys that describe `checkpoint`'s model (its config.json), so the
    sites build the model that init-from loads."""
    from shared_model.model.config import RUN_CONFIG_KEYS

    path = Path(checkpoint).expanduser() / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--init-from {checkpoint} is not a checkpoint folder (no config.json)")
    model = json.loads(path.read_text())["model"]
    return {key: model[field] for key, field in RUN_CONFIG_KEYS.items()
            if field in model and field not in _TRAINING_ONLY}


class LoopbackDeployment:
    """SuperLink + one SuperNode per site on 127.0.0.1, with TLS and node authentication."""

    def __init__(self, workdir: str | Path, *, num_sites: int = 2, data_dirs: list[str | Path] | None = None,
                 dataset_format: str = "coco", target_epsilon: float = 8.0, target_delta: float = 1e-5,
                 host: str = "127.0.0.1") -> None:
        """`data_dirs`: the operator's site folders (site_folders), read in place; None: `num_sites`
        folders cut from the embedded data into the workdir by prepare()."""
        self.data_dirs = site_folders(data_dirs) if data_dirs else None
        if self.data_dirs is None and num_sites < 1:
            raise ValueError(f"num_sites must be >= 1, got {num_sites}")
        self.names = [f.name for f in self.data_dirs] if self.data_dirs else [f"site-{k}" for k in range(num_sites)]
        self.workdir = Path(workdir).absolute()
        self.num_sites, self.host, self.dataset_format = len(self.names), host, dataset_format
        self.target_epsilon, self.target_delta = float(target_epsilon), float(target_delta)
        self.creds = self.workdir / "credentials"
        self.flwr_home = self.workdir / "flwr-home"
        self.env = flower_env(self.flwr_home)
        self.procs: dict[str, subprocess.Popen] = {}
        self.port: int | None = None

    def site_dir(self, k: int) -> Path:
        """Site k's folder in the workdir: its state, its cache, its FLWR_HOME (and the embedded demo's data)."""
        return self.workdir / "sites" / self.names[k]

    def data_dir(self, k: int) -> Path:
        return self.data_dirs[k] if self.data_dirs else self.site_dir(k) / "data"

    # -- setup -------------------------------------------------------------------------------
    def prepare(self, *, train_size: int = 4000, image_size: int = 64, seed: int = 0) -> None:
        """Credentials and, for the embedded demo, site data folders (kept when they exist: a site's
        data and ledger persist); the operator's own folders are used where they are."""
        from .credentials import make_site_key, make_tls
        from .site_folders import export_sites

        if not (self.creds / "server.pem").exists():
            make_tls(self.creds, [self.host])
        for name in self.names:
            if not (self.creds / name / "site.key").exists():
                make_site_key(self.creds, name)
        if self.data_dirs is not None:
            return
        if not all((self.site_dir(k) / "data" / "captions.json").exists() for k in range(self.num_sites)):
            tmp = self.workdir / "sites-export"
            for k, folder in enumerate(export_sites(tmp, self.num_sites, train_size=train_size, seed=seed,
                                                    image_size=image_size)):
                self.site_dir(k).mkdir(parents=True, exist_ok=True)
                os.replace(folder, self.site_dir(k) / "data")
            tmp.rmdir()

    # -- processes ---------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        (self.workdir / "pids").mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "logs" / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, env=env, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        (self.workdir / "pids" / f"{name}.pid").write_text(str(proc.pid))
        self.procs[name] = proc
        return proc

    def _log_tail(self, name: str, chars: int = 2000) -> str:
        path = self.workdir / "logs" / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"

    def _flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=self.env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)

    def start(self, *, timeout: float = 120) -> None:
        """SuperLink up, sites registered, every SuperNode online (or RuntimeError with the logs)."""
        self.port = free_port(self.host)
        address = f"{self.host}:{self.port}"
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n'
            f'root-certificates = "{self.creds / "ca.crt"}"\n')
        self.start_superlink(timeout=timeout)
        for k in range(self.num_sites):
            self.register(k)
        for k in range(self.num_sites):
            self.start_site(k)
        self._wait(lambda: self.online_nodes() >= self.num_sites, f"{self.num_sites} SuperNodes to come online",
                   "supernode-0", timeout)

    def start_superlink(self, *, timeout: float = 120) -> subprocess.Popen:
        """`flower-superlink` on self.port with its `--database` (state.db): a SuperLink restarted
        after a crash keeps the registered nodes, the runs and their status."""
        proc = self._spawn("superlink", [
            "flower-superlink", "--ssl-ca-certfile", str(self.creds / "ca.crt"),
            "--ssl-certfile", str(self.creds / "server.pem"), "--ssl-keyfile", str(self.creds / "server.key"),
            "--enable-supernode-auth", "--database", str(self.workdir / "state.db"),
            "--disable-runtime-dependency-installation", "--host", self.host, "--port", str(self.port)], self.env)
        self._wait(lambda: self._listening(), "the SuperLink to listen", "superlink", timeout)
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL a process this deployment started and its children (its process group), as a
        crash or a pulled plug would: no clean shutdown, no deactivation message to the SuperLink."""
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
        (self.workdir / "pids" / f"{name}.pid").unlink(missing_ok=True)

    def wait_online(self, n: int, *, timeout: float = 120) -> None:
        """Until the SuperLink lists exactly `n` SuperNodes online (a killed node stays listed until
        its heartbeats lapse: 2 x 30 s in Flower 1.42)."""
        self._wait(lambda: self.online_nodes() == n, f"{n} SuperNode(s) online", "superlink", timeout)

    def register(self, k: int) -> None:
        name = self.names[k]
        out = self._flwr("supernode", "register", str(self.creds / name / "site.pub"), CONNECTION,
                         "--name", name, "--format", "json")
        if out.returncode != 0 and "already" not in (out.stdout + out.stderr).lower():
            raise RuntimeError(f"registering {name} failed: {out.stdout[-1000:]} {out.stderr[-1000:]}")

    def node_config(self, k: int) -> str:
        site = self.site_dir(k)
        return " ".join([f'site-name="{self.names[k]}"', f'data-dir="{self.data_dir(k)}"',
                         f'dataset-format="{self.dataset_format}"', f'state-dir="{site / "state"}"',
                         f"target-epsilon={self.target_epsilon!r}", f"target-delta={self.target_delta!r}"])

    def start_site(self, k: int) -> subprocess.Popen:
        env = flower_env(self.site_dir(k) / "flwr-home")
        return self._spawn(f"supernode-{k}", [
            "flower-supernode", "--superlink", f"{self.host}:{self.port}",
            "--root-certificates", str(self.creds / "ca.crt"),
            "--auth-supernode-private-key", str(self.creds / self.names[k] / "site.key"),
            "--port", str(free_port(self.host)), "--node-config", self.node_config(k)], env)

    def _listening(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                return True
        except OSError:
            return False

    def online_nodes(self) -> int:
        out = self._flwr("supernode", "list", CONNECTION, "--format", "json")
        try:
            return sum(n["status"] == "online" for n in json.loads(out.stdout)["nodes"])
        except (json.JSONDecodeError, KeyError):
            return 0

    def _wait(self, ready, what: str, log_name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0]} exited with code {self.procs[dead[0]].returncode} while waiting "
                                   f"for {what}; log tail:\n{self._log_tail(dead[0])}")
            if ready():
                return
            time.sleep(1)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}; log tail:\n{self._log_tail(log_name)}")

    # -- a run -------------------------------------------------------------------------------
    def run(self, run_config: dict | None = None, *, timeout: float = 3600, stream_to=sys.stdout) -> dict:
        """`flwr run . <connection>`; returns {"run_id", "status", "run_dir", "log"}; RunFailed unless
        the run's status is finished:completed; TypeError/ValueError for a bad setting."""
        config = {"output-dir": str(self.workdir / "server"), "min-train-nodes": self.num_sites,
                  "min-evaluate-nodes": self.num_sites, "min-available-nodes": self.num_sites, **(run_config or {})}
        config["output-dir"] = str(Path(str(config["output-dir"])).absolute())
        defaults = default_run_config()
        validate_run_config({**defaults, **config})  # the ServerApp's own schema, before Flower
        for key, value in simulation_only_overrides(config, defaults).items():  # the sites ignore them: say so
            print(f"warning: run-config {key} = {value!r} is simulation-only; deployed sites ignore it (their "
                  f"node_config decides)", file=sys.stderr)
        run_id, status, log = flwr_run(config, self.env, timeout=timeout, stream_to=stream_to, connection=CONNECTION)
        run_dir = Path(config["output-dir"]) / f"run-{run_id}"
        if status != "finished:completed":
            raise RunFailed(run_id, status, run_dir, log)
        return {"run_id": run_id, "status": status, "run_dir": run_dir, "log": log}

    def stop(self) -> None:
        """Stop every process this deployment started (and any left in pids/ by an earlier one)."""
        pids = {p.pid for p in self.procs.values()}
        for f in (self.workdir / "pids").glob("*.pid") if (self.workdir / "pids").is_dir() else []:
            try:
                pids.add(int(f.read_text()))
            except ValueError:
                pass
            f.unlink()
        stop_pids(sorted(p for p in pids if alive(p)))
        for p in self.procs.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()

    def __enter__(self) -> "LoopbackDeployment":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def run_overrides(args: argparse.Namespace) -> dict:
    """The run-config overrides: --run-config's (flat keys or a [tool.flwr.app.config] table), then
    the flags (--server-eval-data, --init-from and the model keys of its checkpoint, --image-size)."""
    overrides = tomllib.loads(args.run_config.read_text()) if args.run_config else {}
    overrides = overrides.get("tool", {}).get("flwr", {}).get("app", {}).get("config", overrides)
    if args.server_eval_data is not None:
        folder = args.server_eval_data.expanduser().absolute()
        if not folder.is_dir():
            raise FileNotFoundError(f"--server-eval-data folder not found: {folder}")
        overrides.update({"server-eval-data": str(folder), "server-eval-format": args.format})
    if args.image_size is not None:
        overrides["image-size"] = args.image_size
    if args.init_from is not None:
        checkpoint = args.init_from.expanduser().absolute()
        for key, value in checkpoint_model_keys(checkpoint).items():
            if key in overrides and overrides[key] != value:
                raise ValueError(f"--init-from {checkpoint} has {key} = {value!r} but the run config or a flag "
                                 f"gives {overrides[key]!r}: drop the setting (the checkpoint decides the model)")
            overrides[key] = value
        overrides["init-from"] = str(checkpoint)
    return overrides


def main(argv: list[str] | None = None, *, after_run=None) -> int:
    """The command line; `after_run(deployment, result)`, if given, is called once the run completed
    and before every process stops (tests look at the live deployment there)."""
    from runners.cli import HelpFormatter

    parser = argparse.ArgumentParser(prog="python -m deploy.local", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter,
                                     epilog="Flags override --run-config; the run config's defaults are "
                                            "pyproject.toml's [tool.flwr.app.config]. docs/deployment.md")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".fedcap" / "deploy",
                        help="credentials, site state, server run folders, logs")
    data = parser.add_argument_group("the sites' data (default: cut from the embedded data)")
    data.add_argument("--data-dir", type=Path, action="append", metavar="DIR",
                      help="a site's own data folder, read in place; repeat for each site, or give one folder of "
                           "site folders. A site is named after its folder")
    data.add_argument("--format", default="coco", choices=("coco", "karpathy", "csv", "jsonl"),
                      help="format of every --data-dir and of --server-eval-data (docs/data.md)")
    data.add_argument("--sites", type=int, help="without --data-dir: sites cut from the embedded data (2 if not "
                                                "given)")
    data.add_argument("--train-size", type=int, default=4000,
                      help="without --data-dir: records cut into the sites' data folders")
    server = parser.add_argument_group("the server's side (run-config keys)")
    server.add_argument("--server-eval-data", type=Path, metavar="DIR",
                        help="the server's own validation folder (server-eval-data): scores every round and picks "
                             "checkpoints/BEST. Best a folder that looks like the sites' data and is neither the "
                             "public pretraining data nor the test folder you report on (default: the embedded "
                             "test split)")
    server.add_argument("--init-from", type=Path, metavar="CHECKPOINT",
                        help="start from a pretrained checkpoint (fedcap pretrain); its model keys and vocabulary "
                             "become the run's")
    server.add_argument("--image-size", type=int, help="the run's image-size (default: the run config's, or "
                                                       "--init-from's)")
    server.add_argument("--run-config", type=Path, help="TOML file of run-config overrides")
    budget = parser.add_argument_group("each site's budget (its node_config, which the server cannot override)")
    budget.add_argument("--target-epsilon", type=float, default=8.0, help="each site's lifetime epsilon per record")
    budget.add_argument("--target-delta", type=float, default=1e-5, help="each site's delta")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds the run may take")
    parser.add_argument("--stop", action="store_true", help="only stop the processes a previous run left")
    args = parser.parse_args(argv)
    if args.data_dir and args.sites is not None:
        parser.error("--sites counts the embedded demo's sites; with --data-dir each folder is a site")
    if args.stop:
        LoopbackDeployment(args.workdir).stop()
        return 0
    try:
        overrides = run_overrides(args)
        deployment = LoopbackDeployment(args.workdir, num_sites=args.sites or 2, data_dirs=args.data_dir,
                                        dataset_format=args.format, target_epsilon=args.target_epsilon,
                                        target_delta=args.target_delta)
        run_config = {**default_run_config(), **overrides}
        with deployment:
            deployment.prepare(train_size=args.train_size, image_size=int(run_config["image-size"]))
            deployment.start()
            print(f"SuperLink on {deployment.host}:{deployment.port} (TLS, node authentication); "
                  f"{deployment.num_sites} SuperNodes online: {', '.join(deployment.names)}", flush=True)
            result = deployment.run(overrides, timeout=args.timeout,
                                    stream_to=RoundLines(sys.stdout, num_rounds=run_config["num-server-rounds"]))
            if after_run is not None:
                after_run(deployment, result)
    except (RuntimeError, ValueError, TypeError, FileNotFoundError, tomllib.TOMLDecodeError) as e:
        print(f"deployment failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    run_dir, states = result["run_dir"], [deployment.site_dir(k) / "state" for k in range(deployment.num_sites)]
    best = run_dir / "checkpoints" / "BEST"
    print(f"\nrun {result['run_id']} {result['status']}; server outputs: {run_dir} (summary.md)")
    if best.is_file():
        print(f"selected checkpoint (BEST): {run_dir / 'checkpoints' / best.read_text().strip()}")
    for name, state in zip(deployment.names, states):
        print(f"{name} ledger: {state / 'ledger.jsonl'}")
    witness = run_config.get("federation-state") or run_dir.parent / "federation-state.json"
    print(f"audit: fedcap audit {' '.join(map(str, states))} --federation-state {witness}")
    print(f"process logs: {deployment.workdir / 'logs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
