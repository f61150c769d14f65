"""Rollout storage for recurrent PPO: time-major tensors, the core state before every step, GAE,
and minibatches of whole sequences (the Tamiyo recurrence spec's RecurrentRolloutBuffer; as the
R2D2 LSTM spec asks, the stored state is the whole tuple, e.g. (h, c) for the LSTM)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from memrl.cores import State


@dataclass
class SequenceBatch:
    """A minibatch of S sequences of at most L steps, time-major, with their initial core state.
    ``valid`` marks real steps; shorter sequences (a window cut by the rollout's end or, with
    ``split_episodes``, by an episode start) are padded at the end."""

    obs: torch.Tensor  # (L, S, D)
    is_first: torch.Tensor  # (L, S) bool
    actions: torch.Tensor  # (L, S, A)
    masks: torch.Tensor | None  # (L, S, M) bool, or None without action masks
    log_probs: torch.Tensor  # (L, S)
    values: torch.Tensor  # (L, S)
    advantages: torch.Tensor  # (L, S)
    returns: torch.Tensor  # (L, S)
    state: State  # each (S, ...)
    valid: torch.Tensor | None = None  # (L, S) bool, or None: every step is real
    burn_in: BurnIn | None = None

    def real(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (L, S, ...) at the real steps only: (n, ...), padding left out."""
        return x if self.valid is None else x[self.valid]


@dataclass
class BurnIn:
    """R2D2 burn-in (Kapturowski et al. 2019, section 3): the B steps before each sequence,
    replayed without gradient from the state stored at their start, re-derive the sequence's
    initial state with the current weights. Sequences starting fewer than B steps into the
    rollout have no such window (``valid`` false) and keep their stored state."""

    obs: torch.Tensor  # (B, S, D)
    is_first: torch.Tensor  # (B, S) bool
    state: State  # each (S, ...)
    valid: torch.Tensor  # (S,) bool


@dataclass
class _Plan:
    """Where the training sequences lie: start step, env and length of each, env-major."""

    t: torch.Tensor  # (K,) long
    env: torch.Tensor  # (K,) long
    length: torch.Tensor  # (K,) long


class RolloutBuffer:
    """``T`` steps of ``N`` envs, cut into training sequences of at most ``bptt_len`` steps
    (clamped to ``T``): fixed windows every ``bptt_len`` steps, the last one shorter where
    ``bptt_len`` does not divide ``T``, or with ``split_episodes`` windows that restart at every
    episode start, so that a sequence that begins an episode starts from the exact zero state and
    none holds steps of two episodes (sb3-contrib's sequences, capped at bptt_len)."""

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
        split_episodes: bool = False,
    ) -> None:
        T, N = num_steps, num_envs
        self.T, self.N, self.L, self.device = T, N, min(bptt_len, T), device
        self.burn_in, self.split_episodes = burn_in, split_episodes
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
        self.states: State = ()  # the state before every step: each (T, N, ...)

    def store_state(self, t: int, state: State) -> None:
        """Keep the state the policy had *before* step ``t``."""
        if not self.states:  # normal tensors even in the rollout's inference mode
            with torch.inference_mode(False):
                self.states = tuple(s.new_zeros(self.T, *s.shape) for s in state)
        for stored, s in zip(self.states, state, strict=True):
            stored[t] = s

    def state_at(self, t: torch.Tensor, env: torch.Tensor) -> State:
        """The stored states before steps ``t`` of envs ``env`` (both (K,) long): each (K, ...)."""
        return tuple(s[t, env] for s in self.states)

    def plan(self) -> _Plan:
        """The training sequences of this rollout (env-major)."""
        T, L = self.T, self.L
        steps = torch.arange(T, device=self.device)
        if self.split_episodes:  # steps since the episode (or the rollout) started, per env
            since = steps[:, None] - torch.where(self.is_first, steps[:, None], 0).cummax(0).values
        else:
            since = steps[:, None].expand(T, self.N)
        env, t = (since % L == 0).t().nonzero(as_tuple=True)  # env-major: t ascending per env
        flat = env * T + t
        ends = torch.cat([flat[1:], flat.new_tensor([self.N * T])])  # next start, or row's end
        return _Plan(t, env, ends - flat)

    @torch.inference_mode()  # cheaper than no_grad: ~20% of the refresh's time here
    def refresh_states(self, policy) -> None:
        """Recompute the stored states wherever a sequence (or its burn-in window) starts, with
        the current weights, unrolling the rollout from its first stored state (stale stored
        states are one source of PPO's recurrent off-policyness; R2D2 section 3)."""
        if not self.states:  # a memoryless policy: nothing to refresh
            return
        plan = self.plan()
        starts = set(plan.t.tolist())
        times = sorted(t for t in starts | {t - self.burn_in for t in starts} if t > 0)
        state, start = tuple(s[0] for s in self.states), 0
        for t in times:
            _, _, state = policy(self.obs[start:t], state, self.is_first[start:t])
            for stored, s in zip(self.states, state, strict=True):
                stored[t] = s
            start = t

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

    def minibatches(
        self, steps_per_batch: int, generator: torch.Generator | None = None
    ) -> Iterator[SequenceBatch]:
        """Shuffled minibatches of whole sequences with their stored initial states: a sequence
        joins the minibatch its first step falls in when the shuffled sequences' steps are
        counted off in ``steps_per_batch`` (exactly ``steps_per_batch / bptt_len`` sequences
        when ``bptt_len`` divides both it and ``T``)."""
        plan = self.plan()
        # as long as the longest sequence: with split episodes all may be shorter than bptt_len
        L = int(plan.length.max())  # once per epoch
        offsets = torch.arange(L, device=self.device)[:, None]  # (L, 1)
        valid = offsets < plan.length  # (L, K)
        padded = not bool(valid.all())  # windows cut short by the rollout's end or an episode
        rows = (plan.t + offsets).clamp(max=self.T - 1), plan.env.expand(L, -1)
        names = ("obs", "is_first", "actions", "log_probs", "values", "advantages", "returns")
        fields = {name: getattr(self, name)[rows] for name in names}  # (L, K, ...)
        masks = None if self.masks is None else self.masks[rows]
        state = self.state_at(plan.t, plan.env)  # (K, ...)
        burn = self._burn_in_windows(plan) if self.burn_in else None
        order = torch.randperm(len(plan.t), generator=generator).to(self.device)
        lengths = plan.length[order]
        batch = (lengths.cumsum(0) - lengths) // steps_per_batch  # by each one's first real step
        for idx in order.split([n for n in torch.bincount(batch).tolist() if n]):
            yield SequenceBatch(
                **{k: v[:, idx] for k, v in fields.items()},
                masks=None if masks is None else masks[:, idx],
                state=tuple(s[idx] for s in state),
                valid=valid[:, idx] if padded else None,
                burn_in=None
                if burn is None
                else BurnIn(
                    obs=burn.obs[:, idx],
                    is_first=burn.is_first[:, idx],
                    state=tuple(s[idx] for s in burn.state),
                    valid=burn.valid[idx],
                ),
            )

    def _burn_in_windows(self, plan: _Plan) -> BurnIn:
        """The B steps before every sequence, (B, K, ...), from the state stored before them;
        windows that would start before the rollout are marked invalid."""
        B = self.burn_in
        first = plan.t - B  # (K,)
        rows = (first + torch.arange(B, device=self.device)[:, None]).clamp(min=0), plan.env
        return BurnIn(
            obs=self.obs[rows],
            is_first=self.is_first[rows],
            state=self.state_at(first.clamp(min=0), plan.env),
            valid=first >= 0,
        )
