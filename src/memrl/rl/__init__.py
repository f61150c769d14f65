"""Recurrent PPO on memory tasks: the config (``config``), the actor-critic (``policy``), action
distributions (masked, multi-head, Gaussian), rollout storage and sequence minibatches
(``buffer``), the rollout (``rollout``), the agent and its loss (``agent``), the training loop
(``ppo``) and evaluation (``evaluate``).

>>> summary = train_ppo(PPOConfig(env="popgym/RepeatPreviousEasy", core="gru"))
"""

from memrl.rl.agent import PPOAgent, ppo_loss
from memrl.rl.buffer import RolloutBuffer, SequenceBatch
from memrl.rl.config import PPOConfig
from memrl.rl.distributions import (
    ActionHead,
    DiagGaussian,
    MaskedCategorical,
    action_head,
    action_head_sizes,
    action_mask_tensor,
    make_distribution,
    to_env_actions,
)
from memrl.rl.evaluate import evaluate
from memrl.rl.policy import RecurrentActorCritic
from memrl.rl.ppo import train_ppo
from memrl.rl.rollout import Carry, EpisodeTracker, collect_rollout

__all__ = [
    "ActionHead",
    "Carry",
    "DiagGaussian",
    "EpisodeTracker",
    "MaskedCategorical",
    "PPOAgent",
    "PPOConfig",
    "RecurrentActorCritic",
    "RolloutBuffer",
    "SequenceBatch",
    "action_head",
    "action_head_sizes",
    "action_mask_tensor",
    "collect_rollout",
    "evaluate",
    "make_distribution",
    "ppo_loss",
    "to_env_actions",
    "train_ppo",
]
