"""Environments and wrappers: any env by id (``popgym/<Name>``, a gymnasium id,
``module:Class``), the POPGym observation convention, vector envs, and the RSSM spec's moving-dot
world (``memrl.envs.moving_dot``).

>>> envs = make_vector_env("popgym/RepeatPreviousEasy", num_envs=16, seed=0)
>>> obs, info = envs.reset()          # obs (16, D) float32; see registry.py about autoreset
"""

import gymnasium as gym

from memrl.envs.moving_dot import (
    MovingDotConfig,
    MovingDotDataset,
    collate_moving_dot,
    generate_moving_dot_sequences,
)
from memrl.envs.popgym import POPGYM_ENVS, FlatObservation, is_popgym_env, make_popgym_env
from memrl.envs.registry import (
    BATCHED_VECTOR_ENVS,
    ID_FORMS,
    make_env,
    make_vector_env,
    vector_env_seeds,
)

# the Tamiyo recurrence spec's task; gymnasium builds it lazily, passing make's keyword arguments
# (e.g. obs_mode="rich") to SeedLifecycleEnv; make_vector_env builds its batched vector env
# (registry.BATCHED_VECTOR_ENVS)
if "memrl/SeedLifecycle" not in gym.registry:
    gym.register("memrl/SeedLifecycle", "memrl.envs.seed_lifecycle:SeedLifecycleEnv")

__all__ = [
    "BATCHED_VECTOR_ENVS",
    "ID_FORMS",
    "POPGYM_ENVS",
    "FlatObservation",
    "MovingDotConfig",
    "MovingDotDataset",
    "collate_moving_dot",
    "generate_moving_dot_sequences",
    "is_popgym_env",
    "make_env",
    "make_popgym_env",
    "make_vector_env",
    "vector_env_seeds",
]
