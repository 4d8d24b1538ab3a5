"""The one schema of FedCap's settings: every run-config key ([tool.flwr.app.config], the
federation's plan) and every node_config key (a site's identity, data, state and own budget),
each with its type and range. No Flower import: the ServerApp, the ClientApp, the simulation
runner and the tests all check settings here, with the same messages.

`validate_run_config(run_config)` and `validate_node_config(node_config)` reject unknown keys, wrong
types (TypeError) and values out of range (ValueError); each message names the key and the value,
e.g. "lr must be a number > 0, got 'fast'". Both return a normalised copy (ints given for floats
become floats).

One default per setting. A run-config default lives only in pyproject.toml's
[tool.flwr.app.config]: Flower hands the apps a complete run config, `default_run_config()` reads the
same table (through this schema) for every program outside Flower, and `validate_run_config` refuses
a run config that lacks a key, so no code reads a run-config key with a fallback of its own. A
node_config default (a key a site may leave out) lives only in `NODE_CONFIG` (`Setting.default`);
`validate_node_config` fills it in. Keys marked `simulation_only` (the simulated sites' data,
budget, seeds and canaries) mean nothing to a deployed site: `simulation_only_overrides` names those
a run config sets away from their defaults, for deployment tools to refuse and deployed sites to warn
about.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from shared_model.data.formats import FORMATS as DATASET_FORMATS
from shared_model.data.partition import METHODS as PARTITIONERS
from shared_model.data.synthetic import SCENARIOS
from shared_model.model.config import DECODERS, ENCODERS, FUSIONS
from shared_model.model.devices import DEVICE_PATTERN
from shared_model.model.optimizers import OPTIMIZERS
from shared_model.model.precision import PRECISIONS, check_precision
from shared_model.model.trainable import TRAINABLE
from shared_model.privacy.accounting import DEFAULT_ACCOUNTANT, OPACUS_ACCOUNTANTS
from shared_model.privacy.dp import GRAD_SAMPLE_CHOICES, check_grad_sample_mode

STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"  # the app's, in a checkout and in a FAB


@dataclass(frozen=True)
class Setting:
    """One key: its kind (bool, int, float, str) and, for numbers, bounds (open or closed); for
    strings, the allowed choices. `low`/`high` None = unbounded."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    nonempty: bool = False
    default: Any = None  # node_config only: the value of a key the site leaves out (None: none)
    also: tuple[str, ...] = ()  # numbers only: strings accepted as well (e.g. "auto")
    simulation_only: bool = False  # run config only: meaningless to a deployed site

    def describe(self) -> str:
        if self.kind is bool:
            return "a boolean (true or false)"
        if self.kind is str:
            if self.choices:
                return f"one of {', '.join(repr(c) for c in self.choices)}"
            return "a non-empty string" if self.nonempty else "a string"
        noun = "an integer" if self.kind is int else "a number"
        if self.also:
            return f"{Setting(self.kind, self.low, self.high, self.low_open, self.high_open).describe()} or " + \
                ", ".join(repr(a) for a in self.also)
        if self.low is not None and self.high is not None:
            return (f"{noun} in {'(' if self.low_open else '['}{self.low:g}, "
                    f"{self.high:g}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{noun} {'<' if self.high_open else '<='} {self.high:g}"
        return noun

    def check(self, key: str, value: Any) -> Any:
        """`value` normalised, or TypeError/ValueError naming `key` and `value`."""
        wrong = f"{key} must be {self.describe()}, got {value!r}"
        if self.kind is bool:
            if not isinstance(value, bool):
                raise TypeError(wrong)
            return value
        if self.kind is str:
            if not isinstance(value, str):
                raise TypeError(wrong)
            if (self.choices and value not in self.choices) or (self.nonempty and not value.strip()):
                raise ValueError(wrong)
            return value
        if isinstance(value, str) and value in self.also:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(wrong)
        if self.kind is int:
            if isinstance(value, float):
                if not value.is_integer():
                    raise TypeError(wrong)
                value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(wrong)
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise ValueError(wrong)
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise ValueError(wrong)
        return value


def _int(low: int | None = None, high: int | None = None, **kw: Any) -> Setting:
    return Setting(int, low=low, high=high, **kw)


def _float(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> Setting:
    return Setting(float, low=low, high=high, low_open=low_open, high_open=high_open)


POSITIVE = _float(0.0, low_open=True)
NON_NEGATIVE = _float(0.0)
PROBABILITY_OPEN = _float(0.0, 1.0, low_open=True, high_open=True)
FRACTION = _float(0.0, 1.0)
BOOL, STR = Setting(bool), Setting(str)


def _choice(*choices: str, **kw: Any) -> Setting:
    return Setting(str, choices=tuple(choices), **kw)


SIM_BOOL, SIM_STR = Setting(bool, simulation_only=True), Setting(str, simulation_only=True)


RUN_CONFIG: dict[str, Setting] = {
    # federation
    "num-server-rounds": _int(1),
    "fraction-train": FRACTION,
    "fraction-evaluate": FRACTION,
    "min-train-nodes": _int(1),
    "min-evaluate-nodes": _int(0),
    "min-available-nodes": _int(1),
    "strategy": _choice(*STRATEGIES),
    "proximal-mu": NON_NEGATIVE,
    "server-lr": POSITIVE,
    "server-momentum": _float(0.0, 1.0, high_open=True),
    "trimmed-beta": _float(0.0, 0.5, high_open=True),
    "num-malicious-nodes": _int(0),
    "multikrum-select": _int(1),
    # update validation (server/update_checks.py)
    "max-update-norm": NON_NEGATIVE,
    "max-update-norm-ratio": NON_NEGATIVE,
    "max-num-examples": _int(1),
    "examples-cap-ratio": _float(1.0),
    # local training
    "local-epochs": _int(1),
    "batch-size": _int(1),
    "max-physical-batch-size": _int(1, also=("auto",)),  # "auto": chosen by memory (model/physical_batch.py)
    "physical-batch-shape": _choice("auto", "fixed", "variable"),
    "grad-sample-mode": _choice(*GRAD_SAMPLE_CHOICES),
    "precision": _choice(*PRECISIONS),
    "gallery-size": _int(0),
    "lr": POSITIVE,
    "optimizer": _choice(*OPTIMIZERS),
    "seed": _int(0, simulation_only=True),
    "init-from": STR,
    "trainable": _choice(*TRAINABLE),
    "encoder-feature-cache": BOOL,
    # differential privacy
    "dp": BOOL,
    "noise-multiplier": NON_NEGATIVE,
    "max-grad-norm": POSITIVE,
    "target-epsilon": Setting(float, low=0.0, low_open=True, simulation_only=True),
    "target-delta": Setting(float, low=0.0, high=1.0, low_open=True, high_open=True, simulation_only=True),
    "accountant": _choice(*OPACUS_ACCOUNTANTS, simulation_only=True),
    "run-epsilon": POSITIVE,
    "count-noise-multiplier": _float(1.0),
    "federation-state": STR,
    # data
    "partitioner": _choice(*PARTITIONERS, simulation_only=True),
    "dirichlet-alpha": Setting(float, low=0.0, low_open=True, simulation_only=True),
    "feature-skew": SIM_BOOL,
    "train-size": _int(1, simulation_only=True),
    "data-scenario": _choice(*SCENARIOS, simulation_only=True),
    "server-eval-size": _int(1),
    "server-eval-data": STR,
    "server-eval-format": _choice(*DATASET_FORMATS),
    "vocab-file": STR,
    "vocab-source": _choice("server", "private"),
    "vocab-noise-multiplier": POSITIVE,
    "vocab-max-words-per-record": _int(1),
    "vocab-delta": PROBABILITY_OPEN,
    "eval-beam-size": _int(1),
    # model
    "image-size": _int(16),
    "model-encoder": _choice(*ENCODERS),
    "model-encoder-weights": STR,
    "model-freeze-encoder": BOOL,
    "model-fusion": _choice(*FUSIONS),
    "model-decoder": _choice(*DECODERS),
    "model-d-model": _int(1),
    "model-num-layers": _int(1),
    "model-num-heads": _int(1),
    "model-ffn-dim": _int(1),
    "model-dropout": _float(0.0, 1.0, high_open=True),
    "model-max-len": _int(3),
    # outputs, state, time limits
    "output-dir": Setting(str, nonempty=True),
    "site-state-dir": SIM_STR,
    "resume-from": STR,
    "evaluate-in-train": BOOL,
    "round-timeout": POSITIVE,
    "node-wait-timeout": POSITIVE,
    # empirical privacy audit
    "canary-count": _int(0, simulation_only=True),
    "canary-seed": _int(0, simulation_only=True),
    "canary-site": _int(0, simulation_only=True),
}

NODE_CONFIG: dict[str, Setting] = {
    # identity
    "site-name": Setting(str, nonempty=True),
    "partition-id": _int(0),       # simulation (set by Flower)
    "num-partitions": _int(1),     # simulation (set by Flower)
    # data and state (deployment)
    "data-dir": Setting(str, nonempty=True),
    "dataset-format": _choice(*DATASET_FORMATS, default="coco"),
    "skip-bad-records": Setting(bool, default=False),
    "state-dir": Setting(str, nonempty=True),
    "non-private": Setting(bool, default=False),  # deployment: the site trains without DP (dp = false runs only)
    "ledger-mirror-dir": Setting(str, default=""),
    "cache-dir": Setting(str, nonempty=True),  # decoded records (private images), never sent
    "decode-workers": _int(1),  # processes for the first decode of data-dir into the store (default: all cores)
    # a deployed DP site sends its held-out caption metrics (no epsilon covers them) only when true
    "share-held-out-metrics": Setting(bool, default=False),
    "min-records": _int(1, default=1),
    "num-threads": _int(1),
    "device": Setting(str, default="auto"),  # auto | cpu | cuda | cuda:N (model/devices.py)
    "memory-limit": _float(0.0, low_open=True),  # GiB a training step may take (max-physical-batch-size "auto")
    # the site's own privacy budget (only the site sets it)
    "target-epsilon": POSITIVE,
    "target-delta": PROBABILITY_OPEN,
    "max-run-epsilon": POSITIVE,
    "accountant": _choice(*OPACUS_ACCOUNTANTS, default=DEFAULT_ACCOUNTANT),
}


def _validate(settings: Mapping[str, Any], schema: Mapping[str, Setting], what: str) -> dict[str, Any]:
    if not isinstance(settings, Mapping):
        raise TypeError(f"{what} must be a mapping of settings, got {type(settings).__name__}")
    unknown = sorted(set(settings) - set(schema))
    if unknown:
        raise ValueError(f"unknown {what} key {unknown[0]!r} (value {settings[unknown[0]]!r}); "
                         f"{'all unknown: ' + str(unknown) + '; ' if len(unknown) > 1 else ''}"
                         f"known keys are listed in shared_model/run_settings.py")
    return {key: schema[key].check(key, value) for key, value in settings.items()}


SIMULATION_ONLY = tuple(k for k, setting in RUN_CONFIG.items() if setting.simulation_only)
NODE_DEFAULTS = {k: setting.default for k, setting in NODE_CONFIG.items() if setting.default is not None}


def default_run_config(path: str | Path = PYPROJECT) -> dict[str, Any]:
    """[tool.flwr.app.config] of the app's pyproject.toml, validated: every run-config default."""
    with open(path, "rb") as f:
        return validate_run_config(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def simulation_only_overrides(run_config: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
                              ) -> dict[str, Any]:
    """The simulation-only keys `run_config` sets away from their defaults (key: value)."""
    defaults = default_run_config() if defaults is None else defaults
    return {k: run_config[k] for k in SIMULATION_ONLY if k in run_config and run_config[k] != defaults[k]}


def validate_run_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The complete run config, checked key by key and across keys; a normalised copy. A missing
    key is an error: start from `default_run_config()` and override."""
    rc = _validate(run_config, RUN_CONFIG, "run-config")
    missing = sorted(set(RUN_CONFIG) - set(rc))
    if missing:
        raise ValueError(f"run-config lacks {missing}: pyproject.toml [tool.flwr.app.config] holds every key's "
                         f"default (start from shared_model.run_settings.default_run_config())")
    if rc["model-d-model"] % rc["model-num-heads"]:
        raise ValueError(f"model-d-model must be divisible by model-num-heads ({rc['model-num-heads']}), "
                         f"got {rc['model-d-model']}")
    if rc["model-encoder-weights"] and rc["model-encoder"] == "cnn":
        raise ValueError(f"model-encoder-weights is for a torchvision model-encoder ({', '.join(ENCODERS[1:])}), got "
                         f"model-encoder 'cnn' with weights {rc['model-encoder-weights']!r}")
    if rc["grad-sample-mode"] != "auto":  # ghost clipping refuses the LSTM decoder
        check_grad_sample_mode(rc["grad-sample-mode"], decoder=rc["model-decoder"])
    # bf16 autocast refuses ghost clipping's bfloat16 norms
    check_precision(rc["precision"], grad_sample_mode=rc["grad-sample-mode"])
    if rc["init-from"] and rc["resume-from"]:
        raise ValueError(f"init-from and resume-from exclude each other, got init-from {rc['init-from']!r} and "
                         f"resume-from {rc['resume-from']!r}")
    if rc["vocab-source"] == "private":
        clash = [f"{k} {rc[k]!r}" for k in ("vocab-file", "init-from", "resume-from") if rc[k]]
        if clash:
            raise ValueError(f"vocab-source 'private' builds the vocabulary from the sites' released counts and a "
                             f"fresh model; it excludes {', '.join(clash)}")
        if rc["dp"] is False:
            raise ValueError("vocab-source 'private' spends the sites' privacy budgets and needs dp = true, got "
                             "dp = false")
    return rc


def validate_node_config(node_config: Mapping[str, Any]) -> dict[str, Any]:
    """A site's node_config, checked key by key, with the defaults of the keys it leaves out
    (`NODE_DEFAULTS`); it must name the site (site-name or partition-id) and its data (data-dir, or
    partition-id with num-partitions in simulation)."""
    nc = {**NODE_DEFAULTS, **_validate(node_config, NODE_CONFIG, "node_config")}
    if "site-name" not in nc and "partition-id" not in nc:
        raise ValueError(f"node_config must hold 'site-name' (deployment) or 'partition-id' (simulation), "
                         f"got keys {sorted(nc)}")
    if "data-dir" not in nc and not {"partition-id", "num-partitions"} <= set(nc):
        raise ValueError(f"node_config must hold 'data-dir' (deployment) or 'partition-id' and 'num-partitions' "
                         f"(simulation), got keys {sorted(nc)}")
    if "data-dir" in nc and "state-dir" not in nc and not nc["non-private"]:
        raise ValueError(f"node_config has data-dir {nc['data-dir']!r} but no 'state-dir': a deployed site keeps its "
                         f"privacy ledger in a folder of its own, which no run-config value can replace")
    if not DEVICE_PATTERN.fullmatch(nc["device"]):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {nc['device']!r}")
    if "partition-id" in nc and "num-partitions" in nc and nc["partition-id"] >= nc["num-partitions"]:
        raise ValueError(f"partition-id must be < num-partitions ({nc['num-partitions']}), got {nc['partition-id']}")
    return nc
