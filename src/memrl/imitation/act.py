"""``memrl act``: Action Chunking with Transformers on push demonstrations (the visuomotor
imitation spec).

``ACTPolicy``: each of the last ``obs_horizon`` images -> backbone -> Linear(D, d_model)
[+ Linear(3, d_model) of the normalised gripper position] + sinusoidal positions -> transformer
encoder (4 layers, 8 heads); ``chunk_size`` learnable action queries -> transformer decoder
(4 layers, 8 heads, cross-attending to the encoded observations) -> MLP 512-2048-1024-3
(ReLU, dropout; ``--head-widths``) with tanh: a chunk of the next ``chunk_size`` actions.
Trained with the spec's magnitude-weighted Huber loss over the chunk (steps past the
demonstration's end masked out; ``--loss l1`` for ACT's own).

At evaluation (``memrl imitation-eval``) the policy is queried every ``chunk_size`` steps and its
chunk executed open loop, or with ``--temporal-ensemble`` queried every step, and the action of
step t is the average of every prediction made for t, weighted ``exp(-m * i)`` with i = 0 the
oldest prediction (ACT's temporal ensembling; beyond the spec).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

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
class ACTConfig(ImitationConfig):
    """Action Chunking with Transformers on the push task (the visuomotor imitation spec)."""

    chunk_size: int = 10
    """Actions predicted per query."""
    obs_horizon: int = 1
    """Observations (the current one and those before it) the encoder sees."""
    d_model: int = 512
    """Transformer width."""
    heads: int = 8
    """Attention heads."""
    encoder_layers: int = 4
    """Transformer encoder layers."""
    decoder_layers: int = 4
    """Transformer decoder layers."""
    feedforward: int = 1024
    """Width of each transformer layer's feed-forward block."""
    dropout: float = 0.1
    """Dropout in the transformer and the action head."""
    head_widths: tuple[int, ...] = (2048, 1024)
    """Hidden widths of the action head's MLP (the spec's 2048, 1024; none: one Linear, as
    the ACT paper's)."""
    lr: float = 1e-4
    """Adam learning rate of the transformer and heads (at BC's 1e-3 ACT does not learn)."""
    backbone_lr: float = 1e-3
    """Adam learning rate of the vision backbone (at 1e-4 it learns too slowly)."""
    bf16: bool = True
    """Train under bfloat16 autocast (weights, optimiser and loss stay float32); pays on CPUs
    with AMX or AVX-512 BF16 and on recent GPUs."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.backbone_lr > 0:
            raise ValueError(f"backbone_lr={self.backbone_lr}; expected > 0")
        for name in ("chunk_size", "obs_horizon", "d_model", "heads", "feedforward"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; expected a positive integer")
        if any(w < 1 for w in self.head_widths):
            raise ValueError(f"head_widths={self.head_widths}; expected positive integers")
        if self.encoder_layers < 1 or self.decoder_layers < 1:
            raise ValueError(
                f"encoder_layers={self.encoder_layers}, decoder_layers={self.decoder_layers}; "
                "expected positive integers"
            )
        if self.d_model % (2 * self.heads):
            raise ValueError(
                f"d_model={self.d_model}; expected a multiple of 2 * heads = {2 * self.heads}"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout}; expected a value in [0, 1)")


def sinusoidal_positions(length: int, width: int) -> torch.Tensor:
    """Vaswani et al. (2017), section 3.5: (length, width)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, width, 2) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table


class ACTPolicy(ImitationPolicy):
    """The visuomotor imitation spec's ACT. ``forward(images (horizon, B, 3, H, W) uint8,
    states (horizon, B, 3))`` -> raw tanh outputs (chunk_size, B, 3), time-major like every
    memrl sequence."""

    def __init__(self, cfg: ACTConfig) -> None:
        super().__init__(cfg.use_spherical, cfg.loss)
        self.use_state, self.chunk_size, self.obs_horizon = (
            cfg.use_state,
            cfg.chunk_size,
            cfg.obs_horizon,
        )
        self.backbone = make_backbone(cfg.backbone, cfg.pretrained, cfg.cnn_pool)
        d = cfg.d_model
        self.visual = nn.Linear(self.backbone.feature_dim, d)
        self.proprio = nn.Linear(3, d) if cfg.use_state else None
        self.register_buffer("positions", sinusoidal_positions(cfg.obs_horizon, d))
        layer = dict(
            d_model=d,
            nhead=cfg.heads,
            dim_feedforward=cfg.feedforward,
            dropout=cfg.dropout,
            batch_first=True,
        )
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(**layer), cfg.encoder_layers, enable_nested_tensor=False
        )
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(**layer), cfg.decoder_layers
        )
        self.queries = nn.Parameter(torch.randn(cfg.chunk_size, d) * 0.02)
        layers, width = [], d
        for hidden in cfg.head_widths:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(cfg.dropout)]
            width = hidden
        self.head = nn.Sequential(*layers, nn.Linear(width, 3), nn.Tanh())

    def param_groups(self, cfg: ACTConfig) -> list[dict]:
        """The backbone at ``backbone_lr``, the rest at ``lr`` (as ACT's original code)."""
        backbone = list(self.backbone.parameters())
        ids = {id(p) for p in backbone}
        rest = [p for p in self.parameters() if id(p) not in ids]
        return [{"params": backbone, "lr": cfg.backbone_lr}, {"params": rest, "lr": cfg.lr}]

    def forward(self, images: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        horizon, B = images.shape[:2]
        if horizon != self.obs_horizon:
            raise ValueError(f"got {horizon} observations; this policy takes {self.obs_horizon}")
        tokens = self.visual(self.backbone(images.flatten(0, 1)).view(horizon, B, -1))
        if self.proprio is not None:
            tokens = tokens + self.proprio(self.normalise_state(states))
        tokens = tokens.transpose(0, 1) + self.positions  # (B, horizon, d)
        memory = self.encoder(tokens)
        decoded = self.decoder(self.queries.expand(B, -1, -1), memory)  # (B, chunk, d)
        return self.head(decoded).transpose(0, 1).float()


def act_loss(policy: ACTPolicy, batch: Batch, augment: bool) -> torch.Tensor:
    """Magnitude-weighted Huber loss over each chunk's steps within the demonstration."""
    images = augment_images(batch.images) if augment else batch.images
    raw = policy(images, batch.states)
    return policy.loss(raw, batch)


def act_batches(cfg: ACTConfig, demos: EpisodeStore, epoch: int | None) -> list[Batch]:
    """This process's minibatches of (observation history, action chunk) samples, one per
    frame, for training ``epoch`` (shuffled by seed and epoch) or validation (None)."""
    order = distributed.shard_indices(demos.num_steps, epoch, cfg.seed)
    return [
        demos.windows(order[i : i + cfg.batch_size], cfg.obs_horizon, cfg.chunk_size)
        for i in range(0, len(order), cfg.batch_size)
    ]


def train_act(cfg: ACTConfig) -> dict[str, float]:
    """Train, validate every epoch, checkpoint; writes ``policy.pt`` and ``summary.json``."""
    return train_imitation(
        "act",
        cfg,
        lambda: ACTPolicy(cfg),
        act_loss,
        lambda demos, epoch: act_batches(cfg, demos, epoch),
    )
