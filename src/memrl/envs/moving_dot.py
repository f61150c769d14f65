"""A moving-dot world with velocity control and occlusion (the RSSM spec's data, vectorised).

A Gaussian dot moves on an ``H x W`` grid. At every step the action ``a_t = (ax, ay)`` in
``[-1, 1]^2`` changes the velocity, the dot moves, and it bounces off the borders (reflecting
boundaries). Optional occluding rectangles, fixed per sequence and invisible (their pixels are
background), hide the dot while its state goes on: the world is partially observable.

Convention: ``actions[t]`` is the action that leads *into* frame ``t``:
``state_t = f(state_{t-1}, a_t)`` and ``obs_t = render(state_t)``.

>>> batch = generate_moving_dot_sequences(MovingDotConfig(), batch_size=8, generator=g)
>>> batch["obs"].shape, batch["actions"].shape, batch["states"].shape
((8, 64, 1, 32, 32), (8, 64, 2), (8, 64, 4))
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.data import Dataset


@dataclasses.dataclass
class MovingDotConfig:
    """Data generation settings of the moving-dot world."""

    grid_size: int = 32
    """Image height and width H = W, in pixels."""
    seq_len: int = 64
    """Frames per sequence T."""
    dot_sigma: float = 1.5
    """Standard deviation of the Gaussian dot, in pixels (peak intensity 1)."""
    max_speed: float = 2.0
    """Velocity components are clipped to [-max_speed, max_speed] pixels per step."""
    action_scale: float = 0.5
    """Velocity change per unit action: v_t = clip(v_{t-1} + action_scale * a_t)."""
    use_occlusion: bool = True
    """Add invisible occluding rectangles that hide the dot (partial observability)."""
    max_occluders: int = 2
    """Each sequence gets 1..max_occluders rectangles."""
    occluder_size: tuple[int, int] = (6, 12)
    """Side lengths of a rectangle are drawn uniformly from this range of pixels."""

    def __post_init__(self) -> None:
        if self.grid_size < 8:
            raise ValueError(f"grid_size={self.grid_size}; expected at least 8")
        if self.seq_len < 1:
            raise ValueError(f"seq_len={self.seq_len}; expected a positive integer")
        if not self.dot_sigma > 0 or not self.max_speed > 0 or not self.action_scale >= 0:
            raise ValueError("dot_sigma and max_speed must be positive, action_scale >= 0")
        lo, hi = self.occluder_size
        if self.max_occluders < 1 or not 1 <= lo <= hi <= self.grid_size:
            raise ValueError(
                f"occluder_size={self.occluder_size}, max_occluders={self.max_occluders}; "
                f"expected 1 <= low <= high <= grid_size and at least one occluder"
            )


def _reflect(position: torch.Tensor, velocity: torch.Tensor, limit: float):
    """Bounce off [0, limit]: mirror the overshoot and flip the velocity component."""
    low, high = position < 0, position > limit
    position = torch.where(low, -position, torch.where(high, 2 * limit - position, position))
    velocity = torch.where(low | high, -velocity, velocity)
    return position.clamp(0, limit), velocity


def render_dots(positions: torch.Tensor, grid_size: int, sigma: float) -> torch.Tensor:
    """Gaussian dots at ``positions`` (..., 2) = (x, y) -> images (..., H, W) in [0, 1]."""
    coords = torch.arange(grid_size, dtype=positions.dtype, device=positions.device)
    dx = coords - positions[..., 0, None]  # (..., W)
    dy = coords - positions[..., 1, None]  # (..., H)
    scale = -0.5 / sigma**2
    return (
        torch.exp(scale * dy.square())[..., :, None] * torch.exp(scale * dx.square())[..., None, :]
    )


def generate_moving_dot_sequences(
    config: MovingDotConfig, batch_size: int, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """``batch_size`` sequences: ``obs`` (B, T, 1, H, W) float in [0, 1], ``actions`` (B, T, 2),
    ``states`` (B, T, 4) = (x, y, vx, vy) in pixels, ``visible`` (B, T) bool (the dot's centre
    is outside every occluder) and ``is_first`` (B, T) bool (true at t = 0)."""
    B, T, S = batch_size, config.seq_len, config.grid_size
    g = generator
    limit = float(S - 1)
    position = 2 + torch.rand(B, 2, generator=g) * (limit - 4)  # (B, 2)
    velocity = (torch.rand(B, 2, generator=g) * 2 - 1) * config.max_speed / 2
    actions = torch.rand(B, T, 2, generator=g) * 2 - 1  # (B, T, 2)
    states = torch.empty(B, T, 4)
    for t in range(T):  # the dynamics; rendering below is one vectorised call
        velocity = (velocity + config.action_scale * actions[:, t]).clamp(
            -config.max_speed, config.max_speed
        )
        position, velocity = _reflect(position + velocity, velocity, limit)
        states[:, t, :2], states[:, t, 2:] = position, velocity
    obs = render_dots(states[..., :2], S, config.dot_sigma)  # (B, T, H, W)

    hidden = torch.zeros(B, S, S, dtype=torch.bool)  # occluded pixels
    if config.use_occlusion:
        lo, hi = config.occluder_size
        k = config.max_occluders
        count = torch.randint(1, k + 1, (B, 1), generator=g)
        size = torch.randint(lo, hi + 1, (B, k, 2), generator=g)  # (w, h) per rectangle
        corner = (torch.rand(B, k, 2, generator=g) * (S - size + 1)).long()  # (x0, y0)
        coords = torch.arange(S)
        inside_x = (coords >= corner[..., 0, None]) & (coords < (corner + size)[..., 0, None])
        inside_y = (coords >= corner[..., 1, None]) & (coords < (corner + size)[..., 1, None])
        rect = inside_y[..., :, None] & inside_x[..., None, :]  # (B, k, H, W)
        used = torch.arange(k) < count  # (B, k)
        hidden = (rect & used[..., None, None]).any(1)  # (B, H, W)
        obs = obs * (~hidden)[:, None].to(obs.dtype)
    centre = states[..., :2].round().long().clamp(0, S - 1)  # (B, T, 2)
    visible = ~hidden[torch.arange(B)[:, None], centre[..., 1], centre[..., 0]]  # (B, T)
    is_first = torch.zeros(B, T, dtype=torch.bool)
    is_first[:, 0] = True
    return {
        "obs": obs.unsqueeze(2),
        "actions": actions,
        "states": states,
        "visible": visible,
        "is_first": is_first,
    }


class MovingDotDataset(Dataset):
    """``num_sequences`` sequences generated once from ``seed`` (same seed, same data)."""

    def __init__(self, config: MovingDotConfig, num_sequences: int, seed: int = 0) -> None:
        if num_sequences < 1:
            raise ValueError(f"num_sequences={num_sequences}; expected a positive integer")
        generator = torch.Generator().manual_seed(seed)
        self.config = config
        self.data = generate_moving_dot_sequences(config, num_sequences, generator)

    def __len__(self) -> int:
        return self.data["obs"].shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.data.items()}


def collate_moving_dot(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a list of dataset items into a batch (batch dimension first)."""
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}
