"""Feature-map encoder for spatial memory (the spatial-memory spec): a backbone's intermediate maps
through a feature-pyramid neck, fused into one ``C x S x S`` map ``P_t`` (C = 128, S = 14 by
default).

``torchvision.ops.FeaturePyramidNetwork`` stands in for the spec's BiFPN: one top-down pass with
lateral 1x1 and output 3x3 convolutions. Its outputs (one per level, all C channels) are resized
to S x S (bilinear, antialiased when shrinking) and averaged: every level speaks in the fused map,
which is what BiFPN's weighted fusion does with learned instead of equal weights.

Levels taken from each backbone (with an 84 x 84 image):

- ``cnn`` (the imitation spec's four convolutions): after conv1 32x21x21, conv2 64x11x11,
  conv4 64x11x11.
- ``resnet18``: images resized to 112 x 112 (so that layer2 is 14 x 14), then layer1 64x28x28,
  layer2 128x14x14, layer3 256x7x7, layer4 512x4x4.

>>> encoder = make_spatial_encoder("cnn")
>>> encoder(images).shape           # images (N, 3, 84, 84) uint8 -> (N, 128, 14, 14)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops import FeaturePyramidNetwork

from memrl.nn.backbones import Backbone, make_backbone

SPATIAL_BACKBONES = ("cnn", "resnet18")
RESNET_INPUT_SIZE = 112  # layer2 of ResNet-18 is then 14 x 14
# backbone -> (graph node -> level name, channels of each level)
_LEVELS: dict[str, tuple[dict[str, str], list[int]]] = {
    "cnn": ({"1": "c1", "3": "c2", "7": "c4"}, [32, 64, 64]),
    "resnet18": (
        {"layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"},
        [64, 128, 256, 512],
    ),
}


class SpatialEncoder(nn.Module):
    """Images (N, 3, H, W), uint8 or [0, 1] float -> feature maps (N, channels, size, size)."""

    def __init__(self, backbone: Backbone, in_channels: list[int], channels: int, size: int):
        super().__init__()
        self.backbone, self.channels, self.size = backbone, channels, size
        self.neck = FeaturePyramidNetwork(in_channels, channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        levels = self.neck(self.backbone(images))  # OrderedDict of (N, channels, h_l, w_l)
        fused = [
            p
            if p.shape[-1] == self.size and p.shape[-2] == self.size
            else F.interpolate(
                p,
                size=(self.size, self.size),
                mode="bilinear",
                align_corners=False,
                antialias=p.shape[-1] > self.size,
            )
            for p in levels.values()
        ]
        return torch.stack(fused).mean(0)  # (N, channels, size, size)


def make_spatial_encoder(
    name: str, channels: int = 128, size: int = 14, pretrained: bool | None = None
) -> SpatialEncoder:
    """The backbone ``name`` (``cnn`` | ``resnet18``; ``pretrained`` as in
    :func:`memrl.nn.backbones.make_backbone`) with an FPN neck fused to ``channels x size x size``.
    """
    if name not in SPATIAL_BACKBONES:
        raise ValueError(
            f"unknown spatial backbone {name!r}; expected one of {', '.join(SPATIAL_BACKBONES)}"
        )
    if channels < 1 or size < 1:
        raise ValueError(f"channels={channels}, size={size}; expected positive integers")
    base = make_backbone(name, pretrained, cnn_pool="avg")
    nodes, in_channels = _LEVELS[name]
    extractor = create_feature_extractor(base.net, return_nodes=nodes)
    input_size = RESNET_INPUT_SIZE if name == "resnet18" else None
    return SpatialEncoder(Backbone(extractor, 0, input_size), in_channels, channels, size)
