"""Demonstrations in memory: one episode store and one batch type for the pipelines that learn
from recorded episodes (imitation, spatial memory).

:func:`load_episodes` reads a dataset (:mod:`memrl.data.hdf5`) and holds out its last episodes.
An :class:`EpisodeStore` lays episodes flat -- step t of episode e is row ``starts[e] + t`` of
every array, images as one uint8 tensor so that a batch never waits on disk -- and cuts
time-major :class:`Batch` es from it: single frames, whole episodes padded to the longest, or
windows of past observations and the actions ahead of a frame.

>>> split = load_episodes("data/push.hdf5", val_fraction=0.1)
>>> batch = split.train.episodes(torch.tensor([0, 1])).to(device)  # (T, B, ...) each
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from memrl.data.hdf5 import DatasetError, read_demos

STORE_KEYS = ("obs/image", "obs/state", "actions")  # what an EpisodeStore reads


@dataclasses.dataclass
class Batch:
    """A time-major minibatch. ``images``, ``states``, ``is_first`` and ``index`` run over the
    observation steps (T, B, ...); ``actions`` and ``valid`` over the action steps: the same T
    for frames and whole episodes, the steps ahead for :meth:`EpisodeStore.windows`."""

    images: torch.Tensor | None  # (T, B, 3, H, W) uint8; None where a pipeline keeps features
    states: torch.Tensor  # (T, B, state_dim) float32
    actions: torch.Tensor  # (T_a, B, action_dim) float32
    is_first: torch.Tensor  # (T, B) bool: an episode starts here, a memory resets before it
    valid: torch.Tensor | None = None  # (T_a, B) bool: a real step, not padding; None: all are
    index: torch.Tensor | None = None  # (T, B) row of each observation in its store

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with every tensor on ``device``."""
        moved = {
            field.name: value.to(device)
            for field in dataclasses.fields(self)
            if isinstance(value := getattr(self, field.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


@dataclasses.dataclass
class Statistics:
    """Per-dimension statistics of a store's states and actions, for a model to normalise with
    (and save): ``action_scale`` is the largest magnitude of each action dimension, so that
    scaled actions fill the tanh range."""

    state_mean: torch.Tensor  # (state_dim,)
    state_std: torch.Tensor  # (state_dim,), at least 1e-3
    action_scale: torch.Tensor  # (action_dim,), at least 1e-3


@dataclasses.dataclass
class EpisodeStore:
    """Episodes laid flat, N steps in all: every per-step tensor has N rows, episode e's at
    ``starts[e] : starts[e] + lengths[e]``."""

    images: torch.Tensor | None  # (N, 3, H, W) uint8; None where a pipeline keeps features
    states: torch.Tensor  # (N, state_dim) float32
    actions: torch.Tensor  # (N, action_dim) float32
    starts: torch.Tensor  # (E,) int64
    lengths: torch.Tensor  # (E,) int64
    extras: dict[str, torch.Tensor]  # the episodes' other per-step arrays by key, (N, ...) each

    @classmethod
    def from_episodes(cls, episodes: Sequence[dict[str, Any]]) -> EpisodeStore:
        """Episodes as :func:`~memrl.data.read_demos` returns them: ``obs/image`` (n, H, W, 3)
        uint8, ``obs/state``, ``actions`` and any other per-step arrays (``extras``)."""
        if not episodes:
            raise ValueError("EpisodeStore.from_episodes: no episodes; expected at least one")
        lengths = torch.tensor([len(ep["actions"]) for ep in episodes])

        def cat(arrays) -> torch.Tensor:
            return torch.from_numpy(np.concatenate(list(arrays)))

        other = [
            key for key, value in episodes[0].items() if key not in ("obs", "actions", "attrs")
        ]
        return cls(
            images=cat(ep["obs"]["image"] for ep in episodes).permute(0, 3, 1, 2).contiguous(),
            states=cat(ep["obs"]["state"] for ep in episodes),
            actions=cat(ep["actions"] for ep in episodes),
            starts=torch.cumsum(lengths, 0) - lengths,
            lengths=lengths,
            extras={key: cat(ep[key] for ep in episodes) for key in other},
        )

    def __len__(self) -> int:
        """Episodes held."""
        return len(self.lengths)

    @property
    def num_steps(self) -> int:
        return len(self.actions)

    def statistics(self) -> Statistics:
        return Statistics(
            state_mean=self.states.mean(0),
            state_std=self.states.std(0).clamp(min=1e-3),
            action_scale=self.actions.abs().amax(0).clamp(min=1e-3),
        )

    def frames(self, index: torch.Tensor) -> Batch:
        """Rows ``index`` (B,) as length-1 sequences: (1, B, ...) each, every one a first step."""
        index = index[None]  # (1, B)
        return self._gather(index, self.actions[index], torch.ones_like(index, dtype=torch.bool))

    def episodes(self, which: torch.Tensor) -> Batch:
        """Episodes ``which`` (B,) whole, padded to the longest: (T, B, ...) each, ``is_first``
        at t = 0, ``valid`` false past each episode's end (padding repeats its first step)."""
        steps = torch.arange(int(self.lengths[which].max()))[:, None]  # (T, 1)
        valid = steps < self.lengths[which][None]  # (T, B)
        index = torch.where(valid, self.starts[which][None] + steps, self.starts[which][None])
        return self._gather(index, self.actions[index], (steps == 0).expand_as(valid), valid)

    def windows(self, index: torch.Tensor, history: int, ahead: int) -> Batch:
        """For frames ``index`` (B,): the ``history`` observations ending there, (history, B,
        ...), the episode's first frame standing in for those before it (``is_first`` on it and
        its copies); the ``ahead`` actions from there, (ahead, B, action_dim), ``valid`` false
        past the episode's end (the last action repeated)."""
        episode = torch.searchsorted(self.starts, index, right=True) - 1  # (B,)
        start, end = self.starts[episode], self.starts[episode] + self.lengths[episode]
        past = index[None] + torch.arange(1 - history, 1)[:, None]  # (history, B)
        upcoming = index[None] + torch.arange(ahead)[:, None]  # (ahead, B)
        seen = past.clamp(min=start[None])
        valid = upcoming < end[None]
        actions = self.actions[torch.minimum(upcoming, end[None] - 1)]
        return self._gather(seen, actions, seen == start[None], valid)

    def _gather(
        self,
        index: torch.Tensor,
        actions: torch.Tensor,
        is_first: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> Batch:
        return Batch(
            images=None if self.images is None else self.images[index],
            states=self.states[index],
            actions=actions,
            is_first=is_first,
            valid=valid,
            index=index,
        )


@dataclasses.dataclass
class EpisodeSplit:
    """A dataset's training and held-out episodes and its attributes."""

    train: EpisodeStore
    val: EpisodeStore
    attrs: dict[str, Any]


def load_episodes(
    path: str | os.PathLike,
    val_fraction: float,
    required: Sequence[str] = STORE_KEYS,
) -> EpisodeSplit:
    """The non-empty episodes of ``path``, the last ``val_fraction`` of them (at least one, at
    most all but one) held out. Raises :class:`DatasetError` for fewer than two, or a file that
    :func:`~memrl.data.read_demos` rejects (``required`` keys missing, ...)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}; expected a value in (0, 1)")
    episodes, attrs = read_demos(path, required=required)
    episodes = [ep for ep in episodes if len(ep["actions"]) > 0]
    if len(episodes) < 2:
        raise DatasetError(
            f"dataset {path} holds {len(episodes)} non-empty demonstration(s); need at least 2 "
            "(training and held-out)"
        )
    n_val = min(len(episodes) - 1, max(1, round(val_fraction * len(episodes))))
    return EpisodeSplit(
        train=EpisodeStore.from_episodes(episodes[:-n_val]),
        val=EpisodeStore.from_episodes(episodes[-n_val:]),
        attrs=attrs,
    )
