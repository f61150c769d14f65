"""A rollout without an environment, shared by the PPO and rollout-buffer tests."""

from __future__ import annotations

import numpy as np
import torch
from gymnasium import spaces

from memrl.rl import PPOAgent, PPOConfig, RolloutBuffer

CPU = torch.device("cpu")
OBS_SPACE = spaces.Box(-1.0, 1.0, (3,), np.float32)


def synthetic_rollout(
    action_space: spaces.Space,
    masked: bool = False,
    *,
    T: int = 12,
    N: int = 3,
    bptt_len: int = 4,
    start_probability: float = 0.2,
    seed: int = 0,
    **options,
) -> tuple[PPOAgent, RolloutBuffer]:
    """An agent and a buffer of T steps of N envs, filled as ``collect_rollout`` fills it (the
    policy's actions, log-probs, values and the state before every step) from random
    observations, rewards and episode starts (and, with ``masked``, masks allowing a random half
    of each head's actions, its first always), GAE computed."""
    torch.manual_seed(seed)
    cfg = PPOConfig(
        core="gru", hidden_size=8, num_envs=N, rollout_steps=T, bptt_len=bptt_len, **options
    )
    agent = PPOAgent(cfg, OBS_SPACE, action_space, CPU)
    head = agent.head
    mask_dim = head.num_params if masked else None
    buffer = RolloutBuffer(T, N, 3, (head.action_dim,), head.action_dtype, mask_dim, bptt_len, CPU)
    starts = torch.rand(T + 1, N) < start_probability  # is_first, and dones one step earlier
    starts[0] = True
    first_of_head = np.cumsum([0, *head.sizes[:-1]]).tolist()
    state = agent.policy.initial_state(N)
    with torch.no_grad():
        for t in range(T):
            buffer.store_state(t, state)
            obs, mask = torch.randn(N, 3), None
            if masked:
                mask = torch.rand(N, head.num_params) < 0.5
                mask[:, first_of_head] = True
                buffer.masks[t] = mask
            params, value, state = agent.policy.step(obs, state, starts[t])
            dist = agent.distribution(params, mask)
            action = dist.sample()
            buffer.obs[t], buffer.is_first[t], buffer.actions[t] = obs, starts[t], action
            buffer.log_probs[t], buffer.values[t] = dist.log_prob(action), value
            buffer.rewards[t], buffer.dones[t] = torch.randn(N), starts[t + 1]
    buffer.compute_gae(torch.zeros(N), 0.99, 0.95)
    return agent, buffer
