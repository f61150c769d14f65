"""Push demonstrations for spatial memory: frozen features computed once, labels, batches.

The HDF5 of `memrl push-collect` (``obs/image``, ``obs/state``, ``actions``, ``phase``), plus
three optional per-step keys of the seed's supervision: ``trust`` (float, the TrustMatrix weight
of the step; 1 when absent), ``recovery`` (bool, the RecoveryTag: the memory resets before the
step) and ``ood`` (bool, the OODTag, target of the auxiliary head).

Phase-boundary labels are aligned with observations: the dataset's ``phase[t]`` is the phase
*after* action t, so observation t was taken in phase ``s_t = phase[t-1]`` (``s_0`` = approach),
and a boundary happens at t when ``s_t != s_{t-1}`` -- what h_t, which has seen observation t,
can detect.

Features are computed once per run by the frozen encoder (in chunks, no graph) and held as one
float16 tensor (N, C, S, S) of raw encoder outputs, so an epoch never runs the encoder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from memrl.data import read_demos
from memrl.runs import ConfigError

REQUIRED = ("obs/image", "obs/state", "actions", "phase")


@dataclasses.dataclass
class SpatialDemos:
    """Demonstrations as flat tensors (N steps), with ``starts`` / ``lengths`` per episode."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    states: torch.Tensor  # (N, 3) gripper position: the ConditionVector's source
    actions: torch.Tensor  # (N, 3)
    boundary: torch.Tensor  # (N,) bool: a phase boundary at this observation
    trust: torch.Tensor  # (N,) float: TrustMatrix weight
    recovery: torch.Tensor  # (N,) bool: RecoveryTag
    ood: torch.Tensor | None  # (N,) bool: OODTag, None when the dataset has none
    starts: torch.Tensor
    lengths: torch.Tensor
    features: torch.Tensor | None = None  # (N, C, S, S) float16, after cache_features

    @classmethod
    def from_episodes(cls, episodes: list[dict]) -> SpatialDemos:
        lengths = torch.tensor([len(ep["actions"]) for ep in episodes])

        def cat(key: str, default: float | None = None, dtype=np.float32) -> np.ndarray | None:
            if key not in episodes[0]:
                return None if default is None else np.full(int(lengths.sum()), default, dtype)
            return np.concatenate([np.asarray(ep[key], dtype) for ep in episodes])

        ood = cat("ood", dtype=bool)
        return cls(
            images=torch.from_numpy(np.concatenate([ep["obs"]["image"] for ep in episodes]))
            .permute(0, 3, 1, 2)
            .contiguous(),
            states=torch.from_numpy(np.concatenate([ep["obs"]["state"] for ep in episodes])),
            actions=torch.from_numpy(np.concatenate([ep["actions"] for ep in episodes])),
            boundary=torch.from_numpy(
                np.concatenate([boundary_labels(ep["phase"]) for ep in episodes])
            ),
            trust=torch.from_numpy(cat("trust", 1.0)),
            recovery=torch.from_numpy(cat("recovery", False, bool)),
            ood=None if ood is None else torch.from_numpy(ood),
            starts=torch.cumsum(lengths, 0) - lengths,
            lengths=lengths,
        )

    def __len__(self) -> int:
        return len(self.lengths)

    @torch.no_grad()
    def cache_features(self, encoder: torch.nn.Module, device, chunk: int = 256) -> None:
        """Run the frozen encoder over every image once; keep the raw features in float16."""
        parts = [
            encoder(self.images[i : i + chunk].to(device)).to("cpu", torch.float16)
            for i in range(0, len(self.images), chunk)
        ]
        self.features = torch.cat(parts)

    def feature_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean map (C, S, S) and per-channel spread (C, 1, 1) of the cached features."""
        mean = torch.zeros(self.features.shape[1:])
        for i in range(0, len(self.features), 1024):
            mean += self.features[i : i + 1024].float().sum(0)
        mean /= len(self.features)
        var = torch.zeros(self.features.shape[1], 1, 1)
        for i in range(0, len(self.features), 1024):
            var += (self.features[i : i + 1024].float() - mean).pow(2).sum((0, 2, 3))[:, None, None]
        var /= len(self.features) * mean.shape[-1] * mean.shape[-2]
        return mean, var.sqrt().clamp(min=1e-4)

    def episodes(self, which: torch.Tensor) -> dict[str, torch.Tensor]:
        """Whole episodes padded time-major: every tensor (T, B, ...). ``valid`` marks real
        steps, ``has_next`` those whose next observation exists (dynamics targets), ``is_first``
        episode starts and RecoveryTags, ``index`` the flat step index."""
        T = int(self.lengths[which].max())
        steps = torch.arange(T)[:, None]  # (T, 1)
        valid = steps < self.lengths[which][None]  # (T, B)
        index = torch.where(valid, self.starts[which][None] + steps, self.starts[which][None])
        batch = self.frames(index)
        batch["valid"] = valid
        batch["has_next"] = steps + 1 < self.lengths[which][None]
        batch["is_first"] = (steps == 0) | batch["recovery"]
        batch["trust"] = batch["trust"] * valid
        batch["index"] = index
        return batch

    def frames(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-step tensors at flat ``index`` (any shape)."""
        batch = {
            "states": self.states[index],
            "actions": self.actions[index],
            "boundary": self.boundary[index],
            "trust": self.trust[index],
            "recovery": self.recovery[index],
        }
        if self.features is not None:
            batch["features"] = self.features[index]
        if self.ood is not None:
            batch["ood"] = self.ood[index]
        return batch

    def episode_batches(
        self, batch_size: int, order: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Episode indices per minibatch: all episodes in order, or the (shuffled) episodes
        ``order`` grouped by length (less padding), the groups in random order."""
        if order is None:
            return list(torch.arange(len(self)).split(batch_size))
        groups = []
        for chunk in order.split(4 * batch_size):
            chunk = chunk[torch.argsort(self.lengths[chunk])]
            groups += list(chunk.split(batch_size))
        return [groups[i] for i in torch.randperm(len(groups))]


def boundary_labels(phase: np.ndarray) -> np.ndarray:
    """Dataset phases (phase after each action) -> bool boundary at each observation."""
    observed = np.concatenate([[0], np.asarray(phase[:-1], dtype=np.int64)])  # s_t
    boundary = np.zeros(len(observed), dtype=bool)
    boundary[1:] = observed[1:] != observed[:-1]
    return boundary


def load_spatial_data(path: Path, val_fraction: float) -> tuple[SpatialDemos, SpatialDemos, dict]:
    """Training and held-out demonstrations (the last ``val_fraction``), and the attributes."""
    episodes, attrs = read_demos(path, required=REQUIRED)
    episodes = [ep for ep in episodes if len(ep["actions"]) > 0]
    if len(episodes) < 2:
        raise ConfigError(
            f"dataset {path} holds {len(episodes)} non-empty demonstration(s); need at least 2 "
            "(training and held-out)"
        )
    n_val = min(len(episodes) - 1, max(1, round(val_fraction * len(episodes))))
    train = SpatialDemos.from_episodes(episodes[:-n_val])
    return train, SpatialDemos.from_episodes(episodes[-n_val:]), attrs
