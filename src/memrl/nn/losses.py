"""Losses shared by the imitation and spatial-memory pipelines."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weighted_mean(per_step: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``sum w_t l_t / sum w_t`` (the spatial-memory spec's TrustMatrix; a bool mask is 0/1
    weights, 0 on padding); the plain mean without weights."""
    if weights is None:
        return per_step.mean()
    weights = weights.to(per_step.dtype)
    return (per_step * weights).sum() / weights.sum().clamp(min=1e-8)


def huber_per_step(
    prediction: torch.Tensor, target: torch.Tensor, expert: torch.Tensor, spherical: bool = False
) -> torch.Tensor:
    """The visuomotor imitation spec's loss per sample: Huber (delta 1) per component averaged,
    times ``1 + 2 ||expert||`` (``expert`` the Cartesian action). With ``spherical`` the azimuth
    difference (last component) is wrapped to [-pi, pi]: phi = pi and -pi are one direction."""
    diff = prediction - target
    if spherical:
        wrapped = torch.atan2(torch.sin(diff[..., 2]), torch.cos(diff[..., 2]))
        diff = torch.cat([diff[..., :2], wrapped.unsqueeze(-1)], -1)
    per_step = F.huber_loss(diff, torch.zeros_like(diff), reduction="none").mean(-1)
    return per_step * (1.0 + 2.0 * expert.norm(dim=-1))


def weighted_huber(
    prediction: torch.Tensor,
    target: torch.Tensor,
    expert: torch.Tensor,
    weights: torch.Tensor | None = None,
    spherical: bool = False,
) -> torch.Tensor:
    """The :func:`weighted_mean` of :func:`huber_per_step`; ``weights`` (...) or a bool mask of
    the valid samples."""
    return weighted_mean(huber_per_step(prediction, target, expert, spherical), weights)
