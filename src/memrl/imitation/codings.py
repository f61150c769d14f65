"""Action codings of the visuomotor imitation spec: Cartesian, or spherical.

Spherical: ``(dx, dy, dz) -> (magnitude, theta, phi)`` with theta the angle from +z in [0, pi]
and phi the azimuth in [-pi, pi]; the magnitude is clamped to >= 1e-4 so the angles stay
defined. A policy's three tanh outputs ``r`` in [-1, 1] decode as ``theta = (r1 + 1) pi / 2``,
``phi = r2 pi`` (the spec's) and ``magnitude = (r0 + 1) sqrt(3) / 2``, not the spec's
``sigmoid(r0)``: that can only express magnitudes in [0.27, 0.73], while an action in [-1, 1]^3
has any magnitude in [0, sqrt(3)] (the expert's range from 0 to over 1).
"""

from __future__ import annotations

import math

import torch

MIN_MAGNITUDE = 1e-4
MAX_MAGNITUDE = math.sqrt(3.0)


def cartesian_to_spherical(actions: torch.Tensor) -> torch.Tensor:
    """(..., 3) Cartesian -> (..., 3) = (magnitude, theta, phi)."""
    dx, dy, dz = actions.unbind(-1)
    magnitude = actions.norm(dim=-1).clamp(min=MIN_MAGNITUDE)
    theta = torch.acos((dz / magnitude).clamp(-1.0, 1.0))
    phi = torch.atan2(dy, dx)
    return torch.stack([magnitude, theta, phi], -1)


def spherical_to_cartesian(spherical: torch.Tensor) -> torch.Tensor:
    """(..., 3) = (magnitude, theta, phi) -> (..., 3) Cartesian."""
    magnitude, theta, phi = spherical.unbind(-1)
    return torch.stack(
        [
            magnitude * torch.sin(theta) * torch.cos(phi),
            magnitude * torch.sin(theta) * torch.sin(phi),
            magnitude * torch.cos(theta),
        ],
        -1,
    )


def decode_spherical(raw: torch.Tensor) -> torch.Tensor:
    """A policy's tanh outputs (..., 3) in [-1, 1] -> (magnitude, theta, phi)."""
    r0, r1, r2 = raw.unbind(-1)
    return torch.stack([(r0 + 1) * MAX_MAGNITUDE / 2, (r1 + 1) * math.pi / 2, r2 * math.pi], -1)
