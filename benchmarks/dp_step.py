"""Cost of a DP-SGD step against a plain step, per decoder, batch-shape mode and grad-sample mode, with memory.

    python benchmarks/dp_step.py [--batch-size 64] [--steps 10] [--device cpu|cuda]
                                 [--grad-sample-mode hooks,ghost] [--decoders transformer,lstm]
                                 [--trainable all|decoder|fusion+decoder] [--per-layer] [--threads N]
                                 [--precision fp32|bf16]
                                 [--json FILE]

For each decoder (transformer, lstm) it times the median step (after warm-up) of
  plain    non-private AdamW on fixed batches;
  poisson  DP-SGD as the site trainer runs it: Poisson-sampled batches (a new shape every step);
  fixed    the same Poisson sampling, every physical batch padded to one shape (masked rows,
           `shared_model.model.training.pad_batch`; max physical batch = 1.25 x the expected batch);
each DP row once per grad-sample mode (hooks: Opacus's per-sample gradients; ghost: Opacus's ghost
clipping, refused for the LSTM decoder, printed as such with the reason), and prints time and
memory ratios against plain. Every step is `shared_model.model.training.train_epoch` on one batch, the loop
the sites run. Memory: torch's peak allocation on a GPU; on the CPU, the peak resident memory a
fresh subprocess gains during its steps. The plain step is timed again after each decoder's DP rows:
a large drift means the machine was shared and the wall-clock ratios are rough. The CPU-time ratio
(process CPU seconds per step, all threads) suffers less from other processes on a shared CPU; with
`--threads 1` it is the steadiest figure there (with several threads it also counts their spinning).
`--precision bf16` runs plain and DP steps alike under bf16 autocast (per-sample gradients upcast
to float32 before clipping; ghost is refused with it): on a GPU, the mixed-precision figures.
Goals (issue 11): time ratio <= 1.6x on this CPU and <= 2x on a GPU; memory ratio <= 2x.

`--per-layer` adds, for every row, a table of where a step's time goes per module type (forward,
backward, Opacus's per-sample gradient or norm work; benchmarks/layer_timing.py), measured on a few
extra instrumented steps after the timed ones, so a missed goal says which layers dominate.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's shared_model, not an installed one
sys.path.insert(1, str(Path(__file__).resolve().parent))

MODES = ("plain", "poisson", "fixed")
LAYER_STEPS = 3  # instrumented steps for --per-layer


def run_mode(mode: str, decoder: str, *, grad_sample_mode: str, batch_size: int, steps: int, device_name: str,
             per_layer: bool = False, threads: int | None = None, trainable: str = "all",
             precision: str = "fp32") -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from torch.utils.data import DataLoader, TensorDataset

    from shared_model.model.captioner import Captioner
    from shared_model.model.config import CaptionerConfig
    from shared_model.model.trainable import set_trainable
    from shared_model.model.training import pad_batch, train_epoch
    from shared_model.privacy.dp import make_private

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    device = torch.device(device_name)
    n = batch_size * (steps + 3)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 64, 64, generator=g)
    captions = torch.randint(4, 48, (n, 20), generator=g)
    captions[:, 0], captions[:, -1] = 1, 2
    torch.manual_seed(0)
    model = Captioner(CaptionerConfig(vocab_size=48, decoder=decoder, dropout=0.0)).to(device)
    optimizer = torch.optim.AdamW(set_trainable(model, trainable), lr=1e-3)  # plain and DP alike
    loader = DataLoader(TensorDataset(images, captions), batch_size=batch_size)
    physical = int(batch_size * 1.25)
    if mode != "plain":
        _, model, optimizer, loader = make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                   noise_multiplier=1.0, max_grad_norm=1.0,
                                                   grad_sample_mode=grad_sample_mode, accountant="prv")

    def batches():
        for x, y in loader:
            if mode == "fixed":
                x, y = x[:physical], y[:physical]  # a Poisson batch above the size is split in training
                x, y = pad_batch(x, y, physical)
            yield x.to(device), y.to(device)

    cpu = []

    def step(x, y) -> float:
        t, c = time.perf_counter(), time.process_time()
        train_epoch(model, optimizer, [(x, y)], device=device, precision=precision)
        if device.type == "cuda":
            torch.cuda.synchronize()
        cpu.append(time.process_time() - c)
        return time.perf_counter() - t

    rss_before = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [step(x, y) for x, y in batches()][3:]
    memory = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
              else max(0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before))
    cpu = cpu[3:]
    result = {"seconds": sorted(times)[len(times) // 2], "cpu_seconds": sorted(cpu)[len(cpu) // 2],
              "memory_mb": memory}
    if per_layer:
        from layer_timing import LayerTimer

        timer = LayerTimer(model, optimizer)
        with timer:
            instrumented = [step(x, y) for _, (x, y) in zip(range(LAYER_STEPS), batches())]
        result["per_layer"] = timer.table(len(instrumented), sum(instrumented) / len(instrumented))
    return result


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _subprocess(mode: str, decoder: str, grad_sample_mode: str, args) -> dict:
    """One mode in a fresh process: peak memory and warm caches of that mode only."""
    cmd = [sys.executable, __file__, "--one", mode, decoder, "--grad-sample-mode", grad_sample_mode,
           "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--device", args.device,
           "--threads", str(args.threads or 0), "--trainable", args.trainable, "--precision", args.precision]
    out = subprocess.run(cmd + (["--per-layer"] if args.per_layer else []), capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{mode}/{grad_sample_mode}/{decoder} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from shared_model.model.precision import check_precision
    from shared_model.privacy.dp import GRAD_SAMPLE_MODES, check_grad_sample_mode

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--grad-sample-mode", default=",".join(GRAD_SAMPLE_MODES),
                        help="comma-separated DP modes to compare (default %(default)s)")
    parser.add_argument("--decoders", default="transformer,lstm")
    parser.add_argument("--per-layer", action="store_true", help="time forward/backward/per-sample work per "
                                                                 "module type")
    parser.add_argument("--trainable", default="all", help="all | decoder | fusion+decoder (the rest frozen, "
                                                               "in the plain step too)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (default: torch's)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="autocast of plain and DP steps alike (bf16: GPU mixed precision)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", nargs=2, metavar=("MODE", "DECODER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    gsms = [check_grad_sample_mode(m.strip()) for m in args.grad_sample_mode.split(",") if m.strip()]
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:
        print(json.dumps(run_mode(args.one[0], args.one[1], grad_sample_mode=gsms[0], batch_size=args.batch_size,
                                  steps=args.steps, device_name=args.device, per_layer=args.per_layer,
                                  threads=args.threads, trainable=args.trainable, precision=args.precision)))
        return 0
    from layer_timing import format_table

    rows = []
    for decoder in [d.strip() for d in args.decoders.split(",") if d.strip()]:
        plain = _subprocess("plain", decoder, "hooks", args)
        if args.per_layer:
            print(format_table(f"{decoder} plain", plain["per_layer"]), flush=True)
        for gsm in gsms:
            try:
                check_grad_sample_mode(gsm, decoder=decoder)
                check_precision(args.precision, grad_sample_mode=gsm)
            except ValueError as refused:
                rows.append({"decoder": decoder, "mode": "-", "grad_sample_mode": gsm, "batch_size": args.batch_size,
                             "device": args.device, "threads": args.threads, "trainable": args.trainable,
                             "precision": args.precision,
                             "refused": str(refused)})
                print(f"{decoder:12} {gsm:6} refused: {refused}", flush=True)
                continue
            for mode in ("poisson", "fixed"):
                r = _subprocess(mode, decoder, gsm, args)
                row = {"decoder": decoder, "mode": mode, "grad_sample_mode": gsm, "batch_size": args.batch_size,
                       "device": args.device, "threads": args.threads, "trainable": args.trainable,
                       "precision": args.precision, "plain_s": plain["seconds"],
                       "dp_s": r["seconds"], "time_ratio": r["seconds"] / plain["seconds"],
                       "plain_cpu_s": plain["cpu_seconds"], "dp_cpu_s": r["cpu_seconds"],
                       "cpu_time_ratio": r["cpu_seconds"] / plain["cpu_seconds"], "plain_memory_mb": plain["memory_mb"],
                       "dp_memory_mb": r["memory_mb"], "memory_ratio": r["memory_mb"] / max(plain["memory_mb"], 1e-9)}
                if args.per_layer:
                    row["per_layer"], row["plain_per_layer"] = r["per_layer"], plain["per_layer"]
                rows.append(row)
                print(f"{decoder:12} {gsm:6} {mode:8} batch {args.batch_size} on {args.device}"
                      f"{'' if args.trainable == 'all' else ', trainable ' + args.trainable}"
                      f"{'' if args.precision == 'fp32' else ', ' + args.precision}: plain "
                      f"{plain['seconds']:.3f} s/step, DP {r['seconds']:.3f} s/step, time ratio "
                      f"{row['time_ratio']:.2f}x (CPU time {row['cpu_time_ratio']:.2f}x), memory ratio "
                      f"{row['memory_ratio']:.2f}x "
                      f"({r['memory_mb']:.0f} / {plain['memory_mb']:.0f} MB)", flush=True)
                if args.per_layer:
                    print(format_table(f"{decoder} {gsm} {mode}", r["per_layer"]), flush=True)
        again = _subprocess("plain", decoder, "hooks", args)["seconds"]  # a shared machine drifts: say so
        for row in rows:
            if row["decoder"] == decoder and "plain_s" in row:
                row["plain_s_after"] = again
        print(f"{decoder:12} plain again after the DP rows: {again:.3f} s/step "
              f"({(again / plain['seconds'] - 1) * 100:+.0f}% against the first)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
