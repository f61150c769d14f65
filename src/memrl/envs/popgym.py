"""POPGym environments by name, and the POPGym observation convention as a wrapper.

POPGym's PPO baselines see a flat vector: the observation (Discrete / MultiDiscrete one-hot,
Box as is), then the previous action (one-hot per discrete head, raw for Box; the null action
at reset) and the previous reward. ``FlatObservation`` builds exactly that as one float32
vector, for any environment whose spaces it can encode.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import popgym.envs
from gymnasium import spaces
from popgym.core.env import POPGymEnv

# Every POPGym environment class by name: the Easy / Medium / Hard variants and the
# configurable base classes (e.g. RepeatPrevious(k=...)).
POPGYM_ENVS: dict[str, type[POPGymEnv]] = {
    cls.__name__: cls for cls in (*popgym.envs.ALL, *popgym.envs.ALL_BASE)
}

_ENCODABLE = "Discrete, MultiDiscrete, MultiBinary, Box, and Tuple/Dict of these"

# encode(value, out, offset) writes one value of a space into out[offset : offset + size]
Encoder = Callable[[Any, np.ndarray, int], None]


def make_popgym_env(name: str, **kwargs: Any) -> POPGymEnv:
    """The raw POPGym environment ``name`` (a class name in POPGYM_ENVS); kwargs go to it."""
    if name not in POPGYM_ENVS:
        close = difflib.get_close_matches(name, POPGYM_ENVS, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(f'popgym/{c}' for c in close)}?" if close else ""
        bases = sorted(cls.__name__ for cls in popgym.envs.ALL_BASE)
        raise ValueError(
            f"unknown POPGym environment 'popgym/{name}'{hint} (known: {', '.join(bases)}; "
            "each also as <Name>Easy, <Name>Medium, <Name>Hard)"
        )
    return POPGYM_ENVS[name](**kwargs)


def is_popgym_env(env: gym.Env) -> bool:
    return isinstance(env.unwrapped, POPGymEnv)


class FlatObservation(gym.Wrapper):
    """One float32 observation vector: the encoded observation, then (with
    ``previous_action_reward``) the encoded previous action and the previous reward.

    Encoding: Discrete -> one-hot; MultiDiscrete -> one-hot per entry; Box, MultiBinary -> raw,
    flattened; Tuple / Dict -> their parts in order. At reset the previous action and reward
    are all zeros (the null action: distinct from every real action's one-hot). A Box action is
    clipped to the action space before the environment sees it (and appears clipped in the next
    observation). ``info`` passes through untouched (e.g. ``info["action_mask"]``).
    ``parts`` maps "observation", "previous_action", "previous_reward" to their slices.
    ``seed``, if given, is used by the first ``reset()`` that passes no seed of its own.
    """

    def __init__(
        self, env: gym.Env, previous_action_reward: bool = True, seed: int | None = None
    ) -> None:
        super().__init__(env)
        self._first_reset_seed = seed
        obs_size, self._encode_obs, low, high = _encoder(env.observation_space, "observation")
        self.parts = {"observation": slice(0, obs_size)}
        self._encode_action: Encoder | None = None
        self._action_offset = obs_size
        if previous_action_reward:
            act_size, self._encode_action, act_low, act_high = _encoder(env.action_space, "action")
            self.parts["previous_action"] = slice(obs_size, obs_size + act_size)
            self.parts["previous_reward"] = slice(obs_size + act_size, obs_size + act_size + 1)
            low = np.concatenate([low, act_low, [-np.inf]])
            high = np.concatenate([high, act_high, [np.inf]])
        self._size = len(low)
        self.observation_space = spaces.Box(
            low.astype(np.float32), high.astype(np.float32), (self._size,), np.float32
        )
        space = env.action_space
        self._clip = isinstance(space, spaces.Box) and np.issubdtype(space.dtype, np.floating)

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict]:
        if kwargs.get("seed") is None and self._first_reset_seed is not None:
            kwargs["seed"] = self._first_reset_seed
        self._first_reset_seed = None
        obs, info = self.env.reset(**kwargs)
        return self._flat(obs, None, 0.0), info

    def step(self, action: Any) -> tuple[np.ndarray, Any, bool, bool, dict]:
        if self._clip:
            space = self.env.action_space
            action = np.clip(np.asarray(action, dtype=space.dtype), space.low, space.high)
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self._flat(obs, action, reward), reward, terminated, truncated, info

    def _flat(self, obs: Any, action: Any, reward: Any) -> np.ndarray:
        out = np.zeros(self._size, np.float32)
        self._encode_obs(obs, out, 0)
        if self._encode_action is not None and action is not None:
            self._encode_action(action, out, self._action_offset)
            out[-1] = reward
        return out


def _encoder(space: spaces.Space, what: str) -> tuple[int, Encoder, np.ndarray, np.ndarray]:
    """(size, encode, low, high) of the flat float encoding of ``space``."""
    if isinstance(space, spaces.Discrete):
        n, start = int(space.n), int(space.start)

        def encode_discrete(value: Any, out: np.ndarray, offset: int) -> None:
            index = int(value) - start
            if not 0 <= index < n:
                raise ValueError(f"{what} {value!r} is outside {space}")
            out[offset + index] = 1.0

        return n, encode_discrete, np.zeros(n), np.ones(n)
    if isinstance(space, spaces.MultiDiscrete):
        nvec = np.asarray(space.nvec).ravel()
        start = np.asarray(space.start).ravel()
        first = np.concatenate([[0], np.cumsum(nvec)[:-1]])  # where each entry's one-hot begins
        size = int(nvec.sum())

        def encode_multi_discrete(value: Any, out: np.ndarray, offset: int) -> None:
            index = np.asarray(value).ravel() - start
            if np.any((index < 0) | (index >= nvec)):
                raise ValueError(f"{what} {value!r} is outside {space}")
            out[offset + first + index] = 1.0

        return size, encode_multi_discrete, np.zeros(size), np.ones(size)
    if isinstance(space, (spaces.Box, spaces.MultiBinary)):
        size = int(np.prod(space.shape))

        def encode_raw(value: Any, out: np.ndarray, offset: int) -> None:
            out[offset : offset + size] = np.asarray(value).ravel()

        if isinstance(space, spaces.MultiBinary):
            return size, encode_raw, np.zeros(size), np.ones(size)
        return size, encode_raw, space.low.ravel(), space.high.ravel()
    if isinstance(space, (spaces.Tuple, spaces.Dict)):
        keys = range(len(space.spaces)) if isinstance(space, spaces.Tuple) else list(space.spaces)
        children = [_encoder(space[key], what) for key in keys]
        offsets = np.concatenate([[0], np.cumsum([c[0] for c in children])]).tolist()
        encoders = [
            (key, offset, c[1]) for key, offset, c in zip(keys, offsets[:-1], children, strict=True)
        ]

        def encode_parts(value: Any, out: np.ndarray, offset: int) -> None:
            for key, part_offset, encode in encoders:
                encode(value[key], out, offset + part_offset)

        low = np.concatenate([c[2] for c in children]) if children else np.zeros(0)
        high = np.concatenate([c[3] for c in children]) if children else np.zeros(0)
        return offsets[-1], encode_parts, low, high
    raise ValueError(f"unsupported {what} space {space}; supported: {_ENCODABLE}")
