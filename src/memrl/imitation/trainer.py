"""What ``memrl bc`` and ``memrl act`` share: the options, the action coding and normalisation
of a policy, augmentation, and the training loop.

Data: the HDF5 written by ``memrl push-collect``, held in memory by :mod:`memrl.data` (an
:class:`~memrl.data.EpisodeStore`; the last ``val_fraction`` of the demonstrations are the
validation set). State statistics and the action scale come from the training demonstrations
and are saved with the model. AdamW (decoupled weight decay) with a cosine learning-rate decay
over the run, per epoch (the defaults, chosen by measurement: see the imitation page of the
docs); ``--optimizer adam --schedule plateau`` is the visuomotor imitation spec's Adam with L2
weight decay and ReduceLROnPlateau on the validation loss (patience ``--lr-patience``, 1%
relative threshold, factor 0.5). Optional random-shift augmentation.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from memrl.data import Batch, EpisodeStore, Statistics, load_episodes
from memrl.envs.push import saved_task
from memrl.imitation.codings import cartesian_to_spherical, decode_spherical, spherical_to_cartesian
from memrl.nn.augment import random_shift
from memrl.nn.losses import weighted_huber, weighted_mean
from memrl.runs import ConfigError, Run, RunOptions, distributed, save_checkpoint


@dataclasses.dataclass
class ImitationConfig(RunOptions):
    """Options every imitation trainer shares."""

    RESUME_FLAGS = (*RunOptions.RESUME_FLAGS, "epochs")

    dataset: Path = Path("data/push.hdf5")
    """HDF5 demonstrations written by `memrl push-collect`."""
    backbone: Literal["cnn", "resnet18", "vit_b_16"] = "cnn"
    """Vision backbone."""
    pretrained: bool | None = None
    """ImageNet weights from the local torch cache: None uses them when present."""
    cnn_pool: Literal["keypoints", "avg"] = "keypoints"
    """cnn backbone's pooling: spatial-softmax keypoints, or the spec's global average."""
    use_state: bool = False
    """Also feed the gripper position (normalised)."""
    use_spherical: bool = False
    """Predict (magnitude, theta, phi) instead of (dx, dy, dz)."""
    loss: Literal["huber", "l1"] = "huber"
    """huber: the spec's magnitude-weighted Huber loss; l1: the mean absolute error of the
    scaled Cartesian action (ACT's loss)."""
    epochs: int = 20
    """Passes over the training demonstrations."""
    batch_size: int = 64
    """Samples per minibatch."""
    lr: float = 1e-3
    """Learning rate (the peak of the cosine schedule)."""
    weight_decay: float = 1e-4
    """Weight decay: decoupled with adamw, an L2 term in the gradient with adam."""
    optimizer: Literal["adamw", "adam"] = "adamw"
    """adamw: decoupled weight decay; adam: L2 weight decay (the spec's)."""
    schedule: Literal["cosine", "plateau"] = "cosine"
    """cosine: the lr decays from --lr to 0 over --epochs (after --warmup-epochs); plateau:
    halved after --lr-patience epochs without a 1% better validation loss (the spec's)."""
    warmup_epochs: int = 0
    """cosine: epochs of linear warm-up from lr / (warmup + 1) to lr."""
    lr_patience: int | None = None
    """plateau: epochs without a 1% better validation loss before halving the lr (None: 2,
    the spec's)."""
    val_fraction: float = 0.1
    """Share of demonstrations held out for validation (at least one)."""
    augment: bool = True
    """Random-shift augmentation (pad 4 pixels, random crop) of training images."""
    bf16: bool = False
    """Train under bfloat16 autocast (weights, optimiser and loss stay float32); pays on CPUs
    with AMX or AVX-512 BF16 and on recent GPUs."""

    @staticmethod
    def upgrade_saved(data: dict) -> dict:
        """A config that names ``lr_patience`` but no ``schedule`` predates the cosine default
        (or means the plateau schedule): it trained with the spec's Adam and plateau."""
        if "lr_patience" in data and "schedule" not in data:
            return {"optimizer": "adam", "schedule": "plateau", **data}
        return data

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; expected a positive integer")
        if self.lr_patience is not None and (self.schedule != "plateau" or self.lr_patience < 1):
            raise ValueError(
                f"--lr-patience {self.lr_patience} with --schedule {self.schedule}; expected a "
                "positive integer, with --schedule plateau"
            )
        if self.warmup_epochs and self.schedule != "cosine":
            raise ValueError(
                f"--warmup-epochs {self.warmup_epochs} with --schedule {self.schedule}; expected "
                "--schedule cosine"
            )
        if self.loss == "l1" and self.use_spherical:
            raise ValueError("--loss l1 with --use-spherical; expected the Cartesian coding")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(
                f"warmup_epochs={self.warmup_epochs}; expected 0 <= warmup_epochs < epochs "
                f"({self.epochs})"
            )
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"lr={self.lr}, weight_decay={self.weight_decay}; expected > 0, >= 0")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction}; expected a value in (0, 1)")


class ImitationPolicy(nn.Module):
    """Action coding and normalisation statistics (saved with the weights) of a push policy."""

    def __init__(self, use_spherical: bool, loss: str = "huber") -> None:
        super().__init__()
        self.use_spherical, self.loss_kind = use_spherical, loss
        self.register_buffer("state_mean", torch.zeros(3))
        self.register_buffer("state_std", torch.ones(3))
        self.register_buffer("action_scale", torch.ones(3))

    def set_statistics(self, statistics: Statistics) -> None:
        self.state_mean.copy_(statistics.state_mean)
        self.state_std.copy_(statistics.state_std)
        self.action_scale.copy_(statistics.action_scale)

    def param_groups(self, cfg: ImitationConfig) -> list[dict]:
        """The optimiser's parameter groups: one, at ``cfg.lr``."""
        return [{"params": list(self.parameters()), "lr": cfg.lr}]

    def normalise_state(self, states: torch.Tensor) -> torch.Tensor:
        return (states - self.state_mean) / self.state_std

    def target(self, actions: torch.Tensor) -> torch.Tensor:
        """Expert actions in the coding the head is trained against."""
        if self.use_spherical:
            return cartesian_to_spherical(actions)
        return actions / self.action_scale

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        """Head outputs -> what the loss compares with :meth:`target`."""
        return decode_spherical(raw) if self.use_spherical else raw

    def loss(self, raw: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The loss of head outputs ``raw`` against the batch's expert actions over its valid
        steps: the magnitude-weighted Huber loss (the visuomotor imitation spec's), or with
        ``loss="l1"`` the mean absolute error per action component (ACT's)."""
        actions = batch.actions
        if self.loss_kind == "l1":
            per_step = (self.decode(raw) - self.target(actions)).abs().mean(-1)
            return weighted_mean(per_step, batch.valid)
        return weighted_huber(
            self.decode(raw), self.target(actions), actions, batch.valid, self.use_spherical
        )

    def to_action(self, raw: torch.Tensor) -> torch.Tensor:
        """Head outputs -> Cartesian env actions, clipped to [-1, 1]."""
        if self.use_spherical:
            return spherical_to_cartesian(decode_spherical(raw)).clamp(-1, 1)
        return (raw * self.action_scale).clamp(-1, 1)


def augment_images(images: torch.Tensor) -> torch.Tensor:
    """:func:`random_shift` on images of any leading shape (..., 3, H, W)."""
    return random_shift(images.flatten(0, -4)).view(images.shape)


def cosine_factor(epoch: int, epochs: int, warmup: int) -> float:
    """The cosine schedule's lr multiplier for ``epoch`` (0-based): linear warm-up over the
    first ``warmup`` epochs from 1 / (warmup + 1), then ``0.5 * (1 + cos(pi * k / n))`` over
    the ``n = epochs - warmup`` epochs after it (k = 0 at the first: the full lr)."""
    if epoch < warmup:
        return (epoch + 1) / (warmup + 1)
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


def make_optimizer(
    cfg: ImitationConfig, groups: list[dict]
) -> tuple[
    torch.optim.Optimizer,
    torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau,
]:
    """``cfg``'s optimiser over the parameter ``groups`` and its lr schedule, stepped once an
    epoch (the plateau schedule with the validation loss)."""
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = kind(groups, weight_decay=cfg.weight_decay)
    if cfg.schedule == "plateau":
        return optimizer, torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=0.5, patience=cfg.lr_patience or 2, threshold=0.01,
            threshold_mode="rel",
        )  # fmt: skip
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: cosine_factor(epoch, cfg.epochs, cfg.warmup_epochs)
    )


Loss = Callable[[ImitationPolicy, Batch, bool], torch.Tensor]
Batches = Callable[[EpisodeStore, "int | None"], Iterable[Batch]]


def train_imitation(
    kind: str,
    cfg: ImitationConfig,
    build: Callable[[], ImitationPolicy],
    loss_fn: Loss,
    batches: Batches,
) -> dict[str, float]:
    """Train ``build()``'s policy with ``loss_fn(policy, batch, augment)`` on ``batches(demos,
    epoch)`` (``epoch`` None for validation), validate every epoch, checkpoint; writes
    ``policy.pt`` and ``summary.json``. Under torchrun ``batch_size`` is per process."""
    run = Run(kind, cfg)
    run.check_budget(cfg.epochs, "--epochs")
    device = run.device
    split = load_episodes(cfg.dataset, cfg.val_fraction)
    try:
        task, _ = saved_task(split.attrs.get("task"), split.attrs["env_args"]["env_kwargs"])
    except ValueError as err:
        raise ConfigError(f"--dataset {cfg.dataset}: {err}") from None
    train, val = split.train, split.val
    policy = build()
    policy.set_statistics(train.statistics())
    policy.to(device)
    params = list(policy.parameters())
    optimizer, scheduler = make_optimizer(cfg, policy.param_groups(cfg))
    wall_before = 0.0  # training seconds of the run before a resume
    if (ckpt := run.restore()) is not None:
        policy.load_state_dict(ckpt["policy"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        wall_before = ckpt.get("wall_seconds", 0.0)
    wall_start = time.perf_counter()
    distributed.broadcast_parameters(policy)
    bar = run.progress(cfg.epochs, desc=f"{kind} epochs")
    figures: dict[str, float] = {}
    for epoch in range(run.start_step + 1, cfg.epochs + 1):
        policy.train()
        losses, start = [], time.perf_counter()
        for batch in batches(train, epoch):
            with torch.autocast(device.type, torch.bfloat16, enabled=cfg.bf16):
                loss = loss_fn(policy, batch.to(device), cfg.augment)
            run.check_finite(epoch, loss=loss)
            distributed.optimizer_step(optimizer, loss, params)
            losses.append(loss.item())
        seconds = time.perf_counter() - start
        policy.eval()
        val_sum = torch.zeros(2, dtype=torch.float64)  # (sum of loss x batch size, samples)
        with torch.no_grad():
            for batch in batches(val, None):
                loss = loss_fn(policy, batch.to(device), False).item()
                samples = batch.actions.shape[1]
                val_sum += torch.tensor([loss * samples, samples])
        val_sum = distributed.all_sum(val_sum)
        val_loss = float(val_sum[0] / val_sum[1])
        lr = optimizer.param_groups[-1]["lr"]  # this epoch's
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val_loss)
        else:
            scheduler.step()
        figures = run.log(
            epoch,
            {
                "train_loss": float(np.mean(losses)),
                "val_loss": val_loss,
                "lr": lr,
                "samples_per_s": train.num_steps / seconds,
            },
        )
        bar.set_postfix(train=f"{figures['train_loss']:.4f}", val=f"{val_loss:.4f}")
        bar.update(1)
        run.save(
            epoch,
            {
                "policy": policy.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "wall_seconds": wall_before + time.perf_counter() - wall_start,
            },
        )
    bar.close()
    summary = figures | {
        "epochs": cfg.epochs,
        "train_demos": len(train),
        "val_demos": len(val),
        "parameters": sum(p.numel() for p in policy.parameters()),
        "processes": run.world_size,
        "task": task,
        "wall_seconds": wall_before + time.perf_counter() - wall_start,
    }
    if not run.finish(summary):
        return summary
    save_checkpoint(
        run.dir / "policy.pt",
        {
            "kind": kind,
            "policy": policy.state_dict(),
            "env_kwargs": split.attrs["env_args"]["env_kwargs"],
            "task": task,
        },
    )
    print(
        f"{kind}[{cfg.backbone}]: val loss {figures.get('val_loss', float('nan')):.4f}; "
        f"run directory {run.dir}"
    )
    return summary
