"""``memrl bc``: visuomotor behaviour cloning on push demonstrations (the visuomotor imitation
spec).

``VisuomotorBCPolicy``: image -> backbone (cnn | resnet18 | vit_b_16) -> [+ normalised gripper
position] -> [GRU] -> MLP 512-512 (ReLU, dropout 0.3) -> 3 tanh outputs, read as a Cartesian
action or as spherical coordinates (``memrl.imitation.codings``).

With ``--use-gru`` the GRU is a real temporal model, unlike the spec's length-1 GRU: it is a
memrl core trained on whole demonstrations (padded into a time-major batch, ``is_first`` at
each start, loss masked past each end), and at evaluation its state is carried from step to
step and reset when an episode starts. Data, normalisation, optimiser and schedule:
:mod:`memrl.imitation.trainer`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from memrl.cores import make_core
from memrl.cores.base import State
from memrl.data import Batch, EpisodeStore
from memrl.imitation.trainer import (
    ImitationConfig,
    ImitationPolicy,
    augment_images,
    train_imitation,
)
from memrl.nn.backbones import make_backbone
from memrl.runs import distributed


@dataclasses.dataclass
class BCConfig(ImitationConfig):
    """Behaviour cloning of the push expert from images (the visuomotor imitation spec)."""

    use_gru: bool = False
    """A GRU over time, trained on whole demonstrations, state carried through episodes."""
    gru_size: int = 128
    """GRU hidden size."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gru_size < 1:
            raise ValueError(f"gru_size={self.gru_size}; expected a positive integer")


class VisuomotorBCPolicy(ImitationPolicy):
    """The visuomotor imitation spec's policy. ``forward(images (T, B, 3, H, W) uint8, states
    (T, B, 3), state, is_first (T, B))`` -> raw tanh outputs (T, B, 3) and the next recurrent
    state; without a GRU each step is independent and the state is empty."""

    def __init__(self, cfg: BCConfig) -> None:
        super().__init__(cfg.use_spherical)
        self.use_state = cfg.use_state
        self.backbone = make_backbone(cfg.backbone, cfg.pretrained, cfg.cnn_pool)
        width = self.backbone.feature_dim + (3 if cfg.use_state else 0)
        self.core = (
            make_core("gru", input_size=width, hidden_size=cfg.gru_size) if cfg.use_gru else None
        )
        self.head = nn.Sequential(
            nn.Linear(cfg.gru_size if cfg.use_gru else width, 512),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(512, 3),
            nn.Tanh(),
        )

    def initial_state(self, batch_size: int, device=None) -> State:
        return () if self.core is None else self.core.initial_state(batch_size, device=device)

    def forward(self, images, states, state: State, is_first):
        T, B = images.shape[:2]
        features = self.backbone(images.flatten(0, 1)).view(T, B, -1)
        if self.use_state:
            features = torch.cat([features, self.normalise_state(states)], -1)
        if self.core is not None:
            features, state = self.core(features, state, is_first)
        return self.head(features).float(), state


def bc_loss(policy: VisuomotorBCPolicy, batch: Batch, augment: bool) -> torch.Tensor:
    """Magnitude-weighted Huber loss over the batch's valid steps."""
    images = augment_images(batch.images) if augment else batch.images
    state = policy.initial_state(images.shape[1], images.device)
    raw, _ = policy(images, batch.states, state, batch.is_first)
    return policy.loss(raw, batch)


def bc_batches(cfg: BCConfig, demos: EpisodeStore, epoch: int | None) -> list[Batch]:
    """This process's minibatches of frames, or with a GRU of whole episodes (about batch_size
    frames), for training ``epoch`` (shuffled by seed and epoch) or validation (None)."""
    if cfg.use_gru:
        per_batch = max(1, round(cfg.batch_size / float(demos.lengths.float().mean())))
        order = distributed.shard_indices(len(demos), epoch, cfg.seed)
        return [demos.episodes(order[i : i + per_batch]) for i in range(0, len(order), per_batch)]
    order = distributed.shard_indices(demos.num_steps, epoch, cfg.seed)
    return [
        demos.frames(order[i : i + cfg.batch_size]) for i in range(0, len(order), cfg.batch_size)
    ]


def train_bc(cfg: BCConfig) -> dict[str, float]:
    """Train, validate every epoch, checkpoint; writes ``policy.pt`` and ``summary.json``."""
    return train_imitation(
        "bc",
        cfg,
        lambda: VisuomotorBCPolicy(cfg),
        bc_loss,
        lambda demos, epoch: bc_batches(cfg, demos, epoch),
    )
