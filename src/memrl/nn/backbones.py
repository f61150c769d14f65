"""Vision backbones shared by the imitation and spatial-memory pipelines (the
visuomotor imitation spec).

``make_backbone(name)`` returns a module mapping images ``(N, 3, H, W)`` — uint8 in [0, 255] or
float in [0, 1] — to features ``(N, D)``, with ImageNet normalisation inside:

- ``cnn``: the imitation spec's four convolutions (32x21x21 -> 64x11x11 -> 64x11x11 ->
  64x11x11 for an 84 x 84 input) with ReLU, then a spatial softmax (each channel's expected
  x, y): D = 128.
  The spec's global average pooling (``cnn_pool="avg"``, D = 64) throws away where the block
  and the gripper are — measured: BC's training loss did not move in 30 epochs with it.
- ``resnet18``: torchvision's ResNet-18 without its classifier: D = 512.
- ``vit_b_16``: torchvision's ViT-B/16, the [CLS] token: D = 768. Images are resized to 224 x 224
  when ImageNet weights are loaded (the size their position embeddings know), else to 96 x 96
  (36 patches: the same model, 14x less compute).

Pretrained weights (``pretrained=True``) come only from the local torch hub cache
(``torch.hub.get_dir()/checkpoints``); when they are absent the error says where to put them —
never a download that hangs on a machine without internet. ``pretrained=None`` uses them when
present.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

BACKBONES = ("cnn", "resnet18", "vit_b_16")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """Normalise (uint8 or [0, 1] float, then ImageNet statistics), resize if needed, extract."""

    def __init__(self, net: nn.Module, feature_dim: int, input_size: int | None = None) -> None:
        super().__init__()
        self.net, self.feature_dim, self.input_size = net, feature_dim, input_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images have shape {tuple(images.shape)}; expected (N, 3, H, W)")
        x = images.float() / 255 if images.dtype == torch.uint8 else images
        if self.input_size is not None and x.shape[-1] != self.input_size:
            size = (self.input_size, self.input_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.net((x - self.mean) / self.std)


class SpatialSoftmax(nn.Module):
    """Expected (x, y) image coordinates of each channel's softmax over pixels (Levine et al.
    2016; robomimic's default pooling): (N, C, H, W) -> (N, 2C), keeping *where* things are."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C, H, W = x.shape
        weights = x.flatten(2).softmax(-1).view(N, C, H, W)
        ys = torch.linspace(-1, 1, H, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1, 1, W, device=x.device, dtype=x.dtype)
        return torch.cat([(weights.sum(2) * xs).sum(-1), (weights.sum(3) * ys).sum(-1)], 1)


def _cnn(pool: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 32, 8, stride=4, padding=2),  # 84 -> 21
        nn.ReLU(),
        nn.Conv2d(32, 64, 4, stride=2, padding=2),  # 21 -> 11
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        *((nn.AdaptiveAvgPool2d(1), nn.Flatten()) if pool == "avg" else (SpatialSoftmax(),)),
    )


def cached_weights(name: str) -> Path:
    """Where the ImageNet weights of ``name`` must lie in the local torch hub cache."""
    weights = {
        "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
        "vit_b_16": torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1,
    }[name]
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def make_backbone(
    name: str, pretrained: bool | None = None, cnn_pool: str = "keypoints"
) -> Backbone:
    """A backbone by name (module docstring); ``pretrained`` True / False / None (if cached);
    ``cnn_pool`` "keypoints" (spatial softmax, D = 128) or "avg" (the spec's, D = 64)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
    if name == "cnn":
        if pretrained:
            raise ValueError("backbone 'cnn' has no pretrained weights; drop --pretrained")
        if cnn_pool not in ("keypoints", "avg"):
            raise ValueError(f"cnn_pool={cnn_pool!r}; expected 'keypoints' or 'avg'")
        return Backbone(_cnn(cnn_pool), 64 if cnn_pool == "avg" else 128)
    path = cached_weights(name)
    use = path.is_file() if pretrained is None else pretrained
    if use and not path.is_file():
        raise FileNotFoundError(
            f"pretrained {name} weights are not in the local torch cache: expected {path} "
            f"(download {path.name} from download.pytorch.org/models on a machine with "
            "internet and copy it there, or train without --pretrained)"
        )
    if name == "resnet18":
        net = torchvision.models.resnet18()
        net.fc = nn.Identity()
        dim, size = 512, None
    else:
        size = 224 if use else 96
        net = torchvision.models.vit_b_16(image_size=size)
        net.heads = nn.Identity()
        dim = 768
    if use:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith(("fc.", "heads."))}
        net.load_state_dict(state, strict=False)
    return Backbone(net, dim, size)
