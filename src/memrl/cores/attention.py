"""Attention cores with memrl's exact episode resets: gated Transformer-XL over a sliding window
(``GTrXLCore``) and causal linear attention with a recurrent state (Katharopoulos et al. 2020,
"Transformers are RNNs"; POPGym's "FART"), below.

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

from memrl.cores.base import State, VectorCore

EPS = 1e-6  # keeps the normaliser away from zero (it is a sum of positive terms)


def _phi(u: torch.Tensor) -> torch.Tensor:
    return F.elu(u) + 1.0


class _GRUGate(nn.Module):
    """GTrXL's gating layer: ``g(x, y) = (1 - z) x + z tanh(W_g y + U_g (r x))`` with ``r =
    sigmoid(W_r y + U_r x)``, ``z = sigmoid(W_z y + U_z x - b_g)``; ``b_g`` > 0 starts it near
    the identity on x (the paper's key to stable RL training)."""

    def __init__(self, width: int, bias: float) -> None:
        super().__init__()
        self.w = nn.Linear(width, 3 * width, bias=False)
        self.u_rz = nn.Linear(width, 2 * width, bias=False)
        self.u_g = nn.Linear(width, width, bias=False)
        self.bias = bias

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w_r, w_z, w_g = self.w(y).chunk(3, -1)
        u_r, u_z = self.u_rz(x).chunk(2, -1)
        r = torch.sigmoid(w_r + u_r)
        z = torch.sigmoid(w_z + u_z - self.bias)
        return (1 - z) * x + z * torch.tanh(w_g + self.u_g(r * x))


class GTrXLCore(VectorCore):
    """Gated Transformer-XL (Parisotto et al. 2019, "Stabilizing Transformers for Reinforcement
    Learning"): input Linear(F, H), then ``num_layers`` blocks with the identity-map reordering
    and GRU-type gates,

      y = g_1(x, relu(MHA(LN(x) over the window)))      e = g_2(y, relu(MLP(LN(y))))

    Each step attends to itself and the ``memory`` steps before it (a sliding window, so one
    step at a time and a whole sequence give the same numbers), never to a step of an earlier
    episode. Positions enter as ALiBi biases (``-slope_h * distance``; Press et al. 2022)
    instead of Transformer-XL's learned relative encodings. State: ``(memory, valid)``, the
    last ``memory`` inputs of each layer (B, num_layers, memory, H) and whether each belongs to
    the current episode (B, num_layers, memory), 0 or 1."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        memory: int = 16,
        heads: int = 4,
        feedforward: int | None = None,
        gate_bias: float = 2.0,
    ) -> None:
        super().__init__(input_size, hidden_size, num_layers, memory=memory, heads=heads)
        if hidden_size % heads:
            raise ValueError(f"hidden_size={hidden_size}; expected a multiple of heads={heads}")
        H, L = hidden_size, num_layers
        self.memory, self.heads = memory, heads
        self.encoder = nn.Linear(input_size, H)
        self.norm1 = nn.ModuleList(nn.LayerNorm(H) for _ in range(L))
        self.qkv = nn.ModuleList(nn.Linear(H, 3 * H) for _ in range(L))
        self.proj = nn.ModuleList(nn.Linear(H, H) for _ in range(L))
        self.gate1 = nn.ModuleList(_GRUGate(H, gate_bias) for _ in range(L))
        self.norm2 = nn.ModuleList(nn.LayerNorm(H) for _ in range(L))
        width = feedforward or 2 * H
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(H, width), nn.ReLU(), nn.Linear(width, H)) for _ in range(L)
        )
        self.gate2 = nn.ModuleList(_GRUGate(H, gate_bias) for _ in range(L))
        slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])
        self.register_buffer("slopes", slopes)
        self.state_shapes = ((L, memory, H), (L, memory))

    def _unroll(
        self, x: torch.Tensor, state: State, is_first: torch.Tensor
    ) -> tuple[torch.Tensor, State]:
        T, B = x.shape[:2]
        M, heads, H = self.memory, self.heads, self.hidden_size
        episode = is_first.long().cumsum(0)  # (T, B); the memory's steps are episode 0
        key_episode = torch.cat([episode.new_zeros(M, B), episode])  # (M + T, B)
        key_time = torch.arange(-M, T, device=x.device)  # memory slot j holds step j - M
        distance = torch.arange(T, device=x.device)[:, None] - key_time[None]  # (T, M + T)
        window = (distance >= 0) & (distance <= M)
        h, memories, valids = self.encoder(x), [], []
        for k in range(self.num_layers):
            mem, valid = state[0][:, k].transpose(0, 1), state[1][:, k].t()  # (M, B, H), (M, B)
            key_valid = torch.cat([valid > 0.5, torch.ones_like(is_first)])  # (M + T, B)
            allowed = (
                window[..., None] & (key_episode[None] == episode[:, None]) & key_valid[None]
            )  # (T, M + T, B)
            inputs = torch.cat([mem, h])  # (M + T, B, H): what this layer attends over
            q, key, v = self.qkv[k](self.norm1[k](inputs)).chunk(3, -1)
            q = q[M:].reshape(T, B, heads, H // heads)
            key = key.reshape(M + T, B, heads, H // heads)
            v = v.reshape(M + T, B, heads, H // heads)
            scores = torch.einsum("tbnd,sbnd->bnts", q, key) / (H // heads) ** 0.5
            scores = scores - self.slopes[:, None, None] * distance.to(x.dtype)
            scores = scores.masked_fill(~allowed.permute(2, 0, 1)[:, None], float("-inf"))
            attended = torch.einsum("bnts,sbnd->tbnd", torch.softmax(scores, -1), v)
            y = self.gate1[k](h, F.relu(self.proj[k](attended.reshape(T, B, H))))
            h = self.gate2[k](y, F.relu(self.mlp[k](self.norm2[k](y))))
            last = (key_episode[T:] == episode[-1]) & key_valid[T:]  # the next memory's slots
            memories.append((inputs[T:] * last[..., None]).transpose(0, 1))  # empty slots: 0
            valids.append(last.to(x.dtype).t())
        return h, (torch.stack(memories, 1), torch.stack(valids, 1))


class LinearAttentionCore(VectorCore):
    """Stacked causal linear attention layers (module docstring); the output is the last
    layer's ``y``."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1) -> None:
        super().__init__(input_size, hidden_size, num_layers)
        self.qkv = nn.ModuleList(
            nn.Linear(input_size if k == 0 else hidden_size, 3 * hidden_size)
            for k in range(num_layers)
        )
        self.out = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_layers))
        self.state_shapes = ((num_layers, hidden_size, hidden_size), (num_layers, hidden_size))

    def _unroll(
        self, x: torch.Tensor, state: State, is_first: torch.Tensor
    ) -> tuple[torch.Tensor, State]:
        T = x.shape[0]
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
