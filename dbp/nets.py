"""Networks: diffusers UNets by named config, and classifiers that take [0, 1] images."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
import torch.nn.functional as F

if TYPE_CHECKING:  # diffusers is imported lazily: a classifier-only process (a Triton stub) never needs it
    from diffusers import UNet2DModel

# Named UNet layouts. "small" is the Fashion-MNIST default (1.1M params, attention only at 8x8, chosen
# for what a 2-core CPU trains in the budget); "ddpm-cifar10" is google/ddpm-cifar10-32's 35.7M layout.
UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "small": dict(
        sample_size=32, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8,
    ),
    "ddpm-cifar10": dict(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), downsample_padding=0,
        flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32, attention_head_dim=None,
    ),
}


def build_unet(name: str = "small", **overrides: Any) -> UNet2DModel:
    if name not in UNET_CONFIGS:
        raise ValueError(f"unknown UNet config {name!r}; known: {sorted(UNET_CONFIGS)}")
    from diffusers import UNet2DModel
    return UNet2DModel(**{**UNET_CONFIGS[name], **overrides})


def build_unet_from_meta(arch: dict[str, Any]) -> UNet2DModel:
    """The (untrained) UNet a checkpoint's meta["arch"] describes: a named config, or the full diffusers
    config when it was fine-tuned from a diffusers folder."""
    if "unet_config" in arch:
        from diffusers import UNet2DModel
        return UNet2DModel.from_config(arch["unet_config"])
    return build_unet(arch["unet"], **arch.get("unet_overrides", {}))


def load_diffusers_unet(folder: str | Path) -> UNet2DModel:
    """A pretrained UNet from a local diffusers folder (pipeline root or its `unet/`), never the network."""
    folder = Path(folder)
    sub = "unet" if (folder / "unet" / "config.json").exists() else None
    if not (folder / (sub or "") / "config.json").exists():
        raise FileNotFoundError(f"no diffusers UNet config.json under {folder} (or {folder}/unet)")
    from diffusers import UNet2DModel
    return UNet2DModel.from_pretrained(folder, subfolder=sub, local_files_only=True)


def set_dropout(module: nn.Module, p: float) -> None:
    """Force every dropout probability (ADDT recipe: 0.1), including diffusers' resnet blocks."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


class EpsNet(nn.Module):
    """Adapts a diffusers UNet to the eps_model(x_t, t) -> eps callable the diffusion math expects."""

    def __init__(self, unet: UNet2DModel):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t).sample


# ---- classifiers ------------------------------------------------------------------------------

DATA_STATS = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def _conv_bn(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """VGG-style 6-conv net for 32x32 inputs: >= 91% on Fashion-MNIST in a few CPU epochs."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, dropout: float = 0.3):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn(in_channels, w), _conv_bn(w, w), nn.MaxPool2d(2),
            _conv_bn(w, 2 * w), _conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
            _conv_bn(2 * w, 4 * w), nn.MaxPool2d(2), _conv_bn(4 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * w, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


class _WideBasic(nn.Module):
    def __init__(self, cin, cout, dropout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, padding=1, bias=True)
        self.dropout = nn.Dropout(dropout)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, stride=stride, padding=1, bias=True)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=True))
                         if stride != 1 or cin != cout else nn.Sequential())

    def forward(self, x):
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    """WRN-depth-k in the meliketoy/wide-resnet.pytorch format (the paper's `origin.t7` is WRN-28-10)."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, dropout: float = 0.3, num_classes: int = 10,
                 in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("WRN depth must be 6n+4")
        n, k = (depth - 4) // 6, widen_factor
        widths = [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=True)
        layers, cin = [], widths[0]
        for i, stride in zip(range(1, 4), (1, 2, 2)):
            for j in range(n):
                layers.append(_WideBasic(cin, widths[i], dropout, stride if j == 0 else 1))
                cin = widths[i]
        self.layers = nn.Sequential(*layers)
        self.bn1 = nn.BatchNorm2d(cin, momentum=0.9)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.layers(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class Classifier(nn.Module):
    """[0,1] image -> logits; normalisation lives inside so attacks and servers see raw pixels."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x01):
        return self.net(self.normalize(x01))


CLASSIFIER_ARCHS = ("small_cnn", "wrn-28-10")


def build_classifier(arch: str = "small_cnn", dataset: str = "fashion_mnist", num_classes: int = 10,
                     in_channels: int | None = None) -> Classifier:
    if dataset not in DATA_STATS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(DATA_STATS)}")
    mean, std = DATA_STATS[dataset]
    in_channels = in_channels or len(mean)
    if arch == "small_cnn":
        net = SmallCNN(in_channels, num_classes)
    elif arch == "wrn-28-10":
        net = WideResNet(28, 10, 0.3, num_classes, in_channels)
    else:
        raise ValueError(f"unknown classifier arch {arch!r}; known: {CLASSIFIER_ARCHS}")
    return Classifier(net, mean, std)
