"""Environments by id, and vector environments over them.

Accepted ids:
  ``popgym/<Name>``   any POPGym environment class, e.g. ``popgym/RepeatPreviousEasy``
  ``<gymnasium id>``  any id in gymnasium's registry, e.g. ``CartPole-v1``
  ``module:Class``    a user's gymnasium.Env subclass (or a function returning an Env)

Every environment comes wrapped in ``FlatObservation`` (one float32 vector; Box actions
clipped). The previous action and reward are appended by default for POPGym environments (the
POPGym convention) and not for others; ``previous_action_reward`` overrides that.

Autoreset (read this before writing a rollout loop). ``make_vector_env`` uses gymnasium 1.x's
default, ``AutoresetMode.NEXT_STEP``. For one sub-env, with o = observation, a = action:

  call            returns                        note
  step(a_k)       o_{k+1}, r_k, terminated=True  o_{k+1} is the episode's final observation
  step(a_{k+1})   o'_0, 0.0, False, False        a_{k+1} is IGNORED: the env only resets
  step(a'_0)      o'_1, r'_0, ...                the new episode goes on

So the trainer must, per env, remember ``autoreset = terminated | truncated`` of the last call
and on the next call:
  * not train on that step: the (o_{k+1}, a_{k+1}, reward 0) row is no transition. Mask it
    out of the policy and value losses and out of GAE (treat o_{k+1} as terminal/truncated:
    no bootstrapping from one episode into the next), and out of episode statistics.
  * on truncation, bootstrap the last real step from V(o_{k+1}), which the policy computes on
    that very row with the old episode's memory (do not reset the state before o_{k+1}).
  * set ``is_first`` on the row whose input is o'_0 (the observation that call returned), so
    the core resets its state before consuming o'_0.
  * read ``info`` of that call as the new episode's reset info (e.g. its first action mask).
Pass ``autoreset_mode="same_step"`` to get gymnasium's SAME_STEP mode instead: a terminal step
then returns the next episode's first observation at once (is_first on the next row, nothing
to skip) and the final observation and info in ``info["final_obs"]`` / ``info["final_info"]``
(with ``info["_final_obs"]`` flagging which envs), needed to bootstrap a truncation.

Batched vector envs. An id in ``BATCHED_VECTOR_ENVS`` has a vector env of its own that steps
all N envs as one computation in this process, each env playing exactly as its single env
would, and behaving as a ``SyncVectorEnv`` of them (autoreset modes, ``info`` layout);
``make_vector_env`` uses it for ``vector="sync"`` unless ``batched=False``.
"""

from __future__ import annotations

import difflib
import functools
import importlib
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv, VectorEnv

from memrl.envs.popgym import POPGYM_ENVS, FlatObservation, is_popgym_env, make_popgym_env

ID_FORMS = "'popgym/<Name>', a registered gymnasium id (e.g. 'CartPole-v1'), or 'module:Class'"
BATCHED_VECTOR_ENVS = {
    "memrl/SeedLifecycle": "memrl.envs.lifecycle_batch:SeedLifecycleVectorEnv",
}
"""Env id -> its batched vector env class ("module:Class", imported when used)."""
_AUTORESET_MODES = {"next_step": AutoresetMode.NEXT_STEP, "same_step": AutoresetMode.SAME_STEP}


def make_env(
    env_id: str,
    seed: int | None = None,
    *,
    previous_action_reward: bool | None = None,
    **kwargs: Any,
) -> gym.Env:
    """The environment ``env_id`` (see the module docstring), wrapped in FlatObservation.

    seed: if given, the first ``reset()`` without a seed of its own uses it (so that reset and
      all later ones are reproducible), and the action space is seeded with it.
    previous_action_reward: append the previous action and reward to the observation;
      default: for POPGym environments only.
    kwargs: go to the environment's constructor (or to ``gymnasium.make``).
    """
    env = _build(env_id, kwargs)
    if previous_action_reward is None:
        previous_action_reward = is_popgym_env(env)
    env = FlatObservation(env, previous_action_reward, seed=seed)
    if seed is not None:
        env.action_space.seed(seed)
    return env


def make_vector_env(
    env_id: str,
    num_envs: int,
    seed: int | None = None,
    vector: Literal["sync", "async"] = "sync",
    *,
    autoreset_mode: Literal["next_step", "same_step"] = "next_step",
    previous_action_reward: bool | None = None,
    batched: bool = True,
    **kwargs: Any,
) -> VectorEnv:
    """``num_envs`` copies of ``make_env(env_id, ...)`` in a gymnasium Sync or Async
    (subprocess) vector env, or for ``vector="sync"`` the env's batched vector env when it has
    one (``BATCHED_VECTOR_ENVS``; ``batched=False`` for the SyncVectorEnv of single envs).
    Sub-env i gets ``vector_env_seeds(seed, num_envs)[i]`` for its first reset, so the first
    ``envs.reset()`` equals ``envs.reset(seed=vector_env_seeds(seed, num_envs))`` and
    everything after it is reproducible. (``envs.reset(seed=seed)`` with an int would instead
    seed sub-env i with ``seed + i``: gymnasium's rule.) Autoreset: NEXT_STEP by default; see
    the module docstring for what a trainer must do about it."""
    if num_envs < 1:
        raise ValueError(f"num_envs={num_envs}; expected at least 1")
    if vector not in ("sync", "async"):
        raise ValueError(f"vector={vector!r}; expected 'sync' or 'async'")
    if autoreset_mode not in _AUTORESET_MODES:
        raise ValueError(
            f"autoreset_mode={autoreset_mode!r}; expected one of {', '.join(_AUTORESET_MODES)}"
        )
    seeds = vector_env_seeds(seed, num_envs) if seed is not None else [None] * num_envs
    if batched and vector == "sync" and env_id in BATCHED_VECTOR_ENVS:
        if previous_action_reward:
            raise ValueError(
                f"previous_action_reward=True: the batched vector env of {env_id!r} does not "
                "append the previous action and reward; pass batched=False"
            )
        module_name, _, attr = BATCHED_VECTOR_ENVS[env_id].partition(":")
        cls = getattr(importlib.import_module(module_name), attr)
        envs = cls(num_envs, autoreset_mode=_AUTORESET_MODES[autoreset_mode], seeds=seeds, **kwargs)
        if seed is not None:
            envs.action_space.seed(seed)
        return envs
    if vector == "async":
        _build(env_id, kwargs).close()  # fail here, with a clear error, not inside a worker
    env_fns = [
        functools.partial(
            make_env, env_id, env_seed, previous_action_reward=previous_action_reward, **kwargs
        )
        for env_seed in seeds
    ]
    mode = _AUTORESET_MODES[autoreset_mode]
    if vector == "sync":
        envs: VectorEnv = SyncVectorEnv(env_fns, autoreset_mode=mode)
    else:
        envs = AsyncVectorEnv(env_fns, autoreset_mode=mode)
    if seed is not None:
        envs.action_space.seed(seed)
    return envs


def vector_env_seeds(seed: int, num_envs: int) -> list[int]:
    """Distinct, reproducible per-env seeds from numpy's SeedSequence."""
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(num_envs)]


def _build(env_id: str, kwargs: dict[str, Any]) -> gym.Env:
    if env_id.startswith("popgym/"):
        return make_popgym_env(env_id.removeprefix("popgym/"), **kwargs)
    module_name, _, attr = env_id.partition(":")
    if attr and all(part.isidentifier() for part in attr.split(".")):
        return _build_from_class(env_id, module_name, attr, kwargs)
    if attr or env_id in gym.registry:  # 'module:Env-v0' is gymnasium's own namespaced form
        try:
            return gym.make(env_id, **kwargs)
        except gym.error.Error as err:
            raise ValueError(f"gymnasium.make({env_id!r}) failed: {err}") from err
    candidates = [f"popgym/{name}" for name in POPGYM_ENVS] + list(gym.registry)
    close = difflib.get_close_matches(env_id, candidates, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown environment id {env_id!r}{hint} (expected {ID_FORMS})")


def _build_from_class(env_id: str, module_name: str, attr: str, kwargs: dict[str, Any]) -> gym.Env:
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"environment id {env_id!r}: cannot import module {module_name!r} ({err}); "
            f"expected {ID_FORMS}"
        ) from err
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(
                f"environment id {env_id!r}: module {module_name!r} has no attribute {attr!r}"
            )
        target = getattr(target, part)
    env = target(**kwargs)
    if not isinstance(env, gym.Env):
        raise TypeError(
            f"environment id {env_id!r}: {attr}(...) returned {type(env).__name__}, "
            "expected a gymnasium.Env"
        )
    return env
