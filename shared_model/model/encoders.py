"""Image encoders: images [B, 3, H, W] in [0, 1] -> grid features [B, G, d_model].

One interface for every encoder: a backbone giving a feature map [B, C, g, g], a Linear to
d_model and a fixed 2-D positional encoding, so attention fusion gets the spatial grid and
concat/add fusion its mean (the pooled vector, `Captioner.start`). Encoders: "cnn" (a small CNN
with GroupNorm) and torchvision backbones by name (`TORCHVISION`: resnet18, resnet50, vgg16,
mobilenet_v3_large, vit_b_16), their weights from a local file. The DP rule for BatchNorm is in
`load_torchvision_backbone`: kept in eval mode when the encoder is frozen, GroupNorm when it trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
        self.frozen = False

    def freeze_backbone(self) -> None:
        """No gradient, and eval mode for good: BatchNorm then normalises with its pretrained
        running statistics and never updates them (see `train`)."""
        self.backbone.requires_grad_(False)
        self.frozen = True
        self.backbone.eval()

    def train(self, mode: bool = True) -> "_Encoder":
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # a frozen backbone never trains: no batch statistics cross examples
        return self

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


def _norm_groups(channels: int) -> int:
    """The largest divisor of `channels` that is at most 32 (32 for ResNet's widths, as Opacus's
    fixer; 20 for MobileNet's 40, where Opacus's min(32, C) would not divide)."""
    return max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)


def _batchnorm_to_groupnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a GroupNorm with the same affine parameters, in place (what
    opacus.validators.ModuleValidator.fix does, with groups that divide every width)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            gn = nn.GroupNorm(_norm_groups(child.num_features), child.num_features)
            with torch.no_grad():
                gn.weight.copy_(child.weight)
                gn.bias.copy_(child.bias)
            setattr(module, name, gn)
        else:
            _batchnorm_to_groupnorm(child)
    return module


def _no_inplace(module: nn.Module) -> nn.Module:
    """Every activation out of place: an in-place op on a hooked module's output breaks Opacus's
    backward hooks."""
    for m in module.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
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


class _Bottleneck(nn.Module):
    """torchvision's ResNet Bottleneck (ResNet-50) without in-place ops; same submodule names."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = block.conv1, block.bn1, block.conv2, block.bn2
        self.conv3, self.bn3, self.downsample = block.conv3, block.bn3, block.downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + identity)


class _InvertedResidual(nn.Module):
    """torchvision's MobileNetV3 InvertedResidual without its in-place residual add; same names."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block, self.use_res_connect = block.block, block.use_res_connect

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


class _ViTAttention(nn.Module):
    """A ViT block's nn.MultiheadAttention(batch_first=True) as `layers.MultiHeadAttention` (Linear +
    SDPA, the same function, tested there), its packed in-projection split into q/k/v: Opacus
    refuses nn.MultiheadAttention, and its DPMultiheadAttention computes another function with
    batch_first=True (opacus issue #774)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        from .layers import MultiHeadAttention

        self.attn = MultiHeadAttention(mha.embed_dim, mha.num_heads, dropout=mha.dropout)
        with torch.no_grad():
            for proj, w, b in zip((self.attn.q_proj, self.attn.k_proj, self.attn.v_proj),
                                  mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3)):
                proj.weight.copy_(w)
                proj.bias.copy_(b)
            self.attn.out_proj.weight.copy_(mha.out_proj.weight)
            self.attn.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, need_weights: bool = False) -> tuple[Tensor, None]:
        k, v = self.attn.project_kv(key)
        return self.attn(query, k, v), None


class _ViTGrid(nn.Module):
    """torchvision's VisionTransformer up to its last LayerNorm -> patch grid [B, D, g, g] (the class
    token's output dropped). The class token and position embedding become buffers: bare
    parameters outside any layer, which Opacus cannot clip per example, so they stay as pretrained
    (same state_dict keys)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        for block in vit.encoder.layers:
            block.self_attention = _ViTAttention(block.self_attention)
        for owner, name in ((vit, "class_token"), (vit.encoder, "pos_embedding")):
            value = getattr(owner, name).detach()
            delattr(owner, name)
            owner.register_buffer(name, value)
        vit.heads = nn.Identity()
        self.vit, self.grid = vit, vit.image_size // vit.patch_size

    def forward(self, images: Tensor) -> Tensor:
        x = self.vit._process_input(images)  # [B, g*g, D]
        x = torch.cat([self.vit.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.vit.encoder(x)[:, 1:]  # [B, g*g, D]
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], self.grid, self.grid)  # [B, D, g, g]


@dataclass(frozen=True)
class _Torchvision:
    """A torchvision backbone: its constructor, what its classifier's keys start with, its
    feature width and its grid side for an image side."""

    build: Callable[[int], nn.Module]  # image_size -> torchvision model, random weights
    head: str
    channels: int
    grid: Callable[[int], int]
    features: Callable[[nn.Module], nn.Module]  # torchvision model -> backbone giving [B, C, g, g]


def _resnet_features(net: nn.Module) -> nn.Module:
    layers = [nn.Sequential(*((_BasicBlock if type(b).__name__ == "BasicBlock" else _Bottleneck)(b) for b in layer))
              for layer in (net.layer1, net.layer2, net.layer3, net.layer4)]
    return nn.Sequential(net.conv1, net.bn1, nn.ReLU(), net.maxpool, *layers)


def _mobilenet_features(net: nn.Module) -> nn.Module:
    for k, block in enumerate(net.features):
        if type(block).__name__ == "InvertedResidual":
            net.features[k] = _InvertedResidual(block)
    return net.features


def _tv(name: str) -> Callable[[int], nn.Module]:
    def build(image_size: int) -> nn.Module:
        import torchvision.models as tvm

        return getattr(tvm, name)(weights=None, **({"image_size": image_size} if name == "vit_b_16" else {}))
    return build


TORCHVISION = {  # every encoder but "cnn"; shared_model.model.config.ENCODERS lists them
    "resnet18": _Torchvision(_tv("resnet18"), "fc.", 512, lambda s: -(-s // 32), _resnet_features),
    "resnet50": _Torchvision(_tv("resnet50"), "fc.", 2048, lambda s: -(-s // 32), _resnet_features),
    "vgg16": _Torchvision(_tv("vgg16"), "classifier.", 512, lambda s: s // 32, lambda net: net.features),
    "mobilenet_v3_large": _Torchvision(_tv("mobilenet_v3_large"), "classifier.", 960, lambda s: -(-s // 32),
                                       _mobilenet_features),
    "vit_b_16": _Torchvision(_tv("vit_b_16"), "heads.", 768, lambda s: s // 16, _ViTGrid),
}


def _read_state(path: Path, encoder: str) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file not found: {path} (set model-encoder-weights to a local "
                                f"torchvision {encoder} state_dict; nothing is downloaded)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn or foreign file: say which, and what was expected
        raise ValueError(f"encoder weights file {path} cannot be read as a torchvision {encoder} state_dict: "
                         f"{type(e).__name__}: {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"encoder weights file {path} does not hold a state_dict (expected torchvision {encoder}'s), "
                         f"got {type(state).__name__}")
    return state


def load_torchvision_backbone(encoder: str, weights: str | None, *, image_size: int, frozen: bool) -> nn.Module:
    """A torchvision backbone by name, its weights from a local state_dict file (`.pth`/`.pt` from
    torch.save, or `.safetensors`; the classifier's keys may be absent; nothing is downloaded;
    None: random weights), giving features [B, C, g, g].

    BatchNorm (resnet18, resnet50, mobilenet_v3_large): a `frozen` encoder keeps it, in eval mode
    (`_Encoder.train` holds it there): with no gradient and running statistics that never change,
    each image's features depend on that image alone, so it is private as it is. A trainable
    encoder gets GroupNorm instead, carrying BatchNorm's affine parameters (as Opacus's
    ModuleValidator.fix does): BatchNorm mixes the examples of a batch, which per-example clipping
    cannot bound. Every backbone runs without in-place ops; ViT's attention is rebuilt from Linear
    + SDPA (`_ViTAttention`). ViT at another image size than the weights' 224: the position
    embedding is interpolated (torchvision's interpolate_embeddings); the image side must be a
    multiple of 16."""
    spec = TORCHVISION[encoder]
    if encoder == "vit_b_16" and image_size % 16:
        raise ValueError(f"vit_b_16 needs an image_size that is a multiple of its 16-px patch, got {image_size}")
    net = spec.build(image_size)
    if weights is not None:
        path = Path(weights)
        state = {k: v for k, v in _read_state(path, encoder).items() if not k.startswith(spec.head)}
        if encoder == "vit_b_16" and "encoder.pos_embedding" in state:
            from torchvision.models.vision_transformer import interpolate_embeddings

            state = interpolate_embeddings(image_size, 16, state)
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(spec.head)]
        if missing or unexpected:
            raise ValueError(f"encoder weights file {path} is not a torchvision {encoder} state_dict: missing "
                             f"{missing[:3]}{' ...' if len(missing) > 3 else ''}, unexpected "
                             f"{unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
    backbone = _no_inplace(spec.features(net))
    return backbone if frozen else _batchnorm_to_groupnorm(backbone)


def load_resnet18_backbone(weights: str | None) -> nn.Module:
    """torchvision ResNet-18 up to layer4 with GroupNorm (trainable): `load_torchvision_backbone`."""
    return load_torchvision_backbone("resnet18", weights, image_size=224, frozen=False)


def build_encoder(config: CaptionerConfig) -> nn.Module:
    if config.encoder == "cnn":
        grid = config.image_size // 2 ** len(config.cnn_channels)
        encoder = _Encoder(_small_cnn(config.cnn_channels), config.cnn_channels[-1], grid, config.d_model,
                           (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    else:
        spec = TORCHVISION[config.encoder]
        backbone = load_torchvision_backbone(config.encoder, config.encoder_weights, image_size=config.image_size,
                                             frozen=config.freeze_encoder)
        encoder = _Encoder(backbone, spec.channels, spec.grid(config.image_size), config.d_model,
                           IMAGENET_MEAN, IMAGENET_STD)
    if config.freeze_encoder:
        encoder.freeze_backbone()
    return encoder
