"""The captioner's one constructor argument: `CaptionerConfig`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Mapping

ENCODERS = ("cnn", "resnet18", "resnet50", "vgg16", "mobilenet_v3_large", "vit_b_16")  # all but cnn: torchvision
BATCHNORM_ENCODERS = ("resnet18", "resnet50", "mobilenet_v3_large")  # frozen: BatchNorm; trainable: GroupNorm
FUSIONS = ("concat", "add", "attention")
DECODERS = ("lstm", "transformer")


@dataclass(frozen=True)
class CaptionerConfig:
    vocab_size: int
    image_size: int = 64
    encoder: str = "cnn"  # one of ENCODERS
    encoder_weights: str | None = None  # a local torchvision state_dict file of `encoder` (not cnn)
    freeze_encoder: bool = False
    cnn_channels: tuple[int, ...] = (32, 64, 128)  # each stage halves the resolution
    fusion: str = "attention"  # concat | add | attention
    decoder: str = "transformer"  # lstm | transformer
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    ffn_dim: int = 256
    dropout: float = 0.1
    max_len: int = 20  # caption tokens including <start> and <end>

    def __post_init__(self) -> None:
        for name, choices in (("encoder", ENCODERS), ("fusion", FUSIONS), ("decoder", DECODERS)):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        for name in ("vocab_size", "image_size", "d_model", "num_layers", "num_heads", "ffn_dim", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.vocab_size < 5:
            raise ValueError(f"vocab_size must be >= 5 (4 special tokens + 1 word), got {self.vocab_size}")
        if self.max_len < 3:
            raise ValueError(f"max_len must be >= 3, got {self.max_len}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.cnn_channels or any(int(c) < 1 for c in self.cnn_channels):
            raise ValueError(f"cnn_channels must be positive ints, got {self.cnn_channels}")
        if self.encoder == "cnn" and self.image_size % (2 ** len(self.cnn_channels)):
            raise ValueError(
                f"image_size ({self.image_size}) must be divisible by 2**len(cnn_channels) "
                f"({2 ** len(self.cnn_channels)})"
            )
        if self.encoder_weights is not None and self.encoder == "cnn":
            raise ValueError(f"encoder_weights is for a torchvision encoder ({', '.join(ENCODERS[1:])}), got encoder "
                             f"'cnn' with encoder_weights {self.encoder_weights!r}")
        if self.encoder == "vit_b_16" and self.image_size % 16:
            raise ValueError(f"encoder vit_b_16 needs image_size a multiple of 16 (its patch), got {self.image_size}")
        if self.encoder == "vgg16" and self.image_size < 32:
            raise ValueError(f"encoder vgg16 needs image_size >= 32 (five 2x poolings), got {self.image_size}")
        object.__setattr__(self, "cnn_channels", tuple(int(c) for c in self.cnn_channels))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["cnn_channels"] = list(self.cnn_channels)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CaptionerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown captioner config keys: {unknown}")
        d = dict(data)
        if "cnn_channels" in d:
            d["cnn_channels"] = tuple(d["cnn_channels"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# Fields that change neither the weights' shapes nor what they compute from an image: a checkpoint
# may be loaded under other values of these (the weights file is not needed: the checkpoint holds every weight).
# (freeze_encoder except for BATCHNORM_ENCODERS, where a frozen encoder keeps BatchNorm and a trainable
# one has GroupNorm: other weights).
TRAINING_ONLY = ("encoder_weights", "freeze_encoder", "dropout")


def check_same_model(saved: CaptionerConfig, wanted: CaptionerConfig, *, what: str) -> None:
    """ValueError naming the first field (image_size, encoder, d_model, ...) in which the checkpoint's
    model `saved` differs from the model a run asks for, `what` naming the checkpoint. Image size
    counts: the weights of a convolutional encoder load at any size, but compute other features."""
    want = wanted.to_dict()
    model_defining = {"freeze_encoder"} if saved.encoder in BATCHNORM_ENCODERS else set()
    for field, value in saved.to_dict().items():
        if (field not in TRAINING_ONLY or field in model_defining) and want[field] != value:
            raise ValueError(f"{what} has model {field}={value!r} but this run gives {want[field]!r}: give the "
                             f"checkpoint's {field} (or start from another checkpoint)")


# run_config (kebab-case, [tool.flwr.app.config]) key -> CaptionerConfig field
RUN_CONFIG_KEYS = {
    "model-encoder": "encoder",
    "model-encoder-weights": "encoder_weights",
    "model-freeze-encoder": "freeze_encoder",
    "model-fusion": "fusion",
    "model-decoder": "decoder",
    "model-d-model": "d_model",
    "model-num-layers": "num_layers",
    "model-num-heads": "num_heads",
    "model-ffn-dim": "ffn_dim",
    "model-dropout": "dropout",
    "model-max-len": "max_len",
    "image-size": "image_size",
}


def captioner_config_from_run_config(run_config: Mapping[str, Any], *, vocab_size: int) -> CaptionerConfig:
    """Build the model config from Flower-style kebab-case settings; absent keys keep defaults.

    An empty string for `model-encoder-weights` means no weights file.
    """
    kwargs: dict[str, Any] = {}
    for key, field in RUN_CONFIG_KEYS.items():
        if key in run_config:
            value = run_config[key]
            if field == "encoder_weights" and value == "":
                value = None
            kwargs[field] = value
    return CaptionerConfig(vocab_size=vocab_size, **kwargs)
