"""Causal linear attention with a recurrent state (Katharopoulos et al. 2020, "Transformers are
RNNs"; POPGym's "FART"), with memrl's exact episode resets.

Per layer, with ``phi(u) = elu(u) + 1`` (positive features) and q, k, v linear maps of the input:

  S_t = S_{t-1} + phi(k_t) v_t^T        (H x H)      z_t = z_{t-1} + phi(k_t)      (H)
  y_t = W_o (S_t^T phi(q_t) / (z_t . phi(q_t)))

and at an episode start S and z restart from zero before step t. The state is ``(S, z)``: S (B,
num_layers, H, H), z (B, num_layers, H). A sequence runs in the parallel form: ``y_t`` from the
``(T, T)`` scores ``phi(q_t) . phi(k_s)`` masked to the steps s <= t of t's episode, plus the
incoming state where no reset came before t, so nothing of size ``(T, B, H, H)`` is ever built;
one step is its T = 1 case. It equals the recurrence above step by step (tested).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from memrl.cores.base import Core, State, check_positive

EPS = 1e-6  # keeps the normaliser away from zero (it is a sum of positive terms)


def _phi(u: torch.Tensor) -> torch.Tensor:
    return F.elu(u) + 1.0


class LinearAttentionCore(Core):
    """Stacked causal linear attention layers (module docstring); the output is the last
    layer's ``y``."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1) -> None:
        super().__init__()
        check_positive(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers)
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.qkv = nn.ModuleList(
            nn.Linear(input_size if k == 0 else hidden_size, 3 * hidden_size)
            for k in range(num_layers)
        )
        self.out = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_layers))
        self.feature_shape = (input_size,)
        self.output_shape = (hidden_size,)
        self.state_shapes = ((num_layers, hidden_size, hidden_size), (num_layers, hidden_size))

    @property
    def output_size(self) -> int:
        return self.hidden_size

    def _unroll(
        self, x: torch.Tensor, state: State, is_first: torch.Tensor
    ) -> tuple[torch.Tensor, State]:
        T = x.shape[0]
        if T == 0:
            return x.new_zeros(*x.shape[:2], self.hidden_size), state
        episode = is_first.long().cumsum(0)  # (T, B): which episode of the window each step is
        same = episode[:, None] == episode[None]  # (T, T, B): t and s in one episode
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[..., None]
        mask = (same & causal).to(x.dtype)  # (T, S, B)
        carried = (episode == 0).to(x.dtype)  # (T, B): no reset yet, the incoming state counts
        last = (episode == episode[-1]).to(x.dtype)  # (T, B): steps of the last episode
        finals_s, finals_z = [], []
        for k, (qkv, out) in enumerate(zip(self.qkv, self.out, strict=True)):
            q, key, v = qkv(x).chunk(3, -1)
            q, key = _phi(q), _phi(key)  # (T, B, H)
            s0, z0 = state[0][:, k], state[1][:, k]  # (B, H, H), (B, H)
            scores = torch.einsum("tbh,sbh->tsb", q, key) * mask  # (T, S, B)
            numerator = torch.einsum("tsb,sbh->tbh", scores, v)
            numerator = numerator + carried[..., None] * torch.einsum("tbh,bhg->tbg", q, s0)
            denominator = scores.sum(1) + carried * torch.einsum("tbh,bh->tb", q, z0)
            x = out(numerator / (denominator[..., None] + EPS))
            through = (episode[-1] == 0).to(x.dtype)  # (B,): no reset in the window
            finals_s.append(
                through[:, None, None] * s0 + torch.einsum("tbh,tbg->bhg", key * last[..., None], v)
            )
            finals_z.append(through[:, None] * z0 + (key * last[..., None]).sum(0))
        return x, (torch.stack(finals_s, 1), torch.stack(finals_z, 1))
