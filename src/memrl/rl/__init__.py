"""Recurrent PPO on memory tasks: action distributions (masked, multi-head, Gaussian); the
actor-critic, rollout and update follow (issue 4)."""

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

__all__ = [
    "ActionHead",
    "DiagGaussian",
    "MaskedCategorical",
    "action_head",
    "action_mask_tensor",
    "action_head_sizes",
    "make_distribution",
    "to_env_actions",
]
