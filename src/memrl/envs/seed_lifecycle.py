"""The Tamiyo recurrence spec's morphogenetic task: a controller grafts "seeds" into a host
network while it trains.

One step = one training epoch of a real host: a small CNN classifier (three 3x3 conv blocks of
8, 16, 16 channels, 3.7k parameters; Adam, lr 1e-2, batches of 256) on scikit-learn's bundled
digits (8x8, 1,297 train / 500 validation images; the default) or CIFAR-10 from disk
(``dataset="cifar10", data_dir=...``; never downloaded). Cost on one CPU thread (measured on a
loaded 2-core machine, CPU seconds per 25-epoch episode): 0.75 s for the host alone, about 2 s
for masked random play, 1.5 (norm) to 4 s (attention) with a seed alive all episode long.
Training runs on one torch thread (restored afterwards) with autograd enabled even under the
caller's ``torch.inference_mode``; an episode is deterministic given the reset seed.
25 epochs an episode; the episode then *terminates* (the epoch budget is part of the task and
the epoch is in the observation, so there is no truncation to bootstrap).

Seeds. The host has ``num_slots`` slots, one after each conv block; a slot holds at most one
seed, a residual module from a blueprint (``BLUEPRINTS``: norm, depthwise, conv_light,
conv_heavy, attention), whose output is ``seed(h) = h + branch(h)`` with the branch's last layer
zero-initialised. The slot's output is ``lerp(h, seed(h), alpha)``. Lifecycle of a seed:

  DORMANT --GERMINATE--> GERMINATED --1 epoch--> TRAINING --3 epochs--> BLENDING
  BLENDING --alpha 1/3, 2/3, 1 over 3 epochs--> PROBATIONARY --FOSSILIZE--> FOSSILIZED (for good)
  TRAINING / BLENDING / PROBATIONARY --CULL (age >= 2)--> CULLED (removed, slot free again)
  PROBATIONARY for 5 epochs without a decision --> CULLED (timeout)

The agent's action applies first, then the automatic transitions (by the epochs completed in
the stage; the defaults are the constructor's), then the epoch trains; so the agent sees every
stage, and five observations in PROBATIONARY to decide.
  * GERMINATED: the seed is built in the first free slot; nothing trains it for one epoch.
  * TRAINING: alpha = 0, so the host's forward never calls the seed: the host's output and its
    gradients are exactly those of the host alone. The seed learns on a local target: the task
    loss of ``rest_of_host(seed(h.detach()))``, with gradients taken for the seed's parameters
    only (``torch.autograd.grad``), so nothing reaches the host.
  * BLENDING / PROBATIONARY / FOSSILIZED: the seed is part of the forward pass and trains
    jointly with the host on the task loss (its own Adam optimiser).
One seed is in its lifecycle at a time (the "active" seed); fossilised seeds keep their slots.

Actions: a dual head, ``MultiDiscrete([4, len(blueprints)])`` = (operation, blueprint), the
operations being WAIT, GERMINATE, FOSSILIZE, CULL; the blueprint only matters for GERMINATE.
``info["action_mask"]`` is one bool array of ``4 + len(blueprints)`` entries: the operation
head's mask then the blueprint head's (the form memrl.rl's ``action_mask_tensor`` accepts and
that a gymnasium vector env stacks into ``(N, 4 + len(blueprints))``). GERMINATE needs no active
seed and a free slot; FOSSILIZE needs the active seed in PROBATIONARY; CULL needs it in
TRAINING, BLENDING or PROBATIONARY and at least ``min_cull_age`` epochs old. A masked action
that is taken anyway (e.g. a random one) acts as WAIT, sets ``info["invalid_action"]`` and pays
the ``invalid`` term.

Counterfactual contribution of the active seed, measured after every epoch: validation
accuracy with the seed at its alpha (at alpha = 1 in TRAINING, i.e. what it would add) minus
validation accuracy with its alpha forced to 0. The controller sees it; the reward does not pay
it (see below).

Observation (``obs_mode``; ``feature_names`` lists the slots by name):
  "spec" (default, 26 features) what the Tamiyo recurrence spec's MLP controller has at one
         epoch: the epoch; train and validation loss and accuracy and their one-step deltas;
         the active seed's stage (one-hot), age, alpha, blueprint (one-hot), current
         contribution and parameters; free slots, fossilised slots and parameters added. Every
         feature is a function of the current epoch and the one before: trends, plateaus and a
         seed's history are left for the policy's memory to infer.
  "rich" (36 features, those of earlier versions in their order) "spec" plus the history
         ``HISTORY_FEATURES``: validation accuracy and loss of the 3 epochs before, the best
         validation accuracy so far, the plateau length, the one-step change of the seed's
         contribution and the culls so far.

Reward: the sum of the terms in ``info["reward_terms"]``, with the weights of ``RewardWeights``
(defaults 1, 0.1, 0.01, 0.1; accuracies as fractions in [0, 1]):
  progress  ``progress * (val_acc - previous val_acc)``: the epoch's change in the host's
            validation accuracy. Over an episode it sums to the final accuracy minus the
            untrained host's, so the return is the host's gain, paid as it happens: a seed's
            worth shows when it blends in and stays in the final accuracy if it is kept, and
            removing one (cull or timeout) shows as whatever the host loses with it.
  rent      ``-rent * live seed parameters / host parameters / max_epochs`` every epoch: a seed
            as large as the host, kept the whole episode, costs ``rent`` of accuracy.
  trial     ``-trial`` per GERMINATE: a trial must be worth more than ``trial`` of accuracy, so
            germinate-then-cull loops and trials left to time out cost what they do not earn.
  invalid   ``-invalid`` when a masked action was taken (then treated as WAIT).
Why not pay the counterfactual contribution: once a seed is in the host's forward pass the host
co-adapts to it, and removing it measures that co-adaptation more than what the seed adds. Paid
every epoch on trial, it made cycling trials to timeout (no seed ever kept) earn more than twice
what fossilising earned, although fossilising ends with the more accurate host; paid once at
fossilisation, it pays double for a seed held to the end of its probation rather than
fossilised at once, for a slightly less accurate host. Nor stage shaping: with gamma < 1 its
undiscounted sum charges seeds for being held, fossils most, by several times the accuracy gap
between fossilising and cycling.

``reward_terms`` and ``observation_features`` (of an ``EpochReport``) read plain numbers only,
so that one host or a batch of hosts can share them.

At the last step ``info["episode"]`` holds the episode's statistics: final validation accuracy,
parameters added, germinations, fossilisations, agent culls, culls of seeds whose contribution
was <= 0 when culled (cull precision = culls_harmful / culls) and timeouts.
"""

from __future__ import annotations

import contextlib
import enum
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from torch import nn
from torch.nn import functional as F


class Stage(enum.IntEnum):
    DORMANT = 0
    GERMINATED = 1
    TRAINING = 2
    BLENDING = 3
    PROBATIONARY = 4
    FOSSILIZED = 5
    CULLED = 6


class Op(enum.IntEnum):
    WAIT = 0
    GERMINATE = 1
    FOSSILIZE = 2
    CULL = 3


_CULLABLE = (Stage.TRAINING, Stage.BLENDING, Stage.PROBATIONARY)


class _Residual(nn.Module):
    """``h + branch(h)``; the branch's last layer starts at zero, so a new seed is the identity."""

    def __init__(self, branch: nn.Module, last: nn.Module) -> None:
        super().__init__()
        self.branch = branch
        for p in last.parameters():
            nn.init.zeros_(p)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.branch(h)


class _SpatialAttention(nn.Module):
    """Single-head self-attention of every position of a (B, C, H, W) map over a 4x4 average-
    pooled summary of the map (at most 16 keys: cheap enough for an epoch on one CPU thread)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.query = nn.Conv2d(channels, channels, 1)
        self.key_value = nn.Conv2d(channels, 2 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, c, height, width = h.shape
        q = self.query(h).flatten(2).transpose(1, 2)  # (B, H*W, C)
        summary = F.adaptive_avg_pool2d(h, (min(height, 4), min(width, 4)))
        k, v = self.key_value(summary).flatten(2).transpose(1, 2).chunk(2, dim=-1)  # (B, <=16, C)
        weights = torch.softmax(q @ k.transpose(1, 2) / c**0.5, dim=-1)  # (B, H*W, <=16)
        return self.out((weights @ v).transpose(1, 2).reshape(b, c, height, width))


def _norm(c: int) -> nn.Module:
    branch = nn.BatchNorm2d(c)
    return _Residual(branch, branch)


def _depthwise(c: int) -> nn.Module:
    last = nn.Conv2d(c, c, 1)
    return _Residual(nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.ReLU(), last), last)


def _conv_light(c: int) -> nn.Module:
    last = nn.Conv2d(max(c // 2, 1), c, 1)
    return _Residual(
        nn.Sequential(nn.Conv2d(c, max(c // 2, 1), 3, padding=1), nn.ReLU(), last), last
    )


def _conv_heavy(c: int) -> nn.Module:
    last = nn.Conv2d(c, c, 3, padding=1)
    return _Residual(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), last), last)


def _attention(c: int) -> nn.Module:
    branch = _SpatialAttention(c)
    return _Residual(branch, branch.out)


BLUEPRINTS: dict[str, Callable[[int], nn.Module]] = {
    "norm": _norm,
    "depthwise": _depthwise,
    "conv_light": _conv_light,
    "conv_heavy": _conv_heavy,
    "attention": _attention,
}


class SeedSlot(nn.Module):
    """A place for one seed between two host blocks: ``lerp(h, seed(h), alpha)``; the seed is
    not called at all while alpha is 0 (no seed, GERMINATED, TRAINING)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.register_module("seed", None)
        self.alpha = 0.0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.seed is None or self.alpha == 0.0:
            return h
        return torch.lerp(h, self.seed(h), self.alpha)


class HostNet(nn.Module):
    """Three conv blocks, a slot after each, global average pooling and a linear classifier."""

    def __init__(
        self, in_channels: int, num_classes: int, widths: tuple[int, ...], strides: tuple[int, ...]
    ) -> None:
        super().__init__()
        blocks, previous = [], in_channels
        for width, stride in zip(widths, strides, strict=True):
            blocks.append(nn.Sequential(nn.Conv2d(previous, width, 3, stride, 1), nn.ReLU()))
            previous = width
        self.blocks = nn.ModuleList(blocks)
        self.slots = nn.ModuleList(SeedSlot(w) for w in widths)
        self.head = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor, capture: int | None = None):
        """Logits (B, classes); with ``capture`` k also the input of slot k."""
        h, captured = x, None
        for k, (block, slot) in enumerate(zip(self.blocks, self.slots, strict=True)):
            h = block(h)
            if k == capture:
                captured = h
            h = slot(h)
        logits = self.head(h.mean((2, 3)))
        return logits if capture is None else (logits, captured)

    def forward_after(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Logits from the output of slot k onwards (blocks and slots k+1..)."""
        for block, slot in zip(self.blocks[k + 1 :], self.slots[k + 1 :], strict=True):
            h = slot(block(h))
        return self.head(h.mean((2, 3)))

    def host_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.blocks.parameters()
        yield from self.head.parameters()


@dataclass
class Seed:
    """The active or a fossilised seed: where it is and how far it has come."""

    slot: int
    blueprint: int
    module: nn.Module
    optimizer: torch.optim.Optimizer
    num_params: int
    stage: Stage = Stage.GERMINATED
    age: int = 0
    epochs_in_stage: int = 0
    contribution: float = 0.0


@dataclass(frozen=True)
class RewardWeights:
    """Weights of the reward terms (see the module docstring), in units of validation accuracy."""

    progress: float = 1.0
    rent: float = 0.1
    trial: float = 0.01
    invalid: float = 0.1


def reward_terms(
    weights: RewardWeights,
    val_acc: float,
    previous_val_acc: float,
    params_ratio: float,
    max_epochs: int,
    germinated: bool,
    invalid: bool,
) -> dict[str, float]:
    """One epoch's reward terms (their sum is the reward). ``params_ratio``: parameters of the
    live seeds after the epoch over the host's; ``germinated``: the epoch began with a GERMINATE;
    ``invalid``: a masked action was taken."""
    return {
        "progress": weights.progress * (val_acc - previous_val_acc),
        "rent": -weights.rent * params_ratio / max_epochs,
        "trial": -weights.trial if germinated else 0.0,
        "invalid": -weights.invalid if invalid else 0.0,
    }


OBS_MODES = ("spec", "rich")
_STAGE_NAMES = ("none", "germinated", "training", "blending", "probationary")  # Stage 0..4
HISTORY_FEATURES = (
    "val_acc_prev1", "val_acc_prev2", "val_acc_prev3",
    "val_loss_prev1", "val_loss_prev2", "val_loss_prev3",
    "best_val_acc", "plateau_fraction", "seed_contribution_delta_x10", "culls_fraction",
)  # fmt: skip
"""The features of ``obs_mode="rich"`` that ``"spec"`` leaves out: history over several epochs."""


def feature_names(obs_mode: str, blueprints: tuple[str, ...]) -> tuple[str, ...]:
    """The observation's slots, by name, for ``obs_mode`` "spec" or "rich"."""
    if obs_mode not in OBS_MODES:
        raise ValueError(f"obs_mode={obs_mode!r}; expected 'spec' or 'rich'")
    rich = (
        "epoch_fraction",
        "train_loss", "train_acc", "val_loss", "val_acc",
        "train_loss_delta", "train_acc_delta_x10", "val_loss_delta", "val_acc_delta_x10",
        "val_acc_prev1", "val_acc_prev2", "val_acc_prev3",
        "val_loss_prev1", "val_loss_prev2", "val_loss_prev3",
        "best_val_acc", "plateau_fraction",
        *(f"seed_stage_{s}" for s in _STAGE_NAMES),
        "seed_age_fraction", "seed_alpha", "seed_contribution_x10",
        "seed_contribution_delta_x10", "seed_params_ratio",
        *(f"seed_blueprint_{b}" for b in blueprints),
        "free_slots_fraction", "fossilized_fraction", "params_added_ratio",
        "culls_fraction",
    )  # fmt: skip
    return rich if obs_mode == "rich" else tuple(n for n in rich if n not in HISTORY_FEATURES)


@dataclass(frozen=True)
class EpochReport:
    """One host after an epoch, in plain numbers: what the observation is made of. The last six
    fields are the multi-epoch history that only ``obs_mode="rich"`` shows."""

    epoch_fraction: float
    metrics: dict[str, float]  # train_loss, train_acc, val_loss, val_acc after this epoch
    previous: dict[str, float]  # the same after the epoch before
    seed_stage: Stage  # of the active seed; DORMANT when there is none
    seed_age_fraction: float
    seed_alpha: float
    seed_contribution: float
    seed_params_ratio: float
    seed_blueprint: int  # index into the blueprints; -1 when there is no active seed
    free_slots_fraction: float
    fossilized_fraction: float
    params_added_ratio: float
    val_acc_history: tuple[float, ...]  # the 3 epochs before this one, latest first
    val_loss_history: tuple[float, ...]
    best_val_acc: float
    plateau_fraction: float  # epochs since the best validation accuracy / max_epochs
    seed_contribution_delta: float  # since the epoch before
    culls_fraction: float  # the agent's culls so far / max_epochs


def observation_features(report: EpochReport, blueprints: tuple[str, ...]) -> dict[str, float]:
    """Every feature of ``obs_mode="rich"`` by name, in its order; an observation is the values
    of ``feature_names(obs_mode, blueprints)``."""
    m, p, r = report.metrics, report.previous, report
    return {
        "epoch_fraction": r.epoch_fraction,
        **{name: m[name] for name in ("train_loss", "train_acc", "val_loss", "val_acc")},
        "train_loss_delta": m["train_loss"] - p["train_loss"],
        "train_acc_delta_x10": 10 * (m["train_acc"] - p["train_acc"]),
        "val_loss_delta": m["val_loss"] - p["val_loss"],
        "val_acc_delta_x10": 10 * (m["val_acc"] - p["val_acc"]),
        **{f"val_acc_prev{k + 1}": v for k, v in enumerate(r.val_acc_history)},
        **{f"val_loss_prev{k + 1}": v for k, v in enumerate(r.val_loss_history)},
        "best_val_acc": r.best_val_acc,
        "plateau_fraction": r.plateau_fraction,
        **{f"seed_stage_{s}": float(k == r.seed_stage) for k, s in enumerate(_STAGE_NAMES)},
        "seed_age_fraction": r.seed_age_fraction,
        "seed_alpha": r.seed_alpha,
        "seed_contribution_x10": 10 * r.seed_contribution,
        "seed_contribution_delta_x10": 10 * r.seed_contribution_delta,
        "seed_params_ratio": r.seed_params_ratio,
        **{f"seed_blueprint_{b}": float(k == r.seed_blueprint) for k, b in enumerate(blueprints)},
        "free_slots_fraction": r.free_slots_fraction,
        "fossilized_fraction": r.fossilized_fraction,
        "params_added_ratio": r.params_added_ratio,
        "culls_fraction": r.culls_fraction,
    }


@functools.lru_cache(maxsize=4)
def load_dataset(
    dataset: str = "digits", data_dir: str | None = None, max_train: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_val, y_val): images (N, C, H, W) float32, labels (N,) long.

    digits: scikit-learn's bundled 1,797 8x8 digits, pixels / 16, a fixed split of 500 for
    validation. cifar10: torchvision's CIFAR10 from ``data_dir`` (``cifar-10-batches-py``
    inside it; never downloaded), its test set for validation, standardised per channel;
    ``max_train`` keeps the first images of each set (default 5,000 train, 1,000 validation).
    """
    if dataset == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.as_tensor(digits.target, dtype=torch.long)
        order = torch.as_tensor(np.random.RandomState(0).permutation(len(y)))
        val, train = order[:500], order[500:]
        if max_train is not None:
            train = train[:max_train]
        return x[train], y[train], x[val], y[val]
    if dataset == "cifar10":
        if data_dir is None:
            raise ValueError(
                "dataset='cifar10' needs data_dir=<folder holding cifar-10-batches-py>"
            )
        folder = Path(data_dir).expanduser() / "cifar-10-batches-py"
        if not folder.is_dir():
            raise FileNotFoundError(
                f"CIFAR-10 not found: {folder} does not exist; expected the python version of "
                "CIFAR-10 there (data_batch_1..5, test_batch), as torchvision.datasets.CIFAR10("
                "root, download=True) lays it out. This environment never downloads it."
            )
        from torchvision.datasets import CIFAR10

        n_train = 5000 if max_train is None else max_train
        parts = []
        for train, n in ((True, n_train), (False, max(n_train // 5, 1))):
            data = CIFAR10(str(Path(data_dir).expanduser()), train=train, download=False)
            x = torch.as_tensor(data.data[:n], dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
            parts.append((x, torch.as_tensor(data.targets[:n], dtype=torch.long)))
        mean = parts[0][0].mean((0, 2, 3), keepdim=True)
        std = parts[0][0].std((0, 2, 3), keepdim=True)
        (x_train, y_train), (x_val, y_val) = parts
        return (x_train - mean) / std, y_train, (x_val - mean) / std, y_val
    raise ValueError(f"dataset={dataset!r}; expected 'digits' or 'cifar10'")


@contextlib.contextmanager
def _host_training() -> Iterator[None]:
    """Autograd on, whatever the caller's mode (a PPO rollout steps its envs under
    ``torch.inference_mode``), and one thread (deterministic, and no oversubscription across
    env processes); the caller's thread count comes back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        torch.set_num_threads(before)


class SeedLifecycleEnv(gym.Env):
    """The seed-lifecycle task (see the module docstring); ``memrl/SeedLifecycle``."""

    metadata = {"render_modes": []}

    def __init__(
        self,
        dataset: str = "digits",
        data_dir: str | None = None,
        max_epochs: int = 25,
        blueprints: tuple[str, ...] = tuple(BLUEPRINTS),
        widths: tuple[int, ...] = (8, 16, 16),
        batch_size: int = 256,
        lr: float = 1e-2,
        max_train: int | None = None,
        training_epochs: int = 3,
        blending_epochs: int = 3,
        probation_epochs: int = 5,
        min_cull_age: int = 2,
        reward_weights: RewardWeights | None = None,
        obs_mode: Literal["spec", "rich"] = "spec",
    ) -> None:
        unknown = [b for b in blueprints if b not in BLUEPRINTS]
        if unknown or not blueprints:
            raise ValueError(
                f"blueprints={blueprints!r}; expected a non-empty subset of {tuple(BLUEPRINTS)}"
            )
        self.feature_names = feature_names(obs_mode, tuple(blueprints))
        for name, value in (
            ("max_epochs", max_epochs),
            ("batch_size", batch_size),
            ("training_epochs", training_epochs),
            ("blending_epochs", blending_epochs),
            ("probation_epochs", probation_epochs),
        ):
            if value < 1:
                raise ValueError(f"{name}={value}; expected a positive integer")
        self.data = load_dataset(dataset, data_dir, max_train)
        self.dataset, self.max_epochs, self.blueprints = dataset, max_epochs, tuple(blueprints)
        self.widths, self.batch_size, self.lr = tuple(widths), batch_size, lr
        self.training_epochs, self.blending_epochs = training_epochs, blending_epochs
        self.probation_epochs, self.min_cull_age = probation_epochs, min_cull_age
        self.weights, self.obs_mode = reward_weights or RewardWeights(), obs_mode
        x_train = self.data[0]
        self._in_channels, self._num_classes = x_train.shape[1], int(self.data[1].max()) + 1
        self._strides = (1, 2, 1) if x_train.shape[-1] <= 8 else (2, 2, 2)
        self.num_slots = len(self.widths)
        self.action_space = spaces.MultiDiscrete([len(Op), len(self.blueprints)])
        n = len(self.feature_names)
        self.observation_space = spaces.Box(-np.inf, np.inf, (n,), np.float32)
        self.host: HostNet | None = None

    # ----------------------------------------------------------------- gymnasium API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        with _host_training():
            return self._reset()

    def step(self, action):
        with _host_training():
            return self._step(action)

    def _reset(self):
        torch_seed = int(self.np_random.integers(2**31))
        self._shuffle = torch.Generator().manual_seed(torch_seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed)
            self.host = HostNet(self._in_channels, self._num_classes, self.widths, self._strides)
        self.host_params = sum(p.numel() for p in self.host.host_parameters())
        self.optimizer = torch.optim.Adam(self.host.host_parameters(), lr=self.lr)
        self.epoch, self.active, self.fossils = 0, None, []
        self.stats = dict.fromkeys(
            ("germinated", "fossilized", "culls", "culls_harmful", "timeouts"), 0
        )
        val_loss, val_acc = self._evaluate()
        self.metrics = {
            "train_loss": val_loss,
            "train_acc": val_acc,
            "val_loss": val_loss,
            "val_acc": val_acc,
        }
        self.previous = dict(self.metrics)
        self.val_acc_history = [val_acc] * 3
        self.val_loss_history = [val_loss] * 3
        self.best_val_acc, self.plateau, self.previous_contribution = val_acc, 0, 0.0
        return self._observation(), self._info()

    def _step(self, action):
        if self.host is None:
            raise RuntimeError("step() before reset(); call reset() first")
        action = np.asarray(action, dtype=np.int64)
        if not self.action_space.contains(action):
            raise ValueError(
                f"action={action.tolist()}; expected (operation, blueprint) in {self.action_space}"
            )
        op, blueprint = (int(a) for a in action)
        mask = self.action_mask()
        invalid = not (mask[op] and mask[len(Op) + blueprint])
        if not invalid:
            self._apply(Op(op), blueprint)
        self._advance_lifecycle()
        self._train_epoch()
        if self.active is not None:
            self.active.age += 1
            self.active.epochs_in_stage += 1
        self._measure()
        self.epoch += 1
        terminated = self.epoch >= self.max_epochs
        terms = reward_terms(
            self.weights,
            self.metrics["val_acc"],
            self.previous["val_acc"],
            self.params_added() / self.host_params,
            self.max_epochs,
            germinated=not invalid and op == Op.GERMINATE,
            invalid=invalid,
        )
        info = self._info()
        info["reward_terms"], info["invalid_action"] = terms, invalid
        if terminated:
            info["episode"] = {
                "final_val_acc": self.metrics["val_acc"],
                "params_added": self.params_added(),
                **self.stats,
            }
        return self._observation(), float(sum(terms.values())), terminated, False, info

    # ----------------------------------------------------------------- lifecycle
    def action_mask(self) -> np.ndarray:
        """(4 + len(blueprints),) bool: the operation head's mask, then the blueprint head's."""
        ops = np.zeros(len(Op), dtype=bool)
        ops[Op.WAIT] = True
        seed = self.active
        ops[Op.GERMINATE] = seed is None and self._free_slot() is not None
        ops[Op.FOSSILIZE] = seed is not None and seed.stage == Stage.PROBATIONARY
        ops[Op.CULL] = (
            seed is not None and seed.stage in _CULLABLE and seed.age >= self.min_cull_age
        )
        return np.concatenate([ops, np.ones(len(self.blueprints), dtype=bool)])

    def params_added(self) -> int:
        """Parameters of all live seeds (the active one and the fossilised ones)."""
        seeds = self.fossils + ([self.active] if self.active is not None else [])
        return sum(s.num_params for s in seeds)

    def _free_slot(self) -> int | None:
        return next((k for k, slot in enumerate(self.host.slots) if slot.seed is None), None)

    def _apply(self, op: Op, blueprint: int) -> None:
        seed = self.active
        if op == Op.GERMINATE:
            k = self._free_slot()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(self.np_random.integers(2**31)))
                module = BLUEPRINTS[self.blueprints[blueprint]](self.host.slots[k].channels)
            self.host.slots[k].seed = module
            self.active = Seed(
                k,
                blueprint,
                module,
                torch.optim.Adam(module.parameters(), lr=self.lr),
                sum(p.numel() for p in module.parameters()),
            )
            self.stats["germinated"] += 1
        elif op == Op.FOSSILIZE:
            seed.stage = Stage.FOSSILIZED
            self.fossils.append(seed)
            self.active = None
            self.stats["fossilized"] += 1
        elif op == Op.CULL:
            self.stats["culls"] += 1
            self.stats["culls_harmful"] += seed.contribution <= 0
            self._cull()

    def _cull(self) -> None:
        slot = self.host.slots[self.active.slot]
        slot.seed, slot.alpha = None, 0.0
        self.active.stage = Stage.CULLED
        self.active = None

    def _advance_lifecycle(self) -> None:
        """The automatic transitions, at the start of an epoch (after the agent's action), by
        the epochs the active seed has completed in its stage."""
        seed = self.active
        if seed is None:
            return
        slot, done = self.host.slots[seed.slot], seed.epochs_in_stage
        if seed.stage == Stage.GERMINATED and done >= 1:
            seed.stage, seed.epochs_in_stage = Stage.TRAINING, 0
        elif seed.stage == Stage.TRAINING and done >= self.training_epochs:
            seed.stage, seed.epochs_in_stage = Stage.BLENDING, 0
        elif seed.stage == Stage.BLENDING and done >= self.blending_epochs:
            seed.stage, seed.epochs_in_stage = Stage.PROBATIONARY, 0
        elif seed.stage == Stage.PROBATIONARY and done >= self.probation_epochs:
            self.stats["timeouts"] += 1
            self._cull()
            return
        if seed.stage == Stage.BLENDING:
            slot.alpha = (seed.epochs_in_stage + 1) / self.blending_epochs

    # ----------------------------------------------------------------- training
    def _train_epoch(self) -> None:
        """One pass over the training set. The host (and every seed in its forward) trains on
        the task loss; a TRAINING seed on its local target, with gradients for itself only."""
        host, (x, y) = self.host, self.data[:2]
        learner = (
            self.active if self.active is not None and self.active.stage == Stage.TRAINING else None
        )
        optimizers = [self.optimizer] + [s.optimizer for s in self.fossils]
        if self.active is not None and self.active.stage in (Stage.BLENDING, Stage.PROBATIONARY):
            optimizers.append(self.active.optimizer)
        total_loss, correct = 0.0, 0
        host.train()
        for idx in torch.randperm(len(y), generator=self._shuffle).split(self.batch_size):
            xb, yb = x[idx], y[idx]
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            if learner is None:
                logits = host(xb)
            else:
                logits, h = host(xb, capture=learner.slot)
                seed_logits = host.forward_after(learner.slot, learner.module(h.detach()))
                seed_params = list(learner.module.parameters())
                grads = torch.autograd.grad(F.cross_entropy(seed_logits, yb), seed_params)
                for p, g in zip(seed_params, grads, strict=True):
                    p.grad = g
                learner.optimizer.step()
            loss = F.cross_entropy(logits, yb)
            loss.backward()
            for opt in optimizers:
                opt.step()
            total_loss += loss.item() * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
        self.previous = dict(self.metrics)
        self.metrics["train_loss"] = total_loss / len(y)
        self.metrics["train_acc"] = correct / len(y)

    @torch.no_grad()
    def _evaluate(self, alpha: float | None = None) -> tuple[float, float]:
        """Validation loss and accuracy; ``alpha`` overrides the active seed's alpha."""
        host, (x, y) = self.host, self.data[2:]
        slot = self.host.slots[self.active.slot] if self.active is not None else None
        saved = slot.alpha if slot is not None else 0.0
        if slot is not None and alpha is not None:
            slot.alpha = alpha
        host.eval()
        loss, correct = 0.0, 0
        for start in range(0, len(y), 1024):
            logits = host(x[start : start + 1024])
            loss += F.cross_entropy(logits, y[start : start + 1024], reduction="sum").item()
            correct += int((logits.argmax(1) == y[start : start + 1024]).sum())
        if slot is not None:
            slot.alpha = saved
        return loss / len(y), correct / len(y)

    def _measure(self) -> None:
        """Validation metrics, histories, plateau and the active seed's contribution."""
        self.val_acc_history = [self.metrics["val_acc"], *self.val_acc_history[:2]]
        self.val_loss_history = [self.metrics["val_loss"], *self.val_loss_history[:2]]
        val_loss, val_acc = self._evaluate()
        self.metrics["val_loss"], self.metrics["val_acc"] = val_loss, val_acc
        if val_acc > self.best_val_acc:
            self.best_val_acc, self.plateau = val_acc, 0
        else:
            self.plateau += 1
        seed = self.active
        if seed is not None:
            self.previous_contribution = seed.contribution
            if seed.stage == Stage.GERMINATED:
                seed.contribution = 0.0
            else:
                with_seed = self._evaluate(1.0)[1] if seed.stage == Stage.TRAINING else val_acc
                seed.contribution = with_seed - self._evaluate(0.0)[1]

    # ----------------------------------------------------------------- observation
    def _observation(self) -> np.ndarray:
        features = observation_features(self._report(), self.blueprints)
        return np.asarray([features[name] for name in self.feature_names], dtype=np.float32)

    def _report(self) -> EpochReport:
        seed = self.active
        free = sum(slot.seed is None for slot in self.host.slots)
        return EpochReport(
            epoch_fraction=self.epoch / self.max_epochs,
            metrics=dict(self.metrics),
            previous=dict(self.previous),
            seed_stage=Stage.DORMANT if seed is None else seed.stage,
            seed_age_fraction=0.0 if seed is None else seed.age / self.max_epochs,
            seed_alpha=0.0 if seed is None else self.host.slots[seed.slot].alpha,
            seed_contribution=0.0 if seed is None else seed.contribution,
            seed_params_ratio=0.0 if seed is None else seed.num_params / self.host_params,
            seed_blueprint=-1 if seed is None else seed.blueprint,
            free_slots_fraction=free / self.num_slots,
            fossilized_fraction=len(self.fossils) / self.num_slots,
            params_added_ratio=self.params_added() / self.host_params,
            val_acc_history=tuple(self.val_acc_history),
            val_loss_history=tuple(self.val_loss_history),
            best_val_acc=self.best_val_acc,
            plateau_fraction=self.plateau / self.max_epochs,
            seed_contribution_delta=(
                0.0 if seed is None else seed.contribution - self.previous_contribution
            ),
            culls_fraction=self.stats["culls"] / self.max_epochs,
        )

    def _info(self) -> dict[str, Any]:
        seed = self.active
        return {
            "action_mask": self.action_mask(),
            "epoch": self.epoch,
            "val_acc": self.metrics["val_acc"],
            "seed_stage": int(seed.stage) if seed is not None else int(Stage.DORMANT),
            "seed_contribution": seed.contribution if seed is not None else 0.0,
        }
