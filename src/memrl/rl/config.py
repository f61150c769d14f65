"""``PPOConfig``: every flag of ``memrl ppo``, checked in one place."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

import tyro
import yaml

from memrl.cores import VectorCoreName
from memrl.runs import RunOptions


@dataclasses.dataclass
class PPOConfig(RunOptions):
    """Recurrent PPO on any gymnasium / POPGym environment."""

    env: str = "popgym/RepeatPreviousEasy"
    """Environment: popgym/<Name>, a registered gymnasium id, or module:Class."""
    env_kwargs: Annotated[
        tuple[str, ...],
        tyro.conf.arg(metavar="KEY=VALUE [KEY=VALUE ...]", help_behavior_hint="(default: none)"),
    ] = ()
    """Keyword arguments of the environment's constructor, each KEY=VALUE with the VALUE read as
    YAML, e.g. obs_mode=rich max_epochs=10 for memrl/SeedLifecycle."""
    core: VectorCoreName = "gru"
    """Memory core (none = the feed-forward baseline on the same code path)."""
    num_envs: int = 16
    """Parallel environments."""
    vector: Literal["sync", "async"] = "sync"
    """gymnasium.vector SyncVectorEnv, or AsyncVectorEnv (one process per env)."""
    rollout_steps: int = 128
    """Steps per env per rollout."""
    total_steps: int = 500_000
    """Environment steps in total (all envs)."""
    hidden_size: int = 128
    """Encoder and core width."""
    num_layers: int = 1
    """Core layers."""
    separate_critic: bool = False
    """Give the critic its own encoder and memory."""
    rnn_init: Literal["orthogonal", "pytorch"] = "orthogonal"
    """Initialisation of a gru/lstm core: orthogonal recurrent weights and zero biases (the LSTM's
    forget-gate bias 1), or PyTorch's own uniform one (sb3-contrib's)."""
    bptt_len: int = 16
    """Truncated-BPTT sequence length, clamped to rollout_steps; where it does not divide them,
    each env's last sequence is shorter (padded and left out of the loss)."""
    split_episodes: bool = False
    """Also start a training sequence at every episode start (sequences of at most bptt_len
    steps, shorter ones padded and left out of the loss), as sb3-contrib does: a sequence that
    begins an episode then starts from the exact zero state, and with bptt_len >= the episode
    length each episode is one sequence."""
    epochs: int = 4
    """PPO epochs per rollout."""
    minibatch_steps: int = 512
    """Steps per minibatch, any number: a minibatch holds the whole sequences whose first step
    falls in its share of the shuffled rollout."""
    lr: float = 1e-3
    """Adam learning rate (1e-3 was measured best for the LSTM on POPGym: 0.94-0.97 on
    RepeatPreviousEasy after 500k steps, against 0.64-0.68 with 3e-4)."""
    anneal_lr: bool = True
    """Anneal the learning rate linearly to zero."""
    gamma: float = 0.99
    """Discount."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    clip_coef: float = 0.2
    """PPO ratio clip."""
    clip_value: bool = False
    """Clip the value update around the old values too."""
    ent_coef: float = 0.01
    """Entropy bonus."""
    vf_coef: float = 0.5
    """Value-loss weight."""
    max_grad_norm: float = 0.5
    """Gradient-norm clip."""
    target_kl: float | None = None
    """Stop the epoch loop early when the approximate KL exceeds this."""
    burn_in: int = 0
    """R2D2 burn-in: re-derive each sequence's initial state by replaying the B steps before it
    (no gradient) from the state stored there; 0 <= B <= bptt_len."""
    refresh_states: bool = True
    """Before each epoch after the first, recompute the stored sequence-start states with the
    current weights (PPO's new log-probs then condition on the new policy's memory of the
    rollout, not on the rollout policy's)."""
    norm_adv: bool = True
    """Normalise advantages per minibatch."""
    norm_obs: bool = False
    """Running observation normalisation."""
    norm_reward: bool = False
    """Running reward scaling by the std of the discounted return."""
    eval_episodes: int = 32
    """Episodes of the final evaluation (greedy actions)."""
    checkpoint_interval: int = 20
    """Checkpoint every this many rollouts (and at the end)."""

    # a resumed run may extend its budget; sync and async envs train identically
    RESUME_FLAGS = (
        *RunOptions.RESUME_FLAGS,
        "total_steps",
        "checkpoint_interval",
        "eval_episodes",
        "vector",
    )

    def __post_init__(self) -> None:
        for name in (
            "num_envs",
            "rollout_steps",
            "total_steps",
            "hidden_size",
            "num_layers",
            "bptt_len",
            "epochs",
            "minibatch_steps",
            "checkpoint_interval",
        ):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} {getattr(self, name)}; expected a positive integer")
        sequence_len = min(self.bptt_len, self.rollout_steps)  # as the buffer clamps it
        if not 0 <= self.burn_in <= sequence_len:
            raise ValueError(
                f"--burn-in {self.burn_in}; expected 0 <= --burn-in <= {sequence_len} "
                "(--bptt-len, at most --rollout-steps)"
            )
        if self.rnn_init != "orthogonal" and not self.core_options:
            raise ValueError(f"rnn_init={self.rnn_init!r} applies to gru and lstm, not {self.core}")
        if not self.lr > 0:
            raise ValueError(f"--lr {self.lr}; expected a positive number")
        if not 0 <= self.gamma <= 1 or not 0 <= self.gae_lambda <= 1:
            raise ValueError(
                f"--gamma {self.gamma}, --gae-lambda {self.gae_lambda}; expected both in [0, 1]"
            )
        parse_env_kwargs(self.env_kwargs)  # a malformed KEY=VALUE fails here, with the flags

    @property
    def env_options(self) -> dict[str, Any]:
        """``--env-kwargs`` as the keyword arguments of the environment's constructor."""
        return parse_env_kwargs(self.env_kwargs)

    @property
    def env_flags(self) -> str:
        """``--env ID [--env-kwargs ...]`` as given: how an error about the environment names it."""
        kwargs = f" --env-kwargs {' '.join(self.env_kwargs)}" if self.env_kwargs else ""
        return f"--env {self.env}{kwargs}"

    @property
    def core_options(self) -> dict[str, str]:
        """``make_core``'s extra options: ``init`` for the cores that take --rnn-init."""
        return {"init": self.rnn_init} if self.core in ("gru", "lstm") else {}


def parse_env_kwargs(items: tuple[str, ...]) -> dict[str, Any]:
    """``("obs_mode=rich", "max_epochs=10")`` -> ``{"obs_mode": "rich", "max_epochs": 10}``:
    each value read as YAML."""
    options: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.isidentifier():
            raise ValueError(f"--env-kwargs {item!r}; expected KEY=VALUE, KEY a Python name")
        if key in options:
            raise ValueError(f"--env-kwargs {key} is given twice; expected each KEY once")
        try:
            options[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ValueError(f"--env-kwargs {item!r}: the value is not YAML ({err})") from None
    return options
