"""A site's records: its train split (the DP-protected dataset) and a held-out split for evaluation.

Simulation: partition `partition-id` of the embedded synthetic train split (of the run's
`data-scenario`), cut by the configured partitioner, with the site's feature skew (for a privacy
audit, `canary-count` > 0 appends canary records to one site's train split:
docs/empirical-audit.md). Deployment: the site's own files
(`data-dir`, `dataset-format` from node_config). Either way the held-out split is chosen
deterministically, so the train split, and hence the records its ledger names, is the same in every round,
run and restart.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from shared_model.data.records import CaptionSet


def _split_held_out(data: CaptionSet) -> tuple[CaptionSet, CaptionSet]:
    from shared_model.data.partition import hash_split

    return hash_split(data, what="site")


@lru_cache(maxsize=1)
def _embedded_train(size: int, seed: int, image_size: int, scenario: str) -> CaptionSet:
    """The generated training split, kept in the process between messages: a simulation actor
    serves many sites of one run, and each cut its partition from a fresh copy (what that cost:
    docs/results.md, "Scale: 16 and 64 simulated sites"). Deterministic in its arguments; never
    modified (the partitions are copies)."""
    from shared_model.data.synthetic import load_embedded

    return load_embedded("train", size, seed=seed, image_size=image_size, scenario=scenario)


def simulated_site_data(run_config: Mapping[str, Any], *, partition_id: int, num_partitions: int
                        ) -> tuple[CaptionSet, CaptionSet]:
    from shared_model.data.partition import partition_caption_set
    from shared_model.data.skew import apply_feature_skew, site_feature_skews

    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id must be in [0, {num_partitions}), got {partition_id}")
    seed = int(run_config["seed"])
    full = _embedded_train(int(run_config["train-size"]), seed, int(run_config["image-size"]),
                           str(run_config["data-scenario"]))
    site = partition_caption_set(full, num_partitions, method=str(run_config["partitioner"]),
                                 alpha=float(run_config["dirichlet-alpha"]), seed=seed)[partition_id]
    if run_config["feature-skew"]:
        profile = site_feature_skews(num_partitions, seed=seed)[partition_id]
        site.images = apply_feature_skew(site.images, kind=profile["kind"], strength=profile["strength"],
                                         seed=seed + partition_id)
    train, held_out = _split_held_out(site)
    return _with_canaries(train, run_config, partition_id=partition_id, num_partitions=num_partitions), held_out


def _with_canaries(train: CaptionSet, run_config: Mapping[str, Any], *, partition_id: int, num_partitions: int
                   ) -> CaptionSet:
    """Privacy audit (docs/empirical-audit.md): with `canary-count` > 0, the site `canary-site`
    appends to its TRAIN split the canaries whose fair coin (from `canary-seed`) says "in". The
    held-out split and the server's evaluation set never hold canaries."""
    count = int(run_config["canary-count"])
    if count == 0:
        return train
    if count < 0:
        raise ValueError(f"canary-count must be >= 0, got {count}")
    canary_site = int(run_config["canary-site"])
    if not 0 <= canary_site < num_partitions:
        raise ValueError(f"canary-site must be in [0, {num_partitions}), got {canary_site}")
    if partition_id != canary_site:
        return train
    from shared_model.evaluation.canaries import append_records, included_canaries

    canaries = included_canaries(count, seed=int(run_config["canary-seed"]), image_size=train.images.shape[1])
    return append_records(train, canaries)


def deployed_site_data(node_config: Mapping[str, Any], *, image_size: int,
                       cache_dir: Path | None = None) -> tuple[CaptionSet, CaptionSet]:
    """`data-dir` holds the site's files; `dataset-format` is coco (captions.json + images/),
    karpathy (dataset.json + images/), csv (captions.csv) or jsonl (captions.jsonl). With
    `cache_dir` the records live in a data store there (data_cache.py, shared_model/data/store.py):
    decoded once by `decode-workers` processes (default: every core), then read from disk row by
    row, so memory does not grow with the number of records. Without it, decoded into memory."""
    from shared_model.data.loaders import load_dataset_folder

    if "data-dir" not in node_config:
        raise ValueError("node_config has no 'data-dir' (start the SuperNode with --node-config \"data-dir=...\")")
    from .settings import node_setting

    fmt, root = str(node_setting(node_config, "dataset-format")), Path(str(node_config["data-dir"]))
    skip_bad = bool(node_setting(node_config, "skip-bad-records"))
    if cache_dir is None or not root.is_dir():
        return _split_held_out(load_dataset_folder(fmt, root, image_size=image_size, skip_bad=skip_bad))
    from shared_model.data.loaders import parse_dataset_folder
    from shared_model.data.store import STORE_FORMAT, build_store

    from .data_cache import cached_store, folder_key

    workers = node_config.get("decode-workers")

    def build(stem: Path) -> CaptionSet:
        return build_store(parse_dataset_folder(fmt, root), stem, image_size=image_size, skip_bad=skip_bad,
                           workers=None if workers is None else int(workers), report=_report)

    key = folder_key(root, format=fmt, image_size=image_size, skip_bad=skip_bad, store=STORE_FORMAT)
    data, _ = cached_store(cache_dir, key, build)
    return _split_held_out(data)


def _report(line: str) -> None:  # the first decode's progress, on the SuperNode's terminal
    print(line, file=sys.stderr, flush=True)
