"""Seconds per training step of the default captioner, non-private vs DP-SGD (Opacus hooks mode).

Prints one line per decoder: non-private s/step, DP s/step and their ratio (goal: <= 1.5x).
Usage: python benchmarks/dp_step.py [--batch-size 64] [--steps 10] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from shared_model.model import Captioner, CaptionerConfig
from shared_model.privacy import make_private


def seconds_per_step(model, optimizer, batches, device) -> float:
    times = []
    for images, captions in batches:
        images, captions = images.to(device), captions.to(device)
        t = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(images, captions)[1].backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]  # median; the first steps warm up


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    n = args.batch_size * args.steps
    images = torch.rand(n, 3, 64, 64)
    captions = torch.randint(4, 48, (n, 20))
    captions[:, 0], captions[:, -1] = 1, 2
    for decoder in ("transformer", "lstm"):
        cfg = CaptionerConfig(vocab_size=48, decoder=decoder, dropout=0.0)
        torch.manual_seed(0)
        model = Captioner(cfg).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        plain = seconds_per_step(model, opt, DataLoader(TensorDataset(images, captions), batch_size=args.batch_size),
                                 device)
        model = Captioner(cfg).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loader = DataLoader(TensorDataset(images, captions), batch_size=args.batch_size)
        _, model, opt, loader = make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                                             max_grad_norm=1.0)
        private = seconds_per_step(model, opt, loader, device)
        print(f"{decoder:12} batch {args.batch_size} on {device}: non-private {plain:.3f} s/step, "
              f"DP-SGD {private:.3f} s/step, ratio {private / plain:.2f}x")


if __name__ == "__main__":
    main()
