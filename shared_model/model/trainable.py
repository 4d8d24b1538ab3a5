"""Which parts of the captioner train: fine-tuning all of it or only its text side.

Parameter groups, by the parameter's name in `Captioner`:
  encoder  `encoder.*` (the CNN or ResNet backbone and its projection to d_model)
  fusion   what joins image to text: `fuse.*` (concat/add), `attn.*` (the LSTM's attention over the
           image grid), `layers.N.cross_attn.*` and `layers.N.ln_cross.*` (the transformer's
           cross-attention)
  decoder  everything else: word embedding, self-attention and feed-forward blocks or the LSTM,
           final norm, output head
A trainable spec is "all", "decoder" or "fusion+decoder". Frozen parameters get requires_grad False,
which must happen BEFORE Opacus's make_private: Opacus then computes no per-sample gradient for
them, and the DP optimizer, built over the trainable parameters only, adds no noise to them and
never changes them. A config with freeze_encoder keeps its encoder backbone frozen under "all".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only for annotations: the settings schema reads TRAINABLE without torch
    from torch import nn

TRAINABLE = ("all", "decoder", "fusion+decoder")
_GROUPS = {"all": {"encoder", "fusion", "decoder"}, "decoder": {"decoder"}, "fusion+decoder": {"fusion", "decoder"}}


def check_trainable(spec: str) -> str:
    if not isinstance(spec, str):
        raise TypeError(f"trainable must be a str, got {type(spec).__name__}")
    if spec not in _GROUPS:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {spec!r}")
    return spec


def encoder_trains(spec: str) -> bool:
    """Whether `spec` trains the encoder group; when it does not, the encoder's output is a fixed
    function of each image (model/features.py computes it once)."""
    return "encoder" in _GROUPS[check_trainable(spec)]


def parameter_group(name: str) -> str:
    """"encoder", "fusion" or "decoder" for a Captioner parameter name (no Opacus `_module.` prefix)."""
    parts = name.split(".")
    if parts[0] == "encoder":
        return "encoder"
    if parts[0] in ("fuse", "attn") or (parts[0] == "layers" and len(parts) > 2 and parts[2] in ("cross_attn",
                                                                                                   "ln_cross")):
        return "fusion"
    return "decoder"


def set_trainable(model: nn.Module, spec: str = "all") -> list[nn.Parameter]:
    """Set requires_grad on every parameter of `model` (a Captioner) for `spec`; returns the
    trainable parameters, in model order, to build the optimizer over."""
    groups = _GROUPS[check_trainable(spec)]
    frozen_encoder = bool(getattr(getattr(model, "config", None), "freeze_encoder", False))
    trainable = []
    for name, p in model.named_parameters():
        group = parameter_group(name)
        keep = group in groups and not (frozen_encoder and name.startswith("encoder.backbone."))
        p.requires_grad_(keep)
        if keep:
            trainable.append(p)
    if not trainable:
        raise ValueError(f"trainable {spec!r} leaves no parameter to train")
    return trainable
