"""RecurrentActorCritic (the Tamiyo recurrence spec's): encoder MLP -> memory core -> actor
head(s) and critic head.

Only the core's output ``y`` reaches the heads (for the LSTM that is ``h``; ``c`` stays in the
state, as the R2D2 LSTM spec asks). ``--core none`` is the feed-forward baseline on the same
code path. With ``separate_critic`` the critic has its own encoder and core; the state is then
the actor's state tuple followed by the critic's, so buffers still see one tuple of batch-first
tensors.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from memrl.cores import State, make_core, unroll_together


def _layer(in_size: int, out_size: int, gain: float = math.sqrt(2)) -> nn.Linear:
    layer = nn.Linear(in_size, out_size)
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class _Memory(nn.Module):
    """Encoder MLP followed by a core."""

    def __init__(
        self, obs_dim: int, core: str, hidden_size: int, num_layers: int, **core_options
    ) -> None:
        super().__init__()
        self.encoder = nn.Sequential(_layer(obs_dim, hidden_size), nn.Tanh())
        self.core = make_core(
            core,
            input_size=hidden_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            **core_options,
        )

    def forward(self, obs: torch.Tensor, state: State, is_first: torch.Tensor):
        return self.core(self.encoder(obs), state, is_first)


class RecurrentActorCritic(nn.Module):
    """``forward(obs (T, B, D), state, is_first (T, B))`` -> action params (T, B, P), values
    (T, B), new state. ``step`` is the same for one step (B, D). ``core_options`` go to
    ``make_core`` (e.g. ``init`` for gru/lstm)."""

    def __init__(
        self,
        obs_dim: int,
        param_size: int,
        core: str = "gru",
        hidden_size: int = 128,
        num_layers: int = 1,
        separate_critic: bool = False,
        gaussian_dim: int = 0,
        **core_options,
    ) -> None:
        super().__init__()
        self.actor_memory = _Memory(obs_dim, core, hidden_size, num_layers, **core_options)
        self.critic_memory = (
            _Memory(obs_dim, core, hidden_size, num_layers, **core_options)
            if separate_critic
            else None
        )
        out = self.actor_memory.core.output_size
        self.actor = _layer(out, param_size, gain=0.01)
        self.critic = _layer(out, 1, gain=1.0)
        # state-independent log-std of a diagonal Gaussian (Box actions)
        self.log_std = nn.Parameter(torch.zeros(gaussian_dim)) if gaussian_dim else None
        self._n_actor_state = len(self.actor_memory.core.state_shapes)

    def initial_state(self, batch_size: int, device: torch.device | None = None) -> State:
        state = self.actor_memory.core.initial_state(batch_size, device=device)
        if self.critic_memory is not None:
            state += self.critic_memory.core.initial_state(batch_size, device=device)
        return state

    def forward(
        self, obs: torch.Tensor, state: State, is_first: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, State]:
        if self.critic_memory is None:
            y, state = self.actor_memory(obs, state, is_first)
            return self.actor(y), self.critic(y).squeeze(-1), state
        # both memories in one fused unroll where the core allows (one op per step for both)
        memories = (self.actor_memory, self.critic_memory)
        (y, actor_state), (y_critic, critic_state) = unroll_together(
            [m.core for m in memories],
            [m.encoder(obs) for m in memories],
            [state[: self._n_actor_state], state[self._n_actor_state :]],
            is_first,
        )
        return self.actor(y), self.critic(y_critic).squeeze(-1), actor_state + critic_state

    def step(
        self, obs: torch.Tensor, state: State, is_first: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, State]:
        params, values, state = self(obs.unsqueeze(0), state, is_first.unsqueeze(0))
        return params[0], values[0], state
