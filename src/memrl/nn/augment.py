"""Image augmentation shared by the visuomotor pipelines (imitation, spatial pretraining)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_shift(images: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """DrQ's augmentation: replicate-pad by ``pad`` pixels, crop back at a random offset per
    image. ``images`` (N, 3, H, W) uint8."""
    N, _, H, W = images.shape
    padded = F.pad(images.float(), (pad,) * 4, mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (N,))
    dy = torch.randint(0, 2 * pad + 1, (N,))
    rows = (dy[:, None] + torch.arange(H))[:, None, :, None].expand(N, 3, H, W + 2 * pad)
    cropped = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(W))[:, None, None, :].expand(N, 3, H, W)
    return cropped.gather(3, cols).to(images.dtype)
