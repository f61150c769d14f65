"""Push demonstrations for spatial memory: frozen features computed once, labels, batches.

The HDF5 of `memrl push-collect` (``obs/image``, ``obs/state``, ``actions``, ``phase``), plus
three optional per-step keys of the spatial-memory spec's supervision: ``trust`` (float, the
TrustMatrix weight of the step; 1 when absent), ``recovery`` (bool, the RecoveryTag: the memory
resets before the step) and ``ood`` (bool, the OODTag, target of the auxiliary head). Episodes
are loaded and split by :func:`memrl.data.load_episodes` (``REQUIRED`` keys).

Phase-boundary labels are aligned with observations: the dataset's ``phase[t]`` is the phase
*after* action t, so observation t was taken in phase ``s_t = phase[t-1]`` (``s_0`` = approach),
and a boundary happens at t when ``s_t != s_{t-1}`` -- what h_t, which has seen observation t,
can detect.

Features are computed once per run by the frozen encoder (in chunks, no graph) and held as one
float16 tensor (N, C, S, S) of raw encoder outputs in place of the images, so an epoch never
runs the encoder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from memrl.data import Batch, EpisodeStore

REQUIRED = ("obs/image", "obs/state", "actions", "phase")


@dataclasses.dataclass(kw_only=True)
class SpatialBatch(Batch):
    """A :class:`~memrl.data.Batch` with what spatial memory trains on, (T, B, ...) each;
    ``is_first`` also marks RecoveryTags, ``images`` is None (``features`` stand for them)."""

    features: torch.Tensor  # (T, B, C, S, S) float16: raw frozen encoder outputs
    boundary: torch.Tensor  # (T, B) bool: a phase boundary at this observation
    trust: torch.Tensor  # (T, B) float: TrustMatrix weight, 0 on padding
    ood: torch.Tensor | None = None  # (T, B) bool: OODTag, None when the dataset has none
    memory: torch.Tensor | None = None  # (T, B, K, S, S) float16: phase B's cached memory maps

    @property
    def has_next(self) -> torch.Tensor:
        """(T, B) bool: the step's next observation exists (a dynamics target)."""
        return torch.cat([self.valid[1:], torch.zeros_like(self.valid[:1])])


@dataclasses.dataclass
class SpatialDemos:
    """Demonstrations (an :class:`~memrl.data.EpisodeStore` whose images are replaced by
    ``features``) and their per-step labels, (N, ...) each."""

    store: EpisodeStore
    features: torch.Tensor  # (N, C, S, S) float16
    boundary: torch.Tensor  # (N,) bool
    trust: torch.Tensor  # (N,) float
    recovery: torch.Tensor  # (N,) bool
    ood: torch.Tensor | None  # (N,) bool, None when the dataset has none

    @classmethod
    @torch.no_grad()
    def encode(
        cls,
        store: EpisodeStore,
        encoder: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device | str,
        chunk: int = 256,
    ) -> SpatialDemos:
        """Run the frozen ``encoder`` over every image of ``store`` once (on ``device``, in
        chunks); keep its raw features in float16 instead of the images, and the labels."""
        parts = [
            encoder(store.images[i : i + chunk].to(device)).to("cpu", torch.float16)
            for i in range(0, store.num_steps, chunk)
        ]
        extras, n = store.extras, store.num_steps
        phases = extras["phase"].numpy().astype(np.int64)
        boundary = [boundary_labels(p) for p in np.split(phases, store.starts[1:].numpy())]
        return cls(
            store=dataclasses.replace(store, images=None),
            features=torch.cat(parts),
            boundary=torch.from_numpy(np.concatenate(boundary)),
            trust=extras["trust"].float() if "trust" in extras else torch.ones(n),
            recovery=extras["recovery"].bool()
            if "recovery" in extras
            else torch.zeros(n, dtype=bool),
            ood=extras["ood"].bool() if "ood" in extras else None,
        )

    def __len__(self) -> int:
        """Episodes held."""
        return len(self.store)

    def feature_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean map (C, S, S) and per-channel spread (C, 1, 1) of the features."""
        mean = torch.zeros(self.features.shape[1:])
        for i in range(0, len(self.features), 1024):
            mean += self.features[i : i + 1024].float().sum(0)
        mean /= len(self.features)
        var = torch.zeros(self.features.shape[1], 1, 1)
        for i in range(0, len(self.features), 1024):
            var += (self.features[i : i + 1024].float() - mean).pow(2).sum((0, 2, 3))[:, None, None]
        var /= len(self.features) * mean.shape[-1] * mean.shape[-2]
        return mean, var.sqrt().clamp(min=1e-4)

    def episodes(self, which: torch.Tensor) -> SpatialBatch:
        """Episodes ``which`` (B,) whole, padded time-major (:meth:`EpisodeStore.episodes`)."""
        return self._labelled(self.store.episodes(which))

    def frames(self, index: torch.Tensor) -> SpatialBatch:
        """Steps ``index`` (B,) as length-1 sequences (:meth:`EpisodeStore.frames`)."""
        return self._labelled(self.store.frames(index))

    def episode_batches(
        self, batch_size: int, order: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Episode indices per minibatch: all episodes in order, or the (shuffled) episodes
        ``order`` grouped by length (less padding), the groups in random order."""
        if order is None:
            return list(torch.arange(len(self)).split(batch_size))
        groups = []
        for chunk in order.split(4 * batch_size):
            chunk = chunk[torch.argsort(self.store.lengths[chunk])]
            groups += list(chunk.split(batch_size))
        return [groups[i] for i in torch.randperm(len(groups))]

    def _labelled(self, batch: Batch) -> SpatialBatch:
        index = batch.index
        trust = self.trust[index]
        common = vars(batch) | {"is_first": batch.is_first | self.recovery[index]}
        return SpatialBatch(
            **common,
            features=self.features[index],
            boundary=self.boundary[index],
            trust=trust if batch.valid is None else trust * batch.valid,
            ood=None if self.ood is None else self.ood[index],
        )


def boundary_labels(phase: np.ndarray) -> np.ndarray:
    """Dataset phases (phase after each action) -> bool boundary at each observation."""
    observed = np.concatenate([[0], np.asarray(phase[:-1], dtype=np.int64)])  # s_t
    boundary = np.zeros(len(observed), dtype=bool)
    boundary[1:] = observed[1:] != observed[:-1]
    return boundary
