"""The rollout: each env's core state is carried across steps and rollouts and reset exactly
where an episode starts (``is_first``).

The vector env autoresets in the same step (gymnasium's SAME_STEP mode): the observation after a
terminal step is already the next episode's first one, so no transition spans two episodes and
no reset step is ever trained as a real step; a truncated episode is bootstrapped from the value
of its final observation, run through the pre-reset state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from memrl.cores import State, select_state
from memrl.rl.agent import PPOAgent
from memrl.rl.buffer import RolloutBuffer
from memrl.rl.normalize import RewardScaler


class EpisodeTracker:
    """Undiscounted returns of the episodes that end, per env."""

    def __init__(self, num_envs: int) -> None:
        self.returns = np.zeros(num_envs)
        self.finished: list[float] = []

    def update(self, rewards: np.ndarray, dones: np.ndarray) -> None:
        self.returns += rewards
        self.finished.extend(self.returns[dones].tolist())
        self.returns[dones] = 0.0

    def pop(self) -> list[float]:
        """The returns of the episodes ended since the last call."""
        out, self.finished = self.finished, []
        return out


@dataclass
class Carry:
    """What a rollout hands to the next: the envs' last observation and info, each env's core
    state and whether its next step starts an episode."""

    obs: np.ndarray
    info: dict
    state: State
    is_first: torch.Tensor  # (N,) bool
    episodes: EpisodeTracker
    reward_scaler: RewardScaler
    returns: list[float] = field(default_factory=list)  # of the episodes ended this rollout


def collect_rollout(agent: PPOAgent, envs, buffer: RolloutBuffer, carry: Carry) -> torch.Tensor:
    """Fill ``buffer`` with ``buffer.T`` steps of every env; returns the bootstrap value of the
    observation after the last step. The vector env autoresets in the same step, so the
    observation after a done is the next episode's first: it is marked ``is_first`` and the core
    resets on it. A truncated episode's reward gets ``gamma * V(final_obs)``, the value computed
    from the state that had not been reset."""
    policy, device, gamma = agent.policy, agent.device, agent.cfg.gamma
    policy.eval()
    with torch.inference_mode():
        obs = agent.obs_tensor(carry.obs, update=True)
        mask = agent.mask_tensor(carry.info)
        state, is_first = carry.state, carry.is_first
        for t in range(buffer.T):
            buffer.store_state(t, state)
            dist_params, value, next_state = policy.step(obs, state, is_first)
            dist = agent.distribution(dist_params, mask)
            action = dist.sample()
            buffer.obs[t], buffer.is_first[t], buffer.actions[t] = obs, is_first, action
            buffer.log_probs[t], buffer.values[t] = dist.log_prob(action), value
            if mask is not None:
                buffer.masks[t] = mask
            obs_np, reward_np, term_np, trunc_np, info = envs.step(agent.env_actions(action))
            done_np = term_np | trunc_np
            carry.episodes.update(reward_np, done_np)
            reward = carry.reward_scaler(
                torch.as_tensor(reward_np, dtype=torch.float32), torch.as_tensor(done_np)
            )
            truncated = np.flatnonzero(trunc_np & ~term_np)
            if len(truncated):
                final = np.stack([info["final_obs"][i] for i in truncated])
                rows = torch.as_tensor(truncated, device=device)
                _, final_value, _ = policy.step(
                    agent.obs_tensor(final, update=False),
                    select_state(next_state, rows),
                    torch.zeros(len(truncated), dtype=torch.bool, device=device),
                )
                reward[truncated] += gamma * final_value.float().cpu()
            is_first = torch.as_tensor(done_np, device=device)
            buffer.rewards[t], buffer.dones[t] = reward.to(device), is_first
            state = next_state
            obs = agent.obs_tensor(obs_np, update=True)
            mask = agent.mask_tensor(info)
        _, last_value, _ = policy.step(obs, state, is_first)
    carry.obs, carry.info, carry.state, carry.is_first = obs_np, info, state, is_first
    carry.returns = carry.episodes.pop()
    return last_value
