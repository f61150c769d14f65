"""Environments by id, the POPGym observation convention, and vector envs."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from memrl.envs import (
    FlatObservation,
    make_env,
    make_popgym_env,
    make_vector_env,
    vector_env_seeds,
)
from memrl.rl import action_head, make_distribution, to_env_actions


class TinyEnv(gym.Env):
    """Observations drawn from ``observation_space``; an episode lasts ``length`` steps; the
    reward is 0.5 + the step index; ``info["action_mask"]`` allows only action 1."""

    def __init__(self, observation_space: spaces.Space | None = None, length: int = 3) -> None:
        self.observation_space = observation_space or spaces.Discrete(3)
        self.action_space = spaces.Discrete(2)
        self.length = length

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.observation_space.seed(int(self.np_random.integers(2**31)))
        self.t = 0
        self.last_obs = self.observation_space.sample()
        return self.last_obs, {"action_mask": np.array([0, 1], np.int8)}

    def step(self, action):
        self.t += 1
        self.last_obs, reward = self.observation_space.sample(), 0.5 + self.t
        info = {"action_mask": np.array([0, 1])}
        return self.last_obs, reward, self.t >= self.length, False, info


def not_an_env():
    return 42


def test_repeat_previous_is_one_hot_observation_previous_action_and_reward():
    env = make_env("popgym/RepeatPreviousEasy", seed=3)
    raw = make_popgym_env("RepeatPreviousEasy")
    obs, _ = env.reset()
    raw_obs, _ = raw.reset(seed=3)
    assert obs.dtype == np.float32 and obs.shape == (4 + 4 + 1,) == env.observation_space.shape
    assert env.parts["previous_action"] == slice(4, 8)
    assert obs.tolist() == np.eye(4)[raw_obs].tolist() + [0.0] * 5  # null action, no reward
    rewards = []
    for action in (2, 0, 3, 1, 1, 2, 0, 3):
        obs, reward, *_ = env.step(action)
        raw_obs, raw_reward, *_ = raw.step(action)
        assert reward == raw_reward
        assert obs[:4].tolist() == np.eye(4)[raw_obs].tolist()
        assert obs[4:8].tolist() == np.eye(4)[action].tolist()
        assert obs[8] == pytest.approx(reward)
        rewards.append(reward)
    assert any(rewards)  # RepeatPrevious pays from step k = 4 on
    obs, _ = env.reset()
    assert not obs[4:].any()


def test_box_observation_popgym_env_passes_the_observation_through():
    env = make_env("popgym/PositionOnlyCartPoleEasy", seed=0)
    raw = make_popgym_env("PositionOnlyCartPoleEasy")
    obs, _ = env.reset()
    raw_obs, _ = raw.reset(seed=0)
    assert obs.shape == (2 + 2 + 1,)
    np.testing.assert_array_equal(obs[:2], raw_obs)
    obs, reward, *_ = env.step(1)
    raw_obs, *_ = raw.step(1)
    np.testing.assert_array_equal(obs[:2], raw_obs)
    assert obs[2:4].tolist() == [0.0, 1.0] and obs[4] == pytest.approx(reward)


def test_box_actions_are_clipped_and_appended_raw():
    env = make_env("popgym/PositionOnlyPendulumEasy", seed=0)
    env.reset()
    obs, *_ = env.step(np.array([10.0]))
    assert obs[env.parts["previous_action"]].tolist() == [2.0]  # the space's high


@pytest.mark.parametrize("name, nvec", [("MineSweeperEasy", [4, 4]), ("BattleshipEasy", [8, 8])])
def test_multi_discrete_action_popgym_env_with_a_two_head_policy(name, nvec):
    envs = make_vector_env(f"popgym/{name}", num_envs=3, seed=0)
    head = action_head(envs.single_action_space)
    assert head.sizes == tuple(nvec)
    obs, _ = envs.reset()
    n_obs = envs.single_observation_space.shape[0] - sum(nvec) - 1
    assert not obs[:, n_obs:].any()
    actions = make_distribution(head, torch.zeros(3, sum(nvec))).sample()
    obs, reward, *_ = envs.step(to_env_actions(head, actions))
    previous = obs[:, n_obs : n_obs + sum(nvec)]
    expected = np.concatenate([np.eye(n)[actions[:, h].numpy()] for h, n in enumerate(nvec)], 1)
    np.testing.assert_array_equal(previous, expected)
    np.testing.assert_allclose(obs[:, -1], reward, rtol=1e-6)
    envs.close()


def test_tuple_observation_encoding_matches_gymnasium_flatten():
    space = spaces.Tuple(
        (
            spaces.Discrete(3, start=-1),
            spaces.MultiDiscrete([2, 5]),
            spaces.Box(-1, 1, (2, 2)),
            spaces.MultiBinary(3),
            spaces.Dict({"a": spaces.Discrete(2), "b": spaces.Box(0, 1, (1,))}),
        )
    )
    env = FlatObservation(TinyEnv(space), previous_action_reward=False)
    assert env.observation_space.shape == (spaces.flatdim(space),)
    obs, _ = env.reset(seed=0)
    for _ in range(6):
        assert obs.dtype == np.float32
        expected = spaces.flatten(space, env.unwrapped.last_obs).astype(np.float32)
        np.testing.assert_allclose(obs, expected)
        obs, *_ = env.step(0)


def test_gymnasium_id_gets_no_previous_action_unless_asked():
    env = make_env("CartPole-v1", seed=0)
    obs, _ = env.reset()
    assert obs.shape == (4,) and obs.dtype == np.float32
    env = make_env("CartPole-v1", seed=0, previous_action_reward=True)
    env.reset()
    obs, *_ = env.step(1)
    assert obs.shape == (4 + 2 + 1,) and obs[4:].tolist() == [0.0, 1.0, 1.0]


def test_module_class_id_builds_the_users_env_with_kwargs_and_passes_the_action_mask():
    env = make_env(f"{__name__}:TinyEnv", seed=0, length=2)
    assert isinstance(env.unwrapped, TinyEnv) and env.unwrapped.length == 2
    obs, info = env.reset()
    assert obs.shape == (3,)  # not a POPGym env: no previous action by default
    assert info["action_mask"].tolist() == [0, 1]
    *_, info = env.step(1)
    assert info["action_mask"].tolist() == [0, 1]
    with pytest.raises(TypeError, match="expected a gymnasium.Env"):
        make_env(f"{__name__}:not_an_env")


@pytest.mark.parametrize(
    "env_id, message",
    [
        ("popgym/RepeatPreviousEasyy", "did you mean popgym/RepeatPreviousEasy"),
        ("popgym/Nothing", "unknown POPGym environment 'popgym/Nothing'"),
        ("CartPole-v9", "did you mean CartPole-v1"),
        ("no_such_module_xyz:Env", "cannot import module 'no_such_module_xyz'"),
        (f"{__name__}:NoSuchEnv", "has no attribute 'NoSuchEnv'"),
        ("Nonsense", "'popgym/<Name>', a registered gymnasium id"),
    ],
)
def test_unknown_ids_raise_clear_errors(env_id, message):
    with pytest.raises(ValueError, match="environment") as err:
        make_env(env_id)
    assert message in str(err.value) and env_id in str(err.value)


def test_unsupported_observation_space_raises():
    with pytest.raises(ValueError, match="unsupported observation space Text"):
        FlatObservation(TinyEnv(spaces.Text(4)))


def test_sync_vector_env_shapes_and_seeding_are_reproducible():
    def rollout(seed):
        envs = make_vector_env("popgym/RepeatPreviousEasy", num_envs=4, seed=seed)
        obs, _ = envs.reset()
        observations = [obs]
        for t in range(4):
            obs, reward, terminated, truncated, _ = envs.step(np.array([0, 1, 2, 3]) + t & 3)
            assert obs.shape == (4, 9) and obs.dtype == np.float32
            assert reward.shape == terminated.shape == truncated.shape == (4,)
            observations.append(obs)
        envs.close()
        return np.stack(observations)

    first = rollout(7)
    assert first.shape == (5, 4, 9)
    np.testing.assert_array_equal(first, rollout(7))
    assert not np.array_equal(first, rollout(8))
    assert not all(np.array_equal(first[:, 0], first[:, i]) for i in range(1, 4))  # distinct seeds

    envs = make_vector_env("popgym/RepeatPreviousEasy", num_envs=4, seed=7)
    np.testing.assert_array_equal(envs.reset(seed=vector_env_seeds(7, 4))[0], first[0])


def test_async_vector_env_matches_sync():
    sync = make_vector_env(f"{__name__}:TinyEnv", 2, seed=1, vector="sync")
    asyn = make_vector_env(f"{__name__}:TinyEnv", 2, seed=1, vector="async")
    np.testing.assert_array_equal(sync.reset()[0], asyn.reset()[0])
    for _ in range(4):
        np.testing.assert_array_equal(sync.step(np.ones(2, int))[0], asyn.step(np.ones(2, int))[0])
    sync.close()
    asyn.close()


def test_next_step_autoreset_is_what_the_docstring_says():
    envs = make_vector_env(f"{__name__}:TinyEnv", 1, seed=0, previous_action_reward=True, length=2)
    envs.reset()
    envs.step(np.array([1]))
    obs, reward, terminated, _, _ = envs.step(np.array([1]))  # t = 2: terminal
    assert terminated[0] and reward[0] == 2.5 and obs[0, -1] == 2.5
    obs, reward, terminated, truncated, info = envs.step(np.array([0]))  # ignored: a reset
    assert reward[0] == 0.0 and not terminated[0] and not truncated[0]
    assert not obs[0, 3:].any()  # the new episode's first observation: null action, no reward
    assert info["action_mask"][0].tolist() == [0, 1]
    obs, reward, *_ = envs.step(np.array([0]))
    assert reward[0] == 1.5 and obs[0, 3:5].tolist() == [1.0, 0.0]
    envs.close()


def test_vector_env_argument_errors():
    with pytest.raises(ValueError, match="'sync' or 'async'"):
        make_vector_env("CartPole-v1", 2, seed=0, vector="threads")
    with pytest.raises(ValueError, match="at least 1"):
        make_vector_env("CartPole-v1", 0, seed=0)
    with pytest.raises(ValueError, match="did you mean popgym/RepeatPreviousEasy"):
        make_vector_env("popgym/RepeatPreviousEsy", 2, seed=0, vector="async")


def test_same_step_autoreset_returns_the_next_first_observation_and_the_final_one_in_info():
    envs = make_vector_env(
        f"{__name__}:TinyEnv",
        2,
        seed=0,
        autoreset_mode="same_step",
        previous_action_reward=True,
        length=2,
    )
    envs.reset()
    envs.step(np.array([1, 1]))
    obs, reward, terminated, _, info = envs.step(np.array([1, 0]))  # terminal for both
    assert terminated.all() and reward.tolist() == [2.5, 2.5]
    assert not obs[:, 3:].any()  # already the next episodes' first observations
    assert info["_final_obs"].all()
    final = np.stack(info["final_obs"])
    assert final[:, 3:5].tolist() == [[0.0, 1.0], [1.0, 0.0]] and final[:, -1].tolist() == [2.5] * 2
    obs, reward, *_ = envs.step(np.array([0, 0]))  # a real step of the new episodes
    assert reward.tolist() == [1.5, 1.5]
    envs.close()
