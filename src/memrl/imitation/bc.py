"""``memrl bc``: visuomotor behaviour cloning on push demonstrations (the visuomotor imitation
spec).

``VisuomotorBCPolicy``: image -> backbone (cnn | resnet18 | vit_b_16) -> [+ normalised gripper
position] -> [the last K frames' features side by side] -> [GRU] -> MLP 512-512 (ReLU,
dropout 0.3) -> 3 tanh outputs, read as a Cartesian action or as spherical coordinates
(``memrl.imitation.codings``).

With ``--use-gru`` the GRU is a real temporal model, unlike the spec's length-1 GRU: it is a
memrl core trained on whole demonstrations (padded into a time-major batch, ``is_first`` at
each start, loss masked past each end), and at evaluation its state is carried from step to
step and reset when an episode starts. ``--frame-stack K`` gives a fixed window of memory
instead: the features of the current frame and the K - 1 before it (the window is the
policy's state at evaluation; trained on whole demonstrations too). Data, normalisation,
optimiser and schedule: :mod:`memrl.imitation.trainer`.
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

    epochs: int = 200
    """Passes over the training demonstrations (the spec's plateau schedule stops gaining
    after about 20; the cosine schedule's success keeps rising to 200)."""
    use_gru: bool = False
    """A GRU over time, trained on whole demonstrations, state carried through episodes."""
    gru_size: int = 128
    """GRU hidden size."""
    frame_stack: int = 1
    """Frames the policy sees at once: the current one and the K - 1 before it (each through
    the backbone, features concatenated; an episode's first frame stands in for earlier ones)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gru_size < 1 or self.frame_stack < 1:
            raise ValueError(
                f"gru_size={self.gru_size}, frame_stack={self.frame_stack}; expected positive "
                "integers"
            )

    @property
    def sequences(self) -> bool:
        """Trained on whole demonstrations (a GRU or a frame stack looks back in time)."""
        return self.use_gru or self.frame_stack > 1


class FrameStack(nn.Module):
    """The last ``k`` steps' features side by side, oldest first: ``forward(x (T, B, D), state,
    is_first (T, B))`` -> ((T, B, k * D), state), the state being the ``k - 1`` features before
    (B, k - 1, D). At an episode's first step the window is filled with that step's features,
    so a stack never reaches into the previous episode."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def initial_state(self, batch_size: int, width: int, device=None) -> tuple[torch.Tensor]:
        return (torch.zeros(batch_size, self.k - 1, width, device=device),)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor], is_first: torch.Tensor):
        (window,) = state
        outputs = []
        for t in range(x.shape[0]):
            current = x[t][:, None]  # (B, 1, D)
            fresh = is_first[t][:, None, None]
            window = torch.where(fresh, current.expand_as(window), window)
            stacked = torch.cat([window, current], 1)  # (B, k, D)
            outputs.append(stacked.flatten(1))
            window = stacked[:, 1:]
        return torch.stack(outputs), (window,)


class VisuomotorBCPolicy(ImitationPolicy):
    """The visuomotor imitation spec's policy. ``forward(images (T, B, 3, H, W) uint8, states
    (T, B, 3), state, is_first (T, B))`` -> raw tanh outputs (T, B, 3) and the next recurrent
    state; without a GRU each step is independent and the state is empty."""

    def __init__(self, cfg: BCConfig) -> None:
        super().__init__(cfg.use_spherical, cfg.loss)
        self.use_state = cfg.use_state
        self.backbone = make_backbone(cfg.backbone, cfg.pretrained, cfg.cnn_pool)
        self.frame_width = self.backbone.feature_dim + (3 if cfg.use_state else 0)
        self.stack = FrameStack(cfg.frame_stack) if cfg.frame_stack > 1 else None
        width = self.frame_width * cfg.frame_stack
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
        """The frame stack's window (if any), then the GRU's state (if any)."""
        window = () if self.stack is None else self.stack.initial_state(
            batch_size, self.frame_width, device
        )  # fmt: skip
        core = () if self.core is None else self.core.initial_state(batch_size, device=device)
        return (*window, *core)

    def forward(self, images, states, state: State, is_first):
        T, B = images.shape[:2]
        features = self.backbone(images.flatten(0, 1)).view(T, B, -1)
        if self.use_state:
            features = torch.cat([features, self.normalise_state(states)], -1)
        window, core_state = (), tuple(state)
        if self.stack is not None:
            features, window = self.stack(features.float(), core_state[:1], is_first)
            core_state = core_state[1:]
        if self.core is not None:
            features, core_state = self.core(features, core_state, is_first)
        return self.head(features).float(), (*window, *core_state)


def bc_loss(policy: VisuomotorBCPolicy, batch: Batch, augment: bool) -> torch.Tensor:
    """Magnitude-weighted Huber loss over the batch's valid steps."""
    images = augment_images(batch.images) if augment else batch.images
    state = policy.initial_state(images.shape[1], images.device)
    raw, _ = policy(images, batch.states, state, batch.is_first)
    return policy.loss(raw, batch)


def bc_batches(cfg: BCConfig, demos: EpisodeStore, epoch: int | None) -> list[Batch]:
    """This process's minibatches of frames, or with a GRU or a frame stack of whole episodes
    (about batch_size frames), for training ``epoch`` (shuffled by seed and epoch) or
    validation (None)."""
    if cfg.sequences:
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
