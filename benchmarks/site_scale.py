"""A site with real photographs at real scale (issue 22): load time, memory and the cost of a round.

    python benchmarks/site_scale.py [--records 2000 8000 20000] [--image-size 224]
                                    [--round-records 256] [--rounds-at 2000] [--device cpu] [--out DIR]

For each N it writes N photograph-like JPEGs (320x240: smooth colour fields, shapes, sensor noise;
about 20 KB each) with captions into a COCO folder, then measures, each in a process of its own so
that the peak resident memory (ru_maxrss) is that step's alone:
  - cold load: the site's first decode of the folder into its data store (client/site_data.py with a
    cache folder, every core), and warm load (the store opened again);
  - for N in --rounds-at: a site's round on --round-records of those records, read from the store, for
    (a) the default CNN, (b) ResNet-18 trainable, (c) ResNet-50 frozen with its features computed once
    (client/feature_cache.py; the one-off computation timed apart), (d) the same without the cache,
    each non-private and DP (epsilon 8, delta 1e-5, one local epoch, batch 64);
  - for every N up to --whole-up-to: the peak memory of a DP round (one epoch) of (a) sampling from
    the whole store, which must not grow with N.
Random encoder weights (nothing is downloaded); utility is not measured here. Prints one JSON line
per measurement and a markdown table; docs/results.md holds the figures with the machine and date.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROUNDS = {  # name: (encoder, freeze_encoder, trainable, encoder-feature-cache)
    "cnn": ("cnn", False, "all", False),
    "resnet18-trainable": ("resnet18", False, "all", False),
    "resnet50-frozen-cached": ("resnet50", True, "fusion+decoder", True),
    "resnet50-frozen": ("resnet50", True, "fusion+decoder", False),
}


def write_folder(folder: Path, n: int, seed: int = 0) -> None:
    """N photograph-like 320x240 JPEGs and a COCO captions.json (skipped when already there)."""
    import numpy as np
    from PIL import Image, ImageDraw

    if (folder / "captions.json").exists():
        return
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = ["red", "green", "blue", "yellow", "white", "black"]
    images, annotations = [], []
    for i in range(n):
        low = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)  # a smooth field, like light on a scene
        img = Image.fromarray(low).resize((320, 240), Image.BICUBIC)
        draw = ImageDraw.Draw(img)
        k = int(rng.integers(len(colours)))
        x, y, r = int(rng.integers(40, 280)), int(rng.integers(40, 200)), int(rng.integers(15, 60))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        pixels = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, size=(240, 320, 3)).astype(np.int16)
        name = f"{i:06d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / "images" / name, quality=85)
        images.append({"id": i, "file_name": name})
        annotations += [{"id": 2 * i, "image_id": i, "caption": f"a {colours[k]} circle in a photograph"},
                        {"id": 2 * i + 1, "image_id": i, "caption": f"a photo with one {colours[k]} circle"}]
    (folder / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(task: dict) -> dict:
    """One measurement, in this process."""
    import torch

    from client.site_data import deployed_site_data

    torch.set_num_threads(os.cpu_count() or 1)
    node = {"data-dir": task["folder"], "dataset-format": "coco"}
    t = time.perf_counter()
    train, _ = deployed_site_data(node, image_size=task["image_size"], cache_dir=Path(task["cache"]))
    load = time.perf_counter() - t
    if task["kind"] == "load":
        return {"load_s": load, "records": len(train) + len(_), "peak_mib": peak_mib()}

    from client.feature_cache import site_features
    from client.settings import local_training
    from client.trainer import train_round
    from shared_model.data.vocab import Vocabulary
    from shared_model.model.captioner import Captioner
    from shared_model.model.config import CaptionerConfig
    from shared_model.privacy.ledger import PrivacyLedger
    from shared_model.privacy.site_budget import RunRequest, SiteBudget
    from shared_model.run_settings import default_run_config

    encoder, frozen, trainable, cache = ROUNDS[task["round"]]
    data = train if task["whole"] else train.subset(range(min(task["round_records"], len(train))))
    vocab = Vocabulary.build([c for caps in data.captions for c in caps], min_count=1)
    torch.manual_seed(0)
    model = Captioner(CaptionerConfig(vocab_size=len(vocab), image_size=task["image_size"], encoder=encoder,
                                      freeze_encoder=frozen))
    device = torch.device(task["device"])
    features_s = None
    if cache:  # the one-off cost, apart from the round's
        t = time.perf_counter()
        site_features(model, data, cache_dir=Path(task["cache"]), device=device)
        features_s = time.perf_counter() - t
    training = local_training({**default_run_config(), "local-epochs": 1, "batch-size": 64, "trainable": trainable,
                               "encoder-feature-cache": cache, "max-physical-batch-size": 64}, {})
    dp = task["dp"]
    ledger = PrivacyLedger(Path(tempfile.mkdtemp()) / "ledger.jsonl") if dp else None
    budget = SiteBudget(target_epsilon=8.0, target_delta=1e-5, accountant="rdp") if dp else None
    request = RunRequest(run_id="scale", run_epsilon=8.0, num_rounds=1, local_epochs=1, batch_size=64,
                         count_noise_multiplier=20.0) if dp else None
    t = time.perf_counter()
    train_round(model=model, data=data, vocab=vocab, training=training, budget=budget, ledger=ledger,
                request=request, server_round=1, device=device, seed=0, feature_cache_dir=Path(task["cache"]))
    round_s = time.perf_counter() - t
    return {"round_s": round_s, "ms_per_record": round_s / len(data) * 1e3, "records": len(data),
            "features_s": features_s, "peak_mib": peak_mib(), "grad_sample_mode": training.grad_sample_mode}


def run_child(task: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(task)], capture_output=True, text=True,
                         cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"{task}: {out.stderr[-2000:]}")
    result = {**task, **json.loads(out.stdout.strip().splitlines()[-1])}
    print(json.dumps(result), flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, nargs="+", default=[2000, 8000, 20000])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--round-records", type=int, default=256)
    p.add_argument("--rounds-at", type=int, nargs="*", default=[2000])
    p.add_argument("--whole-up-to", type=int, default=20000, help="largest N for the whole-store DP round")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "fedcap-site-scale")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    rows = []
    for n in args.records:
        folder, cache = args.out / f"coco-{n}", args.out / f"cache-{n}-{args.image_size}"
        t = time.perf_counter()
        write_folder(folder, n)
        print(f"# {n} JPEGs in {folder} ({time.perf_counter() - t:.0f} s)", flush=True)
        base = {"folder": str(folder), "cache": str(cache), "image_size": args.image_size, "device": args.device,
                "records_in_folder": n, "round_records": args.round_records, "whole": False}
        if cache.exists():
            import shutil

            shutil.rmtree(cache)
        rows.append(run_child({**base, "kind": "load", "state": "cold"}))
        rows.append(run_child({**base, "kind": "load", "state": "warm"}))
        if n <= args.whole_up_to:  # a DP epoch over the whole store (long: about n x 0.14 s on 2 cores)
            rows.append(run_child({**base, "kind": "round", "round": "cnn", "dp": True, "whole": True,
                                   "round_records": n}))
        if n in args.rounds_at:
            for name in ROUNDS:
                for dp in (False, True):
                    rows.append(run_child({**base, "kind": "round", "round": name, "dp": dp}))
    print("\n| N | step | dp | records | seconds | ms / record | one-off features s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        step = f"load ({r['state']})" if r["kind"] == "load" else r["round"] + (" (whole store)" if r["whole"] else "")
        secs = r.get("load_s", r.get("round_s"))
        per = f"{r['ms_per_record']:.1f}" if "ms_per_record" in r else f"{secs / r['records'] * 1e3:.2f}"
        feats = "" if r.get("features_s") is None else f"{r['features_s']:.1f}"
        print(f"| {r['records_in_folder']} | {step} | {r.get('dp', '')} | {r['records']} | {secs:.1f} | {per} | "
              f"{feats} | {r['peak_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
