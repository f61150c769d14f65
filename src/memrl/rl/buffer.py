"""Rollout storage for recurrent PPO: time-major tensors, the core state at the start of every
training sequence, GAE, and minibatches of whole sequences (seed 002's RecurrentRolloutBuffer;
seed 004: the stored state is the whole tuple, e.g. (h, c) for the LSTM)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from memrl.cores import State


@dataclass
class SequenceBatch:
    """A minibatch of S sequences of L steps, time-major, with their initial core state."""

    obs: torch.Tensor  # (L, S, D)
    is_first: torch.Tensor  # (L, S) bool
    actions: torch.Tensor  # (L, S, A)
    masks: torch.Tensor | None  # (L, S, M) bool, or None without action masks
    log_probs: torch.Tensor  # (L, S)
    values: torch.Tensor  # (L, S)
    advantages: torch.Tensor  # (L, S)
    returns: torch.Tensor  # (L, S)
    state: State  # each (S, ...)
    burn_in: BurnIn | None = None


@dataclass
class BurnIn:
    """R2D2 burn-in (Kapturowski et al. 2019, section 3): the B steps before each sequence,
    replayed without gradient from the state stored at their start, re-derive the sequence's
    initial state with the current weights. Sequences at a rollout's start have no steps
    before them (``valid`` false) and keep their stored state."""

    obs: torch.Tensor  # (B, S, D)
    is_first: torch.Tensor  # (B, S) bool
    state: State  # each (S, ...)
    valid: torch.Tensor  # (S,) bool


class RolloutBuffer:
    """``T`` steps of ``N`` envs, cut into ``T // bptt_len`` sequences per env."""

    def __init__(
        self,
        num_steps: int,
        num_envs: int,
        obs_dim: int,
        action_shape: tuple[int, ...],
        action_dtype: torch.dtype,
        mask_dim: int | None,
        bptt_len: int,
        device: torch.device,
        burn_in: int = 0,
    ) -> None:
        if num_steps % bptt_len:
            raise ValueError(f"rollout_steps={num_steps} must be a multiple of bptt_len={bptt_len}")
        T, N = num_steps, num_envs
        self.T, self.N, self.L, self.device = T, N, bptt_len, device
        f32 = dict(device=device, dtype=torch.float32)
        self.obs = torch.zeros(T, N, obs_dim, **f32)
        self.is_first = torch.zeros(T, N, dtype=torch.bool, device=device)
        self.actions = torch.zeros(T, N, *action_shape, dtype=action_dtype, device=device)
        self.masks = (
            None
            if mask_dim is None
            else torch.ones(T, N, mask_dim, dtype=torch.bool, device=device)
        )
        self.log_probs = torch.zeros(T, N, **f32)
        self.values = torch.zeros(T, N, **f32)
        self.rewards = torch.zeros(T, N, **f32)
        self.dones = torch.zeros(T, N, dtype=torch.bool, device=device)
        self.advantages = torch.zeros(T, N, **f32)
        self.returns = torch.zeros(T, N, **f32)
        if not 0 <= burn_in <= bptt_len:
            raise ValueError(f"burn_in={burn_in}; expected 0 <= burn_in <= bptt_len={bptt_len}")
        self.burn_in = burn_in
        self.states: list[State] = [()] * (T // bptt_len)  # state at each sequence start
        self.burn_states: list[State] = [()] * (T // bptt_len)  # ... and B steps before it

    def store_state(self, t: int, state: State) -> None:
        """Keep the state the policy had *before* step ``t`` (a sequence start)."""
        self.states[t // self.L] = tuple(s.clone() for s in state)

    def store_burn_in_state(self, t: int, state: State) -> None:
        """Keep the state before step ``t`` if a burn-in window starts there."""
        if self.burn_in and (t + self.burn_in) % self.L == 0 and t + self.burn_in < self.T:
            self.burn_states[(t + self.burn_in) // self.L] = tuple(s.clone() for s in state)

    @torch.no_grad()
    def refresh_states(self, policy) -> None:
        """Recompute the stored states of sequences 1.. with the current weights, unrolling the
        rollout from its first stored state (stale stored states are one source of PPO's
        recurrent off-policyness; R2D2 section 3)."""
        state = self.states[0]
        for k in range(1, len(self.states)):
            window = slice((k - 1) * self.L, k * self.L)
            _, _, state = policy(self.obs[window], state, self.is_first[window])
            self.states[k] = state

    def compute_gae(self, last_value: torch.Tensor, gamma: float, lam: float) -> None:
        """GAE(lambda). ``dones[t]``: the transition at t ended its episode (a truncation's
        bootstrap value is already folded into its reward), so nothing flows across it."""
        next_value, next_adv = last_value, torch.zeros_like(last_value)
        for t in range(self.T - 1, -1, -1):
            live = (~self.dones[t]).float()
            delta = self.rewards[t] + gamma * live * next_value - self.values[t]
            next_adv = delta + gamma * lam * live * next_adv
            self.advantages[t] = next_adv
            next_value = self.values[t]
        self.returns = self.advantages + self.values

    def _sequences(self, x: torch.Tensor) -> torch.Tensor:
        """(T, N, ...) -> (L, K*N, ...) with sequence index k*N + n."""
        K = self.T // self.L
        x = x.view(K, self.L, self.N, *x.shape[2:]).transpose(0, 1)
        return x.reshape(self.L, K * self.N, *x.shape[3:])

    def minibatches(
        self, sequences_per_batch: int, generator: torch.Generator | None = None
    ) -> Iterator[SequenceBatch]:
        """Shuffled minibatches of whole sequences with their stored initial states."""
        fields = {
            name: self._sequences(getattr(self, name))
            for name in (
                "obs",
                "is_first",
                "actions",
                "log_probs",
                "values",
                "advantages",
                "returns",
            )
        }
        masks = None if self.masks is None else self._sequences(self.masks)
        state = tuple(torch.cat(parts) for parts in zip(*self.states, strict=True))  # (K*N, ...)
        burn = self._burn_in_windows() if self.burn_in else None
        count = fields["obs"].shape[1]
        order = torch.randperm(count, generator=generator).to(self.device)
        for start in range(0, count, sequences_per_batch):
            idx = order[start : start + sequences_per_batch]
            yield SequenceBatch(
                **{k: v[:, idx] for k, v in fields.items()},
                masks=None if masks is None else masks[:, idx],
                state=tuple(s[idx] for s in state),
                burn_in=None
                if burn is None
                else BurnIn(
                    obs=burn.obs[:, idx],
                    is_first=burn.is_first[:, idx],
                    state=tuple(s[idx] for s in burn.state),
                    valid=burn.valid[idx],
                ),
            )

    def _burn_in_windows(self) -> BurnIn:
        """The B steps before every sequence, (B, K*N, ...); zeros before the rollout."""
        B, K = self.burn_in, self.T // self.L

        def windows(x: torch.Tensor) -> torch.Tensor:
            padded = torch.cat([x.new_zeros(B, *x.shape[1:]), x])  # padded[t + B] = x[t]
            steps = torch.stack([padded[k * self.L : k * self.L + B] for k in range(K)], 1)
            return steps.reshape(B, K * self.N, *x.shape[2:])  # (B, K*N, ...)

        first_states = self.states[0]
        states = [first_states, *self.burn_states[1:]]
        valid = torch.ones(K, self.N, dtype=torch.bool, device=self.device)
        valid[0] = False
        return BurnIn(
            obs=windows(self.obs),
            is_first=windows(self.is_first),
            state=tuple(torch.cat(parts) for parts in zip(*states, strict=True)),
            valid=valid.reshape(-1),
        )
