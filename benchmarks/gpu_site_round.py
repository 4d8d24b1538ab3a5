"""A site's DP round on a GPU through client.trainer.train_round, as the ClientApp runs it: the
secret randomness on CUDA (two deployed-mode rounds differ, two seeded ones are equal), the default
captioner's round plain vs DP, and a frozen torchvision encoder at 224 px (random weights: nothing
is downloaded). Prints seconds per round (round 2: after warm-up), seconds per record and peak GPU
memory. From the project root: python benchmarks/gpu_site_round.py [records] (SMOKE=1: tiny, CPU)."""

import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from client.settings import local_training  # noqa: E402
from shared_model.run_settings import default_run_config  # noqa: E402
from client.trainer import train_round  # noqa: E402
from shared_model.data.synthetic import load_embedded, synthetic_vocabulary
from shared_model.model.captioner import Captioner
from shared_model.model.config import CaptionerConfig
from shared_model.privacy.ledger import PrivacyLedger
from shared_model.privacy.site_budget import RunRequest, SiteBudget  # noqa: E402

SMOKE = os.environ.get("SMOKE") == "1"
N = int(sys.argv[1]) if len(sys.argv) > 1 else 4000
DEV = torch.device("cpu" if SMOKE else "cuda")
VOCAB = synthetic_vocabulary()


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def site_rounds(cfg, data, *, dp, trainable="all", rounds=2, seed=None, batch=128, epochs=2):
    training = local_training({**default_run_config(), "local-epochs": epochs, "batch-size": batch, "lr": 3e-3,
                               "max-physical-batch-size": batch, "physical-batch-shape": "auto",
                               "grad-sample-mode": "auto", "precision": "fp32", "trainable": trainable,
                               "model-decoder": cfg.decoder}, {})
    torch.manual_seed(0)
    model = Captioner(cfg)
    ledger = PrivacyLedger(tempfile.mkdtemp() + "/ledger.jsonl") if dp else None
    budget = SiteBudget(target_epsilon=8.0, target_delta=1e-5, accountant="rdp") if dp else None
    request = RunRequest(run_id="gpu", run_epsilon=8.0, num_rounds=3, local_epochs=epochs, batch_size=batch,
                         count_noise_multiplier=20.0) if dp else None
    out = []
    for rnd in range(1, rounds + 1):
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model = Captioner(cfg)  # a fresh module per message, as the ClientApp builds it
        model.load_state_dict(state)
        if DEV.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        m = train_round(model=model, data=data, vocab=VOCAB, training=training, budget=budget, ledger=ledger,
                        request=request, server_round=rnd, device=DEV, seed=seed)
        sync()
        dt = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() / 2**20 if DEV.type == "cuda" else 0
        out.append((dt, peak, m, model))
        print(f"  round {rnd}: {dt:.2f} s ({dt / len(data) * 1e3:.2f} ms/record) peak {peak:.0f} MiB dp={dp} "
              f"trainable={trainable} gsm={training.grad_sample_mode} eps={m.get('epsilon')}", flush=True)
    return out


def flat(model):
    return torch.cat([p.detach().flatten().cpu() for p in model.parameters()])


def main():
    print(f"device {DEV} ({torch.cuda.get_device_name() if DEV.type == 'cuda' else 'cpu'}), torch {torch.__version__}")
    small = load_embedded("train", 64 if SMOKE else 512, seed=0)
    cfg = CaptionerConfig(vocab_size=len(VOCAB))
    print("randomness: two deployed-mode rounds (seed None), then two seeded ones")
    a, b = (flat(site_rounds(cfg, small, dp=True, rounds=1, seed=None, batch=32, epochs=1)[0][3]) for _ in range(2))
    c, d = (flat(site_rounds(cfg, small, dp=True, rounds=1, seed=7, batch=32, epochs=1)[0][3]) for _ in range(2))
    print(f"RESULT deployed rounds differ: {not torch.equal(a, b)}; seeded rounds equal: {torch.equal(c, d)}")
    data = load_embedded("train", 64 if SMOKE else N, seed=0)
    for trainable in ("all", "fusion+decoder"):
        for dp in (False, True):
            print(f"default captioner, {len(data)} records, trainable {trainable}, dp {dp}")
            r = site_rounds(cfg, data, dp=dp, trainable=trainable)
            print(f"RESULT default {trainable} dp={dp}: round 2 {r[-1][0]:.2f} s peak {r[-1][1]:.0f} MiB")
    n224 = 64 if SMOKE else min(N, 2000)
    big = load_embedded("train", n224, seed=0, image_size=224)
    for encoder in ("resnet50",):
        enc = CaptionerConfig(vocab_size=len(VOCAB), image_size=224, encoder=encoder, freeze_encoder=True)
        for dp in (False, True):
            print(f"{encoder} frozen at 224 px, {n224} records, dp {dp}")
            r = site_rounds(enc, big, dp=dp, trainable="fusion+decoder", batch=128, epochs=1)
            print(f"RESULT {encoder} frozen dp={dp}: round 2 {r[-1][0]:.2f} s "
                  f"({r[-1][0] / n224 * 1e3:.2f} ms/record) peak {r[-1][1]:.0f} MiB")


if __name__ == "__main__":
    main()
