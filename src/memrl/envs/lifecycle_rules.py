"""The seed-lifecycle task's rules in plain numbers, one host at a time: stages, actions and
their masks, the automatic transitions, the episode's bookkeeping, the reward terms and the
observation (``memrl.envs.seed_lifecycle`` describes them). No tensors here: the hosts'
training lives in ``memrl.envs.lifecycle_host``, so that one host and a batch of hosts share
every rule."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from memrl.envs.lifecycle_layers import BLUEPRINTS, LiveSeed


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
OBS_MODES = ("spec", "rich")


@dataclass(frozen=True)
class RewardWeights:
    """Weights of the reward terms (see the module docstring), in units of validation accuracy."""

    progress: float = 1.0
    rent: float = 0.1
    trial: float = 0.01
    invalid: float = 0.1


@dataclass(frozen=True)
class SeedLifecycleConfig:
    """The task's options: the constructor arguments of ``SeedLifecycleEnv`` and of
    ``SeedLifecycleVectorEnv`` (see ``memrl.envs.seed_lifecycle``)."""

    dataset: str = "digits"
    data_dir: str | None = None
    max_epochs: int = 25
    blueprints: tuple[str, ...] = tuple(BLUEPRINTS)
    widths: tuple[int, ...] = (8, 16, 16)
    batch_size: int = 256
    lr: float = 1e-2
    max_train: int | None = None
    training_epochs: int = 3
    blending_epochs: int = 3
    probation_epochs: int = 5
    min_cull_age: int = 2
    reward_weights: RewardWeights = field(default_factory=RewardWeights)
    obs_mode: Literal["spec", "rich"] = "spec"
    num_threads: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "blueprints", tuple(self.blueprints))
        object.__setattr__(self, "widths", tuple(self.widths))
        if self.reward_weights is None:
            object.__setattr__(self, "reward_weights", RewardWeights())
        unknown = [b for b in self.blueprints if b not in BLUEPRINTS]
        if unknown or not self.blueprints:
            raise ValueError(
                f"blueprints={self.blueprints!r}; expected a non-empty subset of "
                f"{tuple(BLUEPRINTS)}"
            )
        feature_names(self.obs_mode, self.blueprints)  # checks obs_mode
        for name in (
            "max_epochs", "batch_size", "training_epochs", "blending_epochs", "probation_epochs",
            "num_threads",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; expected a positive integer")


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


@dataclass
class Seed:
    """The active or a fossilised seed: where it is, what it is and how far it has come; its
    weights are its host's (``HostBatch``)."""

    slot: int
    blueprint: int
    num_params: int
    stage: Stage = Stage.GERMINATED
    age: int = 0
    epochs_in_stage: int = 0
    contribution: float = 0.0
    alpha: float = 0.0  # the slot's lerp weight: 0 until BLENDING, then 1/3, 2/3, 1


class Lifecycle:
    """One host's episode: its seeds' lifecycle and everything the observation, the reward and
    ``info`` report. The host itself is trained elsewhere; ``end_epoch`` takes its metrics."""

    def __init__(self, config: SeedLifecycleConfig, host_params: int) -> None:
        self.config, self.host_params = config, host_params
        self.num_slots = len(config.widths)
        self.epoch, self.active, self.fossils = 0, None, []

    def restart(self, val_loss: float, val_acc: float) -> None:
        """A new episode, the untrained host measured at (val_loss, val_acc)."""
        self.epoch, self.active, self.fossils = 0, None, []
        self.stats = dict.fromkeys(
            ("germinated", "fossilized", "culls", "culls_harmful", "timeouts"), 0
        )
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

    # ------------------------------------------------------------------------- actions
    def action_mask(self) -> np.ndarray:
        """(4 + len(blueprints),) bool: the operation head's mask, then the blueprint head's."""
        ops = np.zeros(len(Op), dtype=bool)
        ops[Op.WAIT] = True
        seed = self.active
        ops[Op.GERMINATE] = seed is None and self.free_slot() is not None
        ops[Op.FOSSILIZE] = seed is not None and seed.stage == Stage.PROBATIONARY
        ops[Op.CULL] = (
            seed is not None and seed.stage in _CULLABLE and seed.age >= self.config.min_cull_age
        )
        return np.concatenate([ops, np.ones(len(self.config.blueprints), dtype=bool)])

    def is_valid(self, op: int, blueprint: int) -> bool:
        mask = self.action_mask()
        return bool(mask[op] and mask[len(Op) + blueprint])

    def free_slot(self) -> int | None:
        taken = {s.slot for s in self.live_seeds()}
        return next((k for k in range(self.num_slots) if k not in taken), None)

    def live_seeds(self) -> list[Seed]:
        """The fossilised seeds and the active one."""
        return self.fossils + ([self.active] if self.active is not None else [])

    def params_added(self) -> int:
        """Parameters of all live seeds (the active one and the fossilised ones)."""
        return sum(s.num_params for s in self.live_seeds())

    def germinate(self, slot: int, blueprint: int, num_params: int) -> None:
        self.active = Seed(slot, blueprint, num_params)
        self.stats["germinated"] += 1

    def fossilize(self) -> None:
        self.active.stage = Stage.FOSSILIZED
        self.fossils.append(self.active)
        self.active = None
        self.stats["fossilized"] += 1

    def cull(self) -> None:
        """The agent's CULL."""
        self.stats["culls"] += 1
        self.stats["culls_harmful"] += self.active.contribution <= 0
        self._remove_active()

    def _remove_active(self) -> None:
        self.active.stage, self.active.alpha = Stage.CULLED, 0.0
        self.active = None

    def advance(self) -> None:
        """The automatic transitions, at the start of an epoch (after the agent's action), by
        the epochs the active seed has completed in its stage."""
        seed, c = self.active, self.config
        if seed is None:
            return
        done = seed.epochs_in_stage
        if seed.stage == Stage.GERMINATED and done >= 1:
            seed.stage, seed.epochs_in_stage = Stage.TRAINING, 0
        elif seed.stage == Stage.TRAINING and done >= c.training_epochs:
            seed.stage, seed.epochs_in_stage = Stage.BLENDING, 0
        elif seed.stage == Stage.BLENDING and done >= c.blending_epochs:
            seed.stage, seed.epochs_in_stage = Stage.PROBATIONARY, 0
        elif seed.stage == Stage.PROBATIONARY and done >= c.probation_epochs:
            self.stats["timeouts"] += 1
            self._remove_active()
            return
        if seed.stage == Stage.BLENDING:
            seed.alpha = (seed.epochs_in_stage + 1) / c.blending_epochs

    # ------------------------------------------------------------------------- the host's view
    def host_seeds(self) -> list[LiveSeed]:
        """The seeds as the host trains them this epoch: TRAINING ones learn on their local
        target; those with alpha > 0 are in the forward pass; GERMINATED ones sit still."""
        names = self.config.blueprints
        return [
            LiveSeed(s.slot, names[s.blueprint], s.alpha, s.stage == Stage.TRAINING)
            for s in self.live_seeds()
        ]

    def counterfactual_seeds(self) -> list[LiveSeed] | None:
        """The seeds with the active one's alpha switched (TRAINING: 1, what it would add;
        BLENDING, PROBATIONARY: 0, the host without it); None when it has no contribution yet
        (no active seed, or GERMINATED)."""
        seed = self.active
        if seed is None or seed.stage == Stage.GERMINATED:
            return None
        names = self.config.blueprints
        switched = 1.0 if seed.stage == Stage.TRAINING else 0.0
        return [
            LiveSeed(s.slot, names[s.blueprint], switched if s is seed else s.alpha)
            for s in self.live_seeds()
        ]

    def end_epoch(
        self,
        train: tuple[float, float],
        val: tuple[float, float],
        counterfactual_acc: float | None,
    ) -> None:
        """The epoch's results: training (loss, accuracy), validation (loss, accuracy) and the
        validation accuracy of ``counterfactual_seeds`` (when there were any)."""
        seed = self.active
        if seed is not None:
            seed.age += 1
            seed.epochs_in_stage += 1
        self.previous = dict(self.metrics)
        self.metrics["train_loss"], self.metrics["train_acc"] = train
        self.val_acc_history = [self.metrics["val_acc"], *self.val_acc_history[:2]]
        self.val_loss_history = [self.metrics["val_loss"], *self.val_loss_history[:2]]
        self.metrics["val_loss"], self.metrics["val_acc"] = val
        if val[1] > self.best_val_acc:
            self.best_val_acc, self.plateau = val[1], 0
        else:
            self.plateau += 1
        if seed is not None:
            self.previous_contribution = seed.contribution
            if seed.stage == Stage.GERMINATED:
                seed.contribution = 0.0
            elif seed.stage == Stage.TRAINING:  # alpha 0: the validation pass ran without it
                seed.contribution = counterfactual_acc - val[1]
            else:
                seed.contribution = val[1] - counterfactual_acc
        self.epoch += 1

    # ------------------------------------------------------------------------- what it reports
    def report(self) -> EpochReport:
        seed, c = self.active, self.config
        return EpochReport(
            epoch_fraction=self.epoch / c.max_epochs,
            metrics=dict(self.metrics),
            previous=dict(self.previous),
            seed_stage=Stage.DORMANT if seed is None else seed.stage,
            seed_age_fraction=0.0 if seed is None else seed.age / c.max_epochs,
            seed_alpha=0.0 if seed is None else seed.alpha,
            seed_contribution=0.0 if seed is None else seed.contribution,
            seed_params_ratio=0.0 if seed is None else seed.num_params / self.host_params,
            seed_blueprint=-1 if seed is None else seed.blueprint,
            free_slots_fraction=(self.num_slots - len(self.live_seeds())) / self.num_slots,
            fossilized_fraction=len(self.fossils) / self.num_slots,
            params_added_ratio=self.params_added() / self.host_params,
            val_acc_history=tuple(self.val_acc_history),
            val_loss_history=tuple(self.val_loss_history),
            best_val_acc=self.best_val_acc,
            plateau_fraction=self.plateau / c.max_epochs,
            seed_contribution_delta=(
                0.0 if seed is None else seed.contribution - self.previous_contribution
            ),
            culls_fraction=self.stats["culls"] / c.max_epochs,
        )

    def observation(self, names: tuple[str, ...]) -> np.ndarray:
        features = observation_features(self.report(), self.config.blueprints)
        return np.asarray([features[name] for name in names], dtype=np.float32)

    def info(self) -> dict[str, Any]:
        seed = self.active
        return {
            "action_mask": self.action_mask(),
            "epoch": self.epoch,
            "val_acc": self.metrics["val_acc"],
            "seed_stage": int(seed.stage) if seed is not None else int(Stage.DORMANT),
            "seed_contribution": seed.contribution if seed is not None else 0.0,
        }

    def episode(self) -> dict[str, Any]:
        """The episode's statistics, for ``info["episode"]`` at its last step."""
        return {
            "final_val_acc": self.metrics["val_acc"],
            "params_added": self.params_added(),
            **self.stats,
        }
