"""Image encoders: images [B, 3, H, W] in [0, 1] -> grid features [B, G, d_model].

Neither uses BatchNorm (Opacus refuses it: it mixes examples within a batch); both add a fixed
2-D positional encoding so that attention over the grid knows where each cell is.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .config import CaptionerConfig
from .layers import sinusoidal_positions_2d

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _groups(channels: int) -> int:
    for g in (8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


class _Encoder(nn.Module):
    def __init__(self, backbone: nn.Module, out_channels: int, grid: int, d_model: int, mean, std) -> None:
        super().__init__()
        self.backbone = backbone
        self.proj = nn.Linear(out_channels, d_model)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pos", sinusoidal_positions_2d(grid, grid, d_model), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        x = self.backbone((images - self.mean) / self.std)  # [B, C, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, G, C]
        return self.proj(x) + self.pos  # [B, G, d_model]


def _small_cnn(channels: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for c in channels:  # each stage: stride-2 conv then a 3x3 conv, GroupNorm, SiLU
        layers += [
            nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(_groups(c), c), nn.SiLU(),
            nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(_groups(c), c), nn.SiLU(),
        ]
        c_in = c
    return nn.Sequential(*layers)


def _batchnorm_to_groupnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a GroupNorm with the same affine parameters, in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            gn = nn.GroupNorm(min(32, child.num_features), child.num_features)
            with torch.no_grad():
                gn.weight.copy_(child.weight)
                gn.bias.copy_(child.bias)
            setattr(module, name, gn)
        else:
            _batchnorm_to_groupnorm(child)
    return module


class _BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock without in-place ops (they break Opacus's backward hooks);
    same submodule names, so torchvision state_dict keys still apply."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = block.conv1, block.bn1, block.conv2, block.bn2
        self.downsample = block.downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


def load_resnet18_backbone(weights: str | None) -> nn.Sequential:
    """torchvision ResNet-18 up to layer4, weights from a local state_dict file, BatchNorm -> GroupNorm.

    Nothing is downloaded. The file holds torchvision's `resnet18` state_dict (`.pth`/`.pt` via
    torch.save, or `.safetensors`). GroupNorm keeps BatchNorm's affine parameters; its statistics
    are per image, so pretrained features shift somewhat (fine-tuning recovers it).
    """
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"encoder weights file not found: {path} (set model-encoder-weights to a local "
                                    f"torchvision resnet18 state_dict; nothing is downloaded)")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"encoder weights file {path} does not hold a state_dict")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise ValueError(f"encoder weights file {path} is not a resnet18 state_dict: "
                             f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    layers = [nn.Sequential(*(_BasicBlock(b) for b in layer)) for layer in (net.layer1, net.layer2, net.layer3, net.layer4)]
    backbone = nn.Sequential(net.conv1, net.bn1, nn.ReLU(), net.maxpool, *layers)
    return _batchnorm_to_groupnorm(backbone)


def build_encoder(config: CaptionerConfig) -> nn.Module:
    if config.encoder == "cnn":
        grid = config.image_size // 2 ** len(config.cnn_channels)
        encoder = _Encoder(_small_cnn(config.cnn_channels), config.cnn_channels[-1], grid, config.d_model,
                           (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    else:
        grid = -(-config.image_size // 32)
        encoder = _Encoder(load_resnet18_backbone(config.encoder_weights), 512, grid, config.d_model,
                           IMAGENET_MEAN, IMAGENET_STD)
    if config.freeze_encoder:
        encoder.backbone.requires_grad_(False)
    return encoder
