"""Cost of a DP-SGD step against a plain step, per decoder and per batch-shape mode, with memory.

    python benchmarks/dp_step.py [--batch-size 64] [--steps 10] [--device cpu|cuda] [--json FILE]

For each decoder (transformer, lstm) it times the median step (after warm-up) of
  plain    non-private AdamW on fixed batches;
  poisson  DP-SGD as the site trainer runs it: Opacus hooks mode, Poisson-sampled batches (a new
           shape every step);
  fixed    the same Poisson sampling, every physical batch padded to one shape (masked rows,
           `shared_model.model.pad_batch`; max physical batch = 1.25 x the expected batch);
and prints time and memory ratios against plain. Memory: torch's peak allocation on a GPU; on the
CPU, the peak resident memory a fresh subprocess gains during its steps. Goals (issue 11): time
ratio <= 1.6x on this CPU and <= 2x on a GPU; memory ratio <= 2x.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

MODES = ("plain", "poisson", "fixed")


def run_mode(mode: str, decoder: str, *, batch_size: int, steps: int, device_name: str) -> dict:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from shared_model.model import Captioner, CaptionerConfig, pad_batch
    from shared_model.privacy import make_private

    device = torch.device(device_name)
    n = batch_size * (steps + 3)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 64, 64, generator=g)
    captions = torch.randint(4, 48, (n, 20), generator=g)
    captions[:, 0], captions[:, -1] = 1, 2
    torch.manual_seed(0)
    model = Captioner(CaptionerConfig(vocab_size=48, decoder=decoder, dropout=0.0)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(images, captions), batch_size=batch_size)
    physical = int(batch_size * 1.25)
    if mode != "plain":
        _, model, optimizer, loader = make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                   noise_multiplier=1.0, max_grad_norm=1.0)
    rss_before = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for k, (x, y) in enumerate(loader):
        if mode == "fixed":
            x, y = x[:physical], y[:physical]  # a Poisson batch above the size is split in training
            x, y = pad_batch(x, y, physical)
        x, y = x.to(device), y.to(device)
        t = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if k >= 3:
            times.append(time.perf_counter() - t)
    memory = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
              else max(0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before))
    return {"seconds": sorted(times)[len(times) // 2], "memory_mb": memory}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", nargs=2, metavar=("MODE", "DECODER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:
        print(json.dumps(run_mode(args.one[0], args.one[1], batch_size=args.batch_size, steps=args.steps,
                                  device_name=args.device)))
        return 0
    rows = []
    for decoder in ("transformer", "lstm"):
        result = {}
        for mode in MODES:  # a fresh process each: peak memory and warm caches of one mode only
            out = subprocess.run([sys.executable, __file__, "--one", mode, decoder, "--batch-size",
                                  str(args.batch_size), "--steps", str(args.steps), "--device", args.device],
                                 capture_output=True, text=True, check=True)
            result[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        plain = result["plain"]
        for mode in ("poisson", "fixed"):
            r = result[mode]
            row = {"decoder": decoder, "mode": mode, "batch_size": args.batch_size, "device": args.device,
                   "plain_s": plain["seconds"], "dp_s": r["seconds"], "time_ratio": r["seconds"] / plain["seconds"],
                   "plain_memory_mb": plain["memory_mb"], "dp_memory_mb": r["memory_mb"],
                   "memory_ratio": r["memory_mb"] / max(plain["memory_mb"], 1e-9)}
            rows.append(row)
            print(f"{decoder:12} {mode:8} batch {args.batch_size} on {args.device}: plain {plain['seconds']:.3f} s/step, "
                  f"DP {r['seconds']:.3f} s/step, time ratio {row['time_ratio']:.2f}x, memory ratio "
                  f"{row['memory_ratio']:.2f}x ({r['memory_mb']:.0f} / {plain['memory_mb']:.0f} MB)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
