"""The Tamiyo recurrence spec's morphogenetic task: a controller grafts "seeds" into a host
network while it trains.

One step = one training epoch of a real host: a small CNN classifier (three 3x3 conv blocks of
8, 16, 16 channels, 3.7k parameters; Adam, lr 1e-2, batches of 256) on scikit-learn's bundled
digits (8x8, 1,297 train / 500 validation images; the default) or CIFAR-10 from disk
(``dataset="cifar10", data_dir=...``; never downloaded). Training runs on ``num_threads`` torch
threads (default 1; the caller's count is restored afterwards) with autograd enabled even under
the caller's ``torch.inference_mode``; an episode is deterministic given the reset seed. More
threads run a batch of hosts faster (see the speed table in the results doc) but add in
another order, so envs then match their single env up to float rounding, not bit for bit.

One env or many. ``make_vector_env("memrl/SeedLifecycle", N)`` builds ``SeedLifecycleVectorEnv``
(``memrl.envs.lifecycle_batch``): N envs whose hosts train as one grouped computation, env i
playing exactly, bit for bit, as this env reset with the same seed and given the same actions;
this env is that computation for N = 1. The rules live in ``memrl.envs.lifecycle_rules`` (plain
numbers, shared), the hosts and seeds in ``memrl.envs.lifecycle_host`` and
``memrl.envs.lifecycle_layers``.

25 epochs an episode; the episode then *terminates* (the epoch budget is part of the task and
the epoch is in the observation, so there is no truncation to bootstrap).

Seeds. The host has ``num_slots`` slots, one after each conv block; a slot holds at most one
seed, a residual module from a blueprint (``BLUEPRINTS``: norm, depthwise, conv_light,
conv_heavy, attention), whose output is ``seed(h) = h + branch(h)`` with the branch's last layer
zero-initialised. The slot's output is ``lerp(h, seed(h), alpha)``, computed as
``h + alpha * branch(h)``. Lifecycle of a seed:

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
so that one host or a batch of hosts share them.

At the last step ``info["episode"]`` holds the episode's statistics: final validation accuracy,
parameters added, germinations, fossilisations, agent culls, culls of seeds whose contribution
was <= 0 when culled (cull precision = culls_harmful / culls) and timeouts.
"""

from __future__ import annotations

from typing import Any, Literal

import gymnasium as gym
import numpy as np

from memrl.envs.lifecycle_batch import LifecycleBatch, SeedLifecycleVectorEnv
from memrl.envs.lifecycle_host import HostBatch, load_dataset
from memrl.envs.lifecycle_layers import BLUEPRINTS
from memrl.envs.lifecycle_rules import (
    HISTORY_FEATURES,
    OBS_MODES,
    EpochReport,
    Lifecycle,
    Op,
    RewardWeights,
    Seed,
    SeedLifecycleConfig,
    Stage,
    feature_names,
    observation_features,
    reward_terms,
)

__all__ = [
    "BLUEPRINTS",
    "HISTORY_FEATURES",
    "OBS_MODES",
    "EpochReport",
    "Op",
    "RewardWeights",
    "Seed",
    "SeedLifecycleConfig",
    "SeedLifecycleEnv",
    "SeedLifecycleVectorEnv",
    "Stage",
    "feature_names",
    "load_dataset",
    "observation_features",
    "reward_terms",
]


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
        num_threads: int = 1,
    ) -> None:
        self.config = SeedLifecycleConfig(
            dataset, data_dir, max_epochs, blueprints, widths, batch_size, lr, max_train,
            training_epochs, blending_epochs, probation_epochs, min_cull_age,
            reward_weights or RewardWeights(), obs_mode, num_threads,
        )  # fmt: skip
        self._batch = LifecycleBatch(self.config, 1)
        self.feature_names = self._batch.feature_names
        self.action_space = self._batch.action_space
        self.observation_space = self._batch.observation_space
        self._started = False

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        ((obs, info),) = self._batch.reset([0], [self.np_random])
        self._started = True
        return obs, info

    def step(self, action):
        if not self._started:
            raise RuntimeError("step() before reset(); call reset() first")
        action = np.asarray(action, dtype=np.int64)
        if not self.action_space.contains(action):
            raise ValueError(
                f"action={action.tolist()}; expected (operation, blueprint) in {self.action_space}"
            )
        ((obs, reward, terminated, info),) = self._batch.step([0], action[None])
        return obs, reward, terminated, False, info

    # ----------------------------------------------------------------- the episode, to inspect
    @property
    def lifecycle(self) -> Lifecycle:
        """The episode's lifecycle: seeds, stages, statistics, metrics."""
        return self._batch.lifecycles[0]

    @property
    def hosts(self) -> HostBatch:
        """The host and its seeds' weights, as row 0 of a ``HostBatch``."""
        return self._batch.hosts

    @property
    def data(self):
        """(x_train, y_train, x_val, y_val) of the dataset."""
        return self._batch.data

    @property
    def max_epochs(self) -> int:
        return self.config.max_epochs

    @property
    def blueprints(self) -> tuple[str, ...]:
        return self.config.blueprints

    @property
    def weights(self) -> RewardWeights:
        return self.config.reward_weights

    @property
    def obs_mode(self) -> str:
        return self.config.obs_mode

    @property
    def host_params(self) -> int:
        return self.hosts.host_params

    @property
    def active(self) -> Seed | None:
        return self.lifecycle.active

    @property
    def fossils(self) -> list[Seed]:
        return self.lifecycle.fossils

    @property
    def stats(self) -> dict[str, Any]:
        return self.lifecycle.stats

    @property
    def epoch(self) -> int:
        return self.lifecycle.epoch

    def action_mask(self) -> np.ndarray:
        """(4 + len(blueprints),) bool: the operation head's mask, then the blueprint head's."""
        return self.lifecycle.action_mask()

    def params_added(self) -> int:
        """Parameters of all live seeds (the active one and the fossilised ones)."""
        return self.lifecycle.params_added()
