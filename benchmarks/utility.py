"""The utility table: caption quality of centralized and federated training, private or not, from
scratch and from public pretraining, IID and Dirichlet non-IID; writes its block of docs/results.md
and docs/results-utility.json.

    python benchmarks/utility.py                 # the full table, sized for <= 1 hour on 2 CPU cores
    python benchmarks/utility.py --quick         # a reduced subset (smaller sizes, fewer rows)
    python benchmarks/utility.py --device cuda   # the same table on a GPU
    python benchmarks/utility.py --scenario shifted --sites 3 --sizes '{"train_size": 1200}'  # the content shift

Rows: centralized non-private and DP; federated (4 sites) non-private and DP at epsilon 1, 2, 4, 8;
each from scratch and from the public checkpoint (pretrained once per seed on the embedded
generator's public variant, shared by every row of that seed, so rows compare against the same
public initialisation); federated rows with IID and Dirichlet (alpha 1) partitions plus the sites'
feature skew (the epsilon sweep on the Dirichlet split, the product's case; IID at the largest
epsilon and non-private); each over `--seeds` seeds, reported as mean and spread (min-max). The constant-caption
baseline and the public-only model are rows too. Scores: the scenario's test split, greedy decoding.
`--scenario shifted` runs every row on the content-shift scenario (simulations/scenarios/shifted.toml's
data: the sites' content the public set rarely or never shows; its public variant and vocabulary);
benchmarks/scenarios.py runs both scenarios through Flower with every round's score (BEST and last).

Federated rows run in one process: each site's `client.trainer.train_round` (the code the
ClientApp calls: Poisson sampling, clipping, noise, the site ledger and its budget check) and
FedAvg weighted by record counts, without Flower's engine (which the main job, `make run`, uses;
its figures are reported beside this table). Epsilon is per site over the whole run (delta 1e-5).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL = dict(train_size=2000, test_size=300, public_size=10_000, public_epochs=4, central_epochs=10,
            rounds=4, local_epochs=2, eps=(1.0, 2.0, 4.0, 8.0), partitions=("iid", "dirichlet"), seeds=2)
QUICK = dict(train_size=1000, test_size=200, public_size=4000, public_epochs=3, central_epochs=6,
             rounds=3, local_epochs=2, eps=(8.0,), partitions=("dirichlet",), seeds=2)
# Learning rates as the product sets them: 3e-3 (the run-config default) from scratch and for DP
# fine-tuning; 1e-3 for non-private fine-tuning (the no-dp scenario), where 3e-3 overshoots.
SCRATCH_LR, FINETUNE_LR, BATCH = 3e-3, 1e-3, 128
METRICS = ("CIDEr-D", "BLEU-4", "ROUGE-L", "METEOR")


def score(model, test, vocab, device, meteor):
    from shared_model.evaluation.evaluator import evaluate

    metrics, _ = evaluate(model.to(device), test, vocab, device=device, meteor=meteor)
    return {k: metrics[k] for k in METRICS if k in metrics}


def centralized(init, data, test, vocab, *, epochs, lr, eps, device, seed, meteor):
    """Centralized training through run_centralized's pieces (same loop, same DP front door)."""
    from torch.utils.data import DataLoader

    from shared_model.data.datasets import CaptionDataset
    from shared_model.model.training import train_epoch
    from shared_model.model.captioner import unwrap
    from shared_model.privacy.dp import plan_dp_sgd, private_training

    torch.manual_seed(seed)
    model = init().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    loader = DataLoader(CaptionDataset(data, vocab, max_len=model.config.max_len), batch_size=BATCH, shuffle=True)
    if eps:
        event = plan_dp_sgd(num_records=len(data), batch_size=BATCH, epochs=epochs, target_epsilon=eps,
                            target_delta=1e-5, accountant="prv")
        _, model, optimizer, loader = private_training(module=model, optimizer=optimizer, dataset=loader.dataset,
                                                       event=event, epochs=epochs, max_grad_norm=1.0,
                                                       expected_batch_size=len(data) * event.sample_rate, accountant="prv")
    for _ in range(epochs):
        train_epoch(model, optimizer, loader, device=device, max_physical_batch_size=256 if eps else None)
    return score(unwrap(model), test, vocab, device, meteor)


def federated(init, sites, test, vocab, *, rounds, local_epochs, lr, eps, device, seed, meteor, state):
    from client.settings import local_training
    from client.trainer import train_round
    from shared_model.run_settings import default_run_config
    from shared_model.model.captioner import Captioner
    from shared_model.model.checkpoint import model_state
    from shared_model.privacy.ledger import PrivacyLedger
    from shared_model.privacy.site_budget import RunRequest, SiteBudget

    model = init().to(device)
    training = local_training({**default_run_config(), "local-epochs": local_epochs, "batch-size": BATCH, "lr": lr,
                               "max-physical-batch-size": 256}, {})
    budget = SiteBudget(target_epsilon=eps, target_delta=1e-5, accountant="rdp") if eps else None
    run = f"bench-{time.time_ns()}"
    request = RunRequest(run_id=run, run_epsilon=eps, num_rounds=rounds, local_epochs=local_epochs,
                         batch_size=BATCH, count_noise_multiplier=20.0) if eps else None
    for r in range(1, rounds + 1):
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        total, summed = 0, None
        for k, site in enumerate(sites):
            local = Captioner(model.config)  # a fresh module per site and round, as a ClientApp builds
            local.load_state_dict(start)
            ledger = PrivacyLedger(Path(state) / run / f"site-{k}" / "ledger.jsonl") if eps else None
            train_round(model=local, data=site, vocab=vocab, training=training, budget=budget, ledger=ledger,
                        request=request, server_round=r, device=device, seed=seed * 10 + k)
            w = {key: v.detach().float() * len(site) for key, v in model_state(local).items()}
            summed = w if summed is None else {key: summed[key] + w[key] for key in w}
            total += len(site)
        model.load_state_dict({key: (v / total).to(device) for key, v in summed.items()})
    return score(model, test, vocab, device, meteor)


def site_splits(train, *, partitioner, seed, num_sites):
    from shared_model.data.partition import partition_caption_set
    from shared_model.data.skew import apply_feature_skew, site_feature_skews

    sites = partition_caption_set(train, num_sites, method=partitioner, alpha=1.0, seed=seed)
    for k, (site, profile) in enumerate(zip(sites, site_feature_skews(num_sites, seed=seed))):
        site.images = apply_feature_skew(site.images, kind=profile["kind"], strength=profile["strength"],
                                         seed=seed + k)
    return sites


def main(argv=None) -> int:
    from shared_model.data.synthetic import SCENARIOS, load_embedded, synthetic_vocabulary
    from shared_model.evaluation.metrics import caption_metrics, trivial_baseline_predictions
    from shared_model.model.captioner import Captioner
    from shared_model.model.checkpoint import load_checkpoint
    from shared_model.model.config import CaptionerConfig
    from runners.centralized import resolve_device
    from runners.pretrain import pretrain_config, run_pretrain
    from runners.sources import public_source

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the reduced subset (QUICK sizes)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seeds", type=int)
    p.add_argument("--sizes", type=json.loads, default={}, help='JSON overrides of the sizes, e.g. \'{"rounds": 2}\'')
    p.add_argument("--meteor", action="store_true", help="also METEOR (Java; slower)")
    p.add_argument("--scenario", default="embedded", choices=SCENARIOS,
                   help="the data scenario (run-config data-scenario): its private splits, public variant, vocabulary")
    p.add_argument("--sites", type=int, default=4, help="federated sites")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md")
    args = p.parse_args(argv)
    size = dict(QUICK if args.quick else FULL)
    size.update(args.sizes)
    if args.seeds:
        size["seeds"] = args.seeds
    device = resolve_device(args.device)
    vocab = synthetic_vocabulary(args.scenario)
    cfg = CaptionerConfig(vocab_size=len(vocab), dropout=0.0)
    rows: dict[str, list[dict]] = {}
    t0 = time.perf_counter()

    def add(name, metrics, seconds):
        rows.setdefault(name, []).append({**metrics, "seconds": seconds})
        print(f"{name:55} {metrics.get('CIDEr-D', 0):.3f} CIDEr-D  {seconds:.0f} s", flush=True)

    with tempfile.TemporaryDirectory() as state:
        for seed in range(size["seeds"]):
            train = load_embedded("train", size["train_size"], seed=seed, scenario=args.scenario)
            test = load_embedded("test", size["test_size"], seed=seed, scenario=args.scenario)
            base = trivial_baseline_predictions((c for caps in train.captions for c in caps), test.image_ids)
            add("constant caption (most frequent training caption)",
                {k: v for k, v in caption_metrics(base, test.references(), meteor=args.meteor).items()
                 if k in METRICS}, 0.0)
            t = time.perf_counter()
            run_pretrain(pretrain_config(train_size=size["public_size"], epochs=size["public_epochs"],
                                               test_size=size["test_size"], seed=seed, device=str(device),
                                               source=public_source(args.scenario),
                                               model={"dropout": 0.0}), Path(state) / f"public-{seed}",
                               log=lambda s: None)
            public_model, _, _ = load_checkpoint(Path(state) / f"public-{seed}" / "checkpoint")
            add("public only (pretrained, non-private)", score(public_model, test, vocab, device, args.meteor),
                time.perf_counter() - t)
            public_weights = public_model.state_dict()

            def fresh():
                torch.manual_seed(seed)
                return Captioner(cfg)

            def public():
                m = Captioner(cfg)
                m.load_state_dict(public_weights)
                return m

            for start, init in (("scratch", fresh), ("public", public)):
                def lr(eps):
                    return FINETUNE_LR if start == "public" and not eps else SCRATCH_LR

                for eps in (None, *size["eps"][-1:]):
                    t = time.perf_counter()
                    add(f"centralized, {'DP eps %g' % eps if eps else 'non-private'}, from {start}",
                        centralized(init, train, test, vocab, epochs=size["central_epochs"], lr=lr(eps), eps=eps,
                                    device=device, seed=seed, meteor=args.meteor), time.perf_counter() - t)
                for partitioner in size["partitions"]:
                    sites = site_splits(train, partitioner=partitioner, seed=seed, num_sites=args.sites)
                    for eps in (None, *(size["eps"] if partitioner == "dirichlet" else size["eps"][-1:])):
                        t = time.perf_counter()
                        add(f"federated {args.sites} sites {partitioner}, {'DP eps %g' % eps if eps else 'non-private'}, "
                            f"from {start}",
                            federated(init, sites, test, vocab, rounds=size["rounds"],
                                      local_epochs=size["local_epochs"], lr=lr(eps), eps=eps, device=device, seed=seed,
                                      meteor=args.meteor, state=state), time.perf_counter() - t)
    write(args, size, device, rows, time.perf_counter() - t0)
    return 0


def write(args, size, device, rows, seconds) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
           "device": str(device), "cpu_threads": torch.get_num_threads(), "sizes": size, "seconds": seconds,
           "command": "python benchmarks/utility.py " + " ".join(sys.argv[1:]), "rows": rows}
    suffix = "" if args.scenario == "embedded" else f"-{args.scenario}"  # one block and one file per scenario
    args.out.with_name(args.out.stem + f"-utility{suffix}.json").write_text(json.dumps(doc, indent=2, default=list) + "\n")
    lines = [f"| {name} | " + " | ".join(_cell([r.get(k) for r in runs]) for k in METRICS) + f" | {len(runs)} |"
             for name, runs in rows.items()]
    table = "\n".join(["| training | " + " | ".join(METRICS) + " | seeds |", "|---" * (len(METRICS) + 2) + "|",
                       *lines])
    print(table)
    doc_path = args.out
    marker = f"<!-- utility table{suffix.replace('-', ' ')} -->"
    text = doc_path.read_text() if doc_path.exists() else ""
    block = (f"{marker}\n{doc['command']} ({doc['date']}, {device}, {doc['machine']}, {seconds:.0f} s; sizes "
             f"{json.dumps(size, default=list)}; scenario {args.scenario}; records per site: train-size / {args.sites} on average)\n\n{table}\n{marker}")
    if marker in text:
        head, _, rest = text.partition(marker)
        text = head + block + rest.partition(marker)[2]
    else:
        text = (text.rstrip() + "\n\n" if text else "# Results\n\n") + block + "\n"
    doc_path.write_text(text)


def _cell(values) -> str:
    values = [v for v in values if isinstance(v, (int, float))]
    if not values:
        return ""
    return f"{mean(values):.3f}" + (f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else "")


if __name__ == "__main__":
    sys.exit(main())
