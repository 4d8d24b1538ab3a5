"""Centralized training on one dataset, private or not: the baseline federated runs compare to,
and (non-private, on public data) the pretraining federations start from.

Trains on the embedded synthetic dataset, its public variant or data folders (runners/sources.py),
optionally from a checkpoint (`init_from`), evaluates on the held-out test split (plus the trivial
one-caption baseline), reports epsilon when private, and writes a run folder:
  <out>/config.json    the run as it happened (run_record): the settings that applied (enough to
                       reproduce it: CentralizedConfig(**config["centralized"])), the data it read
                       and how many records, the vocabulary, the decoding, DP settings only when private
  <out>/metrics.json   per-epoch loss, final metrics (with their decoding), baseline metrics, epsilon
  <out>/checkpoint/    model.safetensors + config.json + vocab.json
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from shared_model.data.datasets import CaptionDataset
from shared_model.evaluation.evaluator import decoding, evaluate
from shared_model.evaluation.metrics import caption_metrics, trivial_baseline_predictions
from shared_model.model.devices import resolve_device
from shared_model.model.captioner import Captioner
from shared_model.model.checkpoint import load_checkpoint, save_checkpoint
from shared_model.model.config import CaptionerConfig, check_same_model
from shared_model.model.training import train_epoch
from shared_model.model.captioner import unwrap

from .flower_runtime import eval_beam_size
from .progress import Progress
from .sources import source_scenario, training_data

LR_SCHEDULES = ("constant", "cosine")


@dataclass
class CentralizedConfig:
    train_size: int = 4000
    test_size: int = 500
    seed: int | None = None  # data, model init and (only when given) the DP noise; None: 0, noise from the OS
    epochs: int = 8
    batch_size: int = 64  # private: the expected (Poisson) logical batch size
    lr: float = 2e-3
    weight_decay: float = 0.0
    dp: bool = False
    target_epsilon: float | None = 8.0  # private: noise calibrated to this over all epochs
    noise_multiplier: float | None = None  # private: given instead of target_epsilon
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    max_physical_batch_size: int = 128
    grad_sample_mode: str = "hooks"  # private: hooks | ghost (Opacus ghost clipping; not the LSTM decoder)
    precision: str = "fp32"  # fp32 | bf16 (autocast) | auto (bf16 on a GPU)
    beam_size: int = field(default_factory=eval_beam_size)  # the server's eval-beam-size: one score per model
    meteor: bool = True
    device: str = "auto"
    model: dict[str, Any] = field(default_factory=dict)  # CaptionerConfig overrides
    source: str = "embedded"  # embedded | public (the embedded generator's public variant)
    data: list[str] = field(default_factory=list)  # dataset folders (trained on as one) instead of `source`
    data_format: str = "coco"  # coco | karpathy | csv | jsonl (data)
    vocab_file: str = ""  # fedcap-vocab/1 JSON ("" = embedded vocabulary, or built from a folder's captions)
    init_from: str = ""  # a checkpoint to start from (its model config and vocabulary must match)
    lr_schedule: str = "constant"  # constant | cosine (decays to 0 over the planned steps)
    kind: str = "centralized"  # checkpoint metadata: centralized | pretrained

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, Path)):  # one folder
            self.data = [str(self.data)] if str(self.data) else []
        self.data = [str(d) for d in self.data]
        for name in ("train_size", "test_size", "epochs", "batch_size", "max_physical_batch_size", "beam_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        from shared_model.privacy.dp import check_grad_sample_mode

        check_grad_sample_mode(self.grad_sample_mode, decoder=self.model.get("decoder", CaptionerConfig.decoder))
        from shared_model.model.precision import check_precision

        check_precision(self.precision, grad_sample_mode=self.grad_sample_mode if self.dp else "hooks")


def run_centralized(cfg: CentralizedConfig, out_dir: str | Path, *, log: Callable[[str], None] = print) -> dict:
    t0 = time.perf_counter()
    data_seed = 0 if cfg.seed is None else cfg.seed
    torch.manual_seed(data_seed)
    device = resolve_device(cfg.device)
    image_size = int(cfg.model.get("image_size", CaptionerConfig.image_size))
    train, test, vocab = training_data(source=cfg.source, data=cfg.data, data_format=cfg.data_format,
                                       train_size=cfg.train_size, test_size=cfg.test_size, seed=data_seed,
                                       image_size=image_size, vocab_file=cfg.vocab_file)
    model_cfg = CaptionerConfig(vocab_size=len(vocab), **cfg.model)
    model = Captioner(model_cfg)
    if cfg.init_from:
        _load_init(model, vocab, cfg.init_from)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = DataLoader(CaptionDataset(train, vocab, max_len=model_cfg.max_len), batch_size=cfg.batch_size,
                        shuffle=True, drop_last=False)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"{cfg.kind} training: {len(train)} train / {len(test)} test images, {n_params:,} trainable parameters, "
        f"{model_cfg.encoder}+{model_cfg.fusion}+{model_cfg.decoder}, device {device}, "
        f"{'DP-SGD' if cfg.dp else 'non-private'}")
    engine = None
    noise_multiplier = None
    if cfg.dp:
        from shared_model.privacy.dp import plan_dp_sgd, private_training
        from shared_model.privacy.randomness import mechanism_randomness

        if cfg.seed is not None:
            log(f"warning: --seed {cfg.seed} makes the DP-SGD sampling and noise reproducible (and so replayable "
                f"by anyone who knows the seed): for experiments only, never for a model you release")
        rand = mechanism_randomness(seed=None if cfg.seed is None else cfg.seed * 7_919 + 1, device=device)
        event = plan_dp_sgd(num_records=len(train), batch_size=cfg.batch_size, epochs=cfg.epochs,
                            noise_multiplier=cfg.noise_multiplier, target_epsilon=cfg.target_epsilon,
                            target_delta=cfg.target_delta, accountant=cfg.accountant)
        noise_multiplier = event.noise_multiplier
        engine, model, optimizer, loader = private_training(
            module=model, optimizer=optimizer, dataset=loader.dataset, event=event, epochs=cfg.epochs,
            expected_batch_size=len(train) * event.sample_rate, max_grad_norm=cfg.max_grad_norm,
            accountant=cfg.accountant, grad_sample_mode=cfg.grad_sample_mode, sampling_generator=rand.sampling,
            noise_generator=rand.noise)
        log(f"DP-SGD: sample_rate {event.sample_rate:.4f}, ~{event.steps} steps, noise_multiplier "
            f"{noise_multiplier:.3f}, max_grad_norm {cfg.max_grad_norm}, accountant {cfg.accountant}, "
            f"grad-sample-mode {cfg.grad_sample_mode}")
    history = []
    schedule = _schedule(optimizer, cfg, total_steps=cfg.epochs * len(loader))
    # a bar over the optimizer steps on a terminal; elsewhere only the epoch lines
    with Progress(cfg.epochs * len(loader), label=f"{cfg.kind} training") as progress:
        def after_step() -> None:
            if schedule is not None:
                schedule()
            progress.advance()

        for epoch in range(1, cfg.epochs + 1):
            te = time.perf_counter()
            stats = train_epoch(model, optimizer, loader, device=device,
                                max_physical_batch_size=cfg.max_physical_batch_size if cfg.dp else None,
                                after_step=after_step, precision=cfg.precision)
            progress.done = epoch * len(loader)  # Poisson batches: the expected steps, not the drawn ones
            row = {"epoch": epoch, "loss": stats["loss"], "seconds": time.perf_counter() - te}
            if engine is not None:
                row["epsilon"] = engine.get_epsilon(cfg.target_delta)
            history.append(row)
            log(f"epoch {epoch}/{cfg.epochs}: loss {stats['loss']:.3f} ({row['seconds']:.1f} s)"
                + (f", epsilon {row['epsilon']:.2f}" if "epsilon" in row else "") + f" [{progress.status()}]")
    log(f"evaluating on {len(test)} test images ({decoding(cfg.beam_size)})")
    plain = unwrap(model)
    metrics, predictions = evaluate(plain, test, vocab, beam_size=cfg.beam_size, device=device, meteor=cfg.meteor)
    baseline = caption_metrics(
        trivial_baseline_predictions((c for caps in train.captions for c in caps), test.image_ids),
        test.references(), meteor=cfg.meteor)
    result = {
        "metrics": metrics, "decoding": decoding(cfg.beam_size), "beam_size": cfg.beam_size,
        "baseline": baseline, "history": history,
        "epsilon": history[-1].get("epsilon") if history else None,
        "target_delta": cfg.target_delta if cfg.dp else None, "noise_multiplier": noise_multiplier,
        "seconds": time.perf_counter() - t0, "examples": dict(list(predictions.items())[:5]),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(run_record(cfg, train=len(train), test=len(test), vocab=len(vocab),
                                                           noise_multiplier=noise_multiplier, device=device,
                                                           model=model_cfg), indent=2))
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    save_checkpoint(out / "checkpoint", plain, vocab, metadata={
        "kind": cfg.kind, "epsilon": result["epsilon"], "target_delta": result["target_delta"],
        "source": cfg.data or cfg.source, "init_from": cfg.init_from, "metrics": metrics,
        "decoding": decoding(cfg.beam_size)})
    log(_summary(result))
    log(f"outputs: {out.resolve()}")
    return result


# settings that only a private run reads, and those that only the embedded sources read
DP_ONLY = ("target_epsilon", "noise_multiplier", "target_delta", "max_grad_norm", "accountant",
           "max_physical_batch_size", "grad_sample_mode")
EMBEDDED_ONLY = ("source", "train_size")


def run_record(cfg: CentralizedConfig, *, train: int, test: int, vocab: int, noise_multiplier: float | None,
               device, model: CaptionerConfig) -> dict:
    """config.json: the run that happened. `centralized` holds the settings that applied (the DP ones
    only when private, with the noise multiplier the run used; `source` and `train_size` only for the
    embedded sources), so CentralizedConfig(**it) reproduces the run; `data` says what was read."""
    settings = dataclasses.asdict(cfg)
    for name in (() if cfg.dp else DP_ONLY) + (EMBEDDED_ONLY if cfg.data else ()):
        del settings[name]
    if cfg.dp:
        settings["noise_multiplier"], settings["target_epsilon"] = noise_multiplier, cfg.target_epsilon
    data = {"source": "folders" if cfg.data else cfg.source, "train_records": train, "test_records": test,
            "vocabulary": cfg.vocab_file or (f"{source_scenario(cfg.source)} (synthetic_vocabulary)" if not cfg.data
                                             else "built from the training captions"),
            "vocabulary_size": vocab}
    if cfg.data:
        data.update(folders=cfg.data, format=cfg.data_format)
    return {"kind": cfg.kind, "private": cfg.dp, "centralized": settings, "data": data,
            "decoding": decoding(cfg.beam_size), "device": str(device), "model": model.to_dict()}


def _load_init(model: Captioner, vocab, path: str) -> None:
    """Weights of checkpoint `path` into `model`, refusing another vocabulary or model shape."""
    loaded, saved_vocab, _ = load_checkpoint(Path(path).expanduser())
    if saved_vocab != vocab:
        raise ValueError(f"init_from {path} has a vocabulary of {len(saved_vocab)} words, the training data's has "
                         f"{len(vocab)}: give vocab_file={Path(path) / 'vocab.json'}")
    check_same_model(loaded.config, model.config, what=f"init_from {path}")  # image_size included
    try:
        model.load_state_dict(loaded.state_dict(), strict=True)
    except RuntimeError as e:
        raise ValueError(f"init_from {path} does not fit the configured model: {e}") from None


def _schedule(optimizer, cfg: CentralizedConfig, *, total_steps: int) -> Callable[[], None] | None:
    """Cosine decay of the learning rate from cfg.lr to 0 over `total_steps` optimizer steps."""
    if cfg.lr_schedule == "constant":
        return None
    import math

    done = [0]

    def step() -> None:
        done[0] += 1
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * min(done[0] / max(total_steps, 1), 1.0)))
    return step


def _summary(result: dict) -> str:
    m, b = result["metrics"], result["baseline"]
    keys = [k for k in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D") if k in m]
    lines = ["", f"scores on the held-out test split, {result['decoding']}:",
             f"{'':12}" + "".join(f"{k:>10}" for k in keys),
             f"{'model':12}" + "".join(f"{m[k]:>10.3f}" for k in keys),
             f"{'baseline':12}" + "".join(f"{b[k]:>10.3f}" for k in keys)]
    if result["epsilon"] is not None:
        lines.append(f"epsilon {result['epsilon']:.3f} at delta {result['target_delta']:g}")
    lines.append(f"wall time {result['seconds']:.0f} s; examples: " +
                 "; ".join(f"{k}: {v!r}" for k, v in list(result["examples"].items())[:3]))
    return "\n".join(lines)
