"""``memrl bc``: visuomotor behaviour cloning on push demonstrations (seed 003).

``VisuomotorBCPolicy``: image -> backbone (cnn | resnet18 | vit_b_16) -> [+ normalised gripper
position] -> [GRU] -> MLP 512-512 (ReLU, dropout 0.3) -> 3 tanh outputs, read as a Cartesian
action or as spherical coordinates (``memrl.imitation.codings``).

With ``--use-gru`` the GRU is a real temporal model, unlike the seed's length-1 GRU: it is a
memrl core trained on whole demonstrations (padded into a time-major batch, ``is_first`` at
each start, loss masked past each end), and at evaluation its state is carried from step to
step and reset when an episode starts.

Data: the HDF5 written by ``memrl push-collect``; every image is held in memory as one uint8
tensor, so loading never waits on disk. The last ``val_fraction`` of the demonstrations are the
validation set. State statistics and the action scale (per-dimension maximum magnitude, so
scaled actions fill the tanh range) come from the training demonstrations and are saved with
the model. Adam (lr 1e-3, weight decay 1e-4), ReduceLROnPlateau on the validation loss
(patience 2, 1% relative threshold, factor 0.5); optional random-shift augmentation.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from memrl.cores import make_core
from memrl.cores.base import State
from memrl.data import read_demos
from memrl.imitation.codings import (
    cartesian_to_spherical,
    decode_spherical,
    spherical_to_cartesian,
    weighted_huber,
)
from memrl.nn.backbones import make_backbone
from memrl.runs import ConfigError, Run, RunOptions, save_checkpoint


@dataclasses.dataclass
class BCConfig(RunOptions):
    """Behaviour cloning of the push expert from images (seed 003)."""

    dataset: Path = Path("data/push.hdf5")
    """HDF5 demonstrations written by `memrl push-collect`."""
    backbone: Literal["cnn", "resnet18", "vit_b_16"] = "cnn"
    """Vision backbone."""
    pretrained: bool | None = None
    """ImageNet weights from the local torch cache: None uses them when present."""
    cnn_pool: Literal["keypoints", "avg"] = "keypoints"
    """cnn backbone's pooling: spatial-softmax keypoints, or the seed's global average."""
    use_state: bool = False
    """Also feed the gripper position (normalised)."""
    use_gru: bool = False
    """A GRU over time, trained on whole demonstrations, state carried through episodes."""
    use_spherical: bool = False
    """Predict (magnitude, theta, phi) instead of (dx, dy, dz)."""
    gru_size: int = 128
    """GRU hidden size."""
    epochs: int = 20
    """Passes over the training demonstrations."""
    batch_size: int = 64
    """Frames per minibatch (with --use-gru: about this many frames of whole demos)."""
    lr: float = 1e-3
    """Adam learning rate."""
    weight_decay: float = 1e-4
    """Adam weight decay."""
    lr_patience: int = 2
    """ReduceLROnPlateau: epochs without a 1% better validation loss before halving the lr."""
    val_fraction: float = 0.1
    """Share of demonstrations held out for validation (at least one)."""
    augment: bool = True
    """Random-shift augmentation (pad 4 pixels, random crop) of training images."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "gru_size", "lr_patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; expected a positive integer")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"lr={self.lr}, weight_decay={self.weight_decay}; expected > 0, >= 0")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction}; expected a value in (0, 1)")


class VisuomotorBCPolicy(nn.Module):
    """Seed 003's policy. ``forward(images (T, B, 3, H, W) uint8, states (T, B, 3), state,
    is_first (T, B))`` -> raw tanh outputs (T, B, 3) and the next recurrent state; without a
    GRU each step is independent and the state is empty."""

    def __init__(self, cfg: BCConfig) -> None:
        super().__init__()
        self.use_state, self.use_spherical = cfg.use_state, cfg.use_spherical
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
        # normalisation statistics, saved with the weights (set from the data before training)
        self.register_buffer("state_mean", torch.zeros(3))
        self.register_buffer("state_std", torch.ones(3))
        self.register_buffer("action_scale", torch.ones(3))

    def initial_state(self, batch_size: int, device=None) -> State:
        return () if self.core is None else self.core.initial_state(batch_size, device=device)

    def forward(self, images, states, state: State, is_first):
        T, B = images.shape[:2]
        features = self.backbone(images.flatten(0, 1)).view(T, B, -1)
        if self.use_state:
            features = torch.cat([features, (states - self.state_mean) / self.state_std], -1)
        if self.core is not None:
            features, state = self.core(features, state, is_first)
        return self.head(features), state

    def target(self, actions: torch.Tensor) -> torch.Tensor:
        """Expert actions in the coding the head is trained against."""
        if self.use_spherical:
            return cartesian_to_spherical(actions)
        return actions / self.action_scale

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        """Head outputs -> what the loss compares with :meth:`target`."""
        return decode_spherical(raw) if self.use_spherical else raw

    def to_action(self, raw: torch.Tensor) -> torch.Tensor:
        """Head outputs -> Cartesian env actions, clipped to [-1, 1]."""
        if self.use_spherical:
            return spherical_to_cartesian(decode_spherical(raw)).clamp(-1, 1)
        return (raw * self.action_scale).clamp(-1, 1)


@dataclasses.dataclass
class Demos:
    """Demonstrations as tensors: ``images`` (N, 3, H, W) uint8, ``states`` (N, 3), ``actions``
    (N, 3), and ``starts`` / ``lengths`` of each episode in the flat arrays."""

    images: torch.Tensor
    states: torch.Tensor
    actions: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def from_episodes(cls, episodes: list[dict]) -> Demos:
        lengths = torch.tensor([len(ep["actions"]) for ep in episodes])
        images = np.concatenate([ep["obs"]["image"] for ep in episodes])
        return cls(
            images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
            states=torch.from_numpy(np.concatenate([ep["obs"]["state"] for ep in episodes])),
            actions=torch.from_numpy(np.concatenate([ep["actions"] for ep in episodes])),
            starts=torch.cumsum(lengths, 0) - lengths,
            lengths=lengths,
        )

    def frames(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Single frames as length-1 sequences: (1, B, ...) each, and ``is_first`` (1, B)."""
        first = torch.ones(1, len(index), dtype=torch.bool)
        return self.images[index][None], self.states[index][None], self.actions[index][None], first

    def episodes(self, which: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Whole episodes, padded time-major: (T, B, ...) each, ``is_first`` and ``valid``."""
        T = int(self.lengths[which].max())
        steps = torch.arange(T)[:, None]  # (T, 1)
        valid = steps < self.lengths[which][None]  # (T, B)
        index = torch.where(valid, self.starts[which][None] + steps, self.starts[which][None])
        is_first = (steps == 0).expand_as(valid)
        return self.images[index], self.states[index], self.actions[index], is_first, valid


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


def load_bc_data(cfg: BCConfig) -> tuple[Demos, Demos, dict]:
    """Train and validation demonstrations, and the dataset's attributes."""
    episodes, attrs = read_demos(cfg.dataset, required=("obs/image", "obs/state", "actions"))
    if len(episodes) < 2:
        raise ConfigError(
            f"dataset {cfg.dataset} holds {len(episodes)} demonstration(s); need at least 2 "
            "(training and validation)"
        )
    n_val = max(1, round(cfg.val_fraction * len(episodes)))
    return Demos.from_episodes(episodes[:-n_val]), Demos.from_episodes(episodes[-n_val:]), attrs


def bc_loss(policy: VisuomotorBCPolicy, batch, augment: bool, device) -> torch.Tensor:
    images, states, actions, is_first, *valid = (x.to(device) for x in batch)
    if augment:
        images = random_shift(images.flatten(0, 1)).view(images.shape)
    raw, _ = policy(images, states, policy.initial_state(images.shape[1], device), is_first)
    mask = valid[0] if valid else None
    return weighted_huber(
        policy.decode(raw), policy.target(actions), actions, policy.use_spherical, mask
    )


def _batches(cfg: BCConfig, demos: Demos, shuffle: bool):
    """Minibatches of frames, or with a GRU of whole episodes (about batch_size frames)."""
    if cfg.use_gru:
        per_batch = max(1, round(cfg.batch_size / float(demos.lengths.float().mean())))
        order = torch.randperm(len(demos.lengths)) if shuffle else torch.arange(len(demos.lengths))
        return [demos.episodes(order[i : i + per_batch]) for i in range(0, len(order), per_batch)]
    order = torch.randperm(len(demos.actions)) if shuffle else torch.arange(len(demos.actions))
    return [
        demos.frames(order[i : i + cfg.batch_size]) for i in range(0, len(order), cfg.batch_size)
    ]


def train_bc(cfg: BCConfig) -> dict[str, float]:
    """Train, validate every epoch, checkpoint; writes ``policy.pt`` and ``summary.json``."""
    run = Run("bc", cfg)
    device = run.device
    train, val, attrs = load_bc_data(cfg)
    policy = VisuomotorBCPolicy(cfg).to(device)
    policy.state_mean.copy_(train.states.mean(0))
    policy.state_std.copy_(train.states.std(0).clamp(min=1e-3))
    policy.action_scale.copy_(train.actions.abs().amax(0).clamp(min=1e-3))
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode="min",
        factor=0.5,
        patience=cfg.lr_patience,
        threshold=0.01,
        threshold_mode="rel",
    )
    if (ckpt := run.restore()) is not None:
        policy.load_state_dict(ckpt["policy"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
    bar = run.progress(cfg.epochs, desc="bc epochs")
    figures: dict[str, float] = {}
    for epoch in range(run.start_step + 1, cfg.epochs + 1):
        policy.train()
        losses, start = [], time.perf_counter()
        for batch in _batches(cfg, train, shuffle=True):
            loss = bc_loss(policy, batch, cfg.augment, device)
            run.check_finite(epoch, loss=loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        seconds = time.perf_counter() - start
        policy.eval()
        with torch.no_grad():
            val_losses = [
                bc_loss(policy, b, False, device).item() for b in _batches(cfg, val, False)
            ]
        val_loss = float(np.mean(val_losses))
        scheduler.step(val_loss)
        figures = {
            "train_loss": float(np.mean(losses)),
            "val_loss": val_loss,
            "lr": optimizer.param_groups[0]["lr"],
            "samples_per_s": len(train.actions) / seconds,
        }
        run.log(epoch, figures)
        bar.set_postfix(train=f"{figures['train_loss']:.4f}", val=f"{val_loss:.4f}")
        bar.update(1)
        run.save(
            epoch,
            {
                "policy": policy.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
            },
        )
    bar.close()
    save_checkpoint(
        run.dir / "policy.pt",
        {
            "kind": "bc",
            "policy": policy.state_dict(),
            "env_kwargs": attrs["env_args"]["env_kwargs"],
        },
    )
    summary = figures | {
        "epochs": cfg.epochs,
        "train_demos": len(train.lengths),
        "val_demos": len(val.lengths),
    }
    (run.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    run.finish()
    print(
        f"bc[{cfg.backbone}]: val loss {figures.get('val_loss', float('nan')):.4f}; "
        f"run directory {run.dir}"
    )
    return summary
