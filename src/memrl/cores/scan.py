"""The resettable linear scan, and the cores whose recurrence is one: minGRU, minLSTM, LRU, FFM,
Mamba.

A linear recurrence ``h_t = a_t * h_{t-1} + b_t`` (elementwise) is what minGRU, minLSTM, LRU,
S5 and Mamba share. An episode start at t cuts the carry: ``a_t = 0``, so ``h_t = b_t`` whatever
came before -- memrl's exact reset. ``linear_scan`` runs it as a custom autograd Function: the
forward is one fused multiply-add per step into a preallocated output, and the backward is the
same recurrence run in reverse (``g_t = dL/dh_t + a_{t+1} g_{t+1}``; then ``dL/db_t = g_t``,
``dL/da_t = g_t h_{t-1}``, ``dL/dh_0 = a_0 g_0``), a few passes over (T, B, H) instead of
hundreds of small autograd nodes (see the memory-zoo note for the measurements).

minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?"): the gates depend on the
input only, so the recurrence is linear in h and trains as a scan:

  minGRU   z = sigmoid(W_z x),  h~ = W_h x,  h_t = (1 - z) h_{t-1} + z h~
  minLSTM  f = sigmoid(W_f x),  i = sigmoid(W_i x),  f' = f / (f + i),  i' = i / (f + i),
           h~ = W_h x,  h_t = f' h_{t-1} + i' h~

Layers stack (layer l's output is layer l + 1's input); the state is ``(h,)`` with h (B,
num_layers, H); the output is the last layer's h. The paper's log-space scan needs positive
values (its ``g`` activation); here the scan runs in linear space, so h~ is the plain
projection.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from memrl.cores.base import State, VectorCore


def _scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """The forward loop: one fused multiply-add per step into a preallocated output."""
    h = torch.empty_like(b)
    previous = h0
    for t in range(b.shape[0]):
        previous = torch.addcmul(b[t], a[t], previous, out=h[t])
    return h


class _LinearScan(torch.autograd.Function):
    """``h_t = a_t * h_{t-1} + b_t`` over t: a, b (T, B, H), h0 (B, H) -> h (T, B, H)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        h = _scan(a, b, h0)
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        a, h, h0 = ctx.saved_tensors
        grad_b = torch.empty_like(grad_h)
        carry = torch.zeros_like(h0)
        a_conj = a.conj()  # complex scans (LRU): autograd's conjugate convention
        for t in range(grad_h.shape[0] - 1, -1, -1):
            g = torch.add(grad_h[t], carry, out=grad_b[t])
            carry = a_conj[t] * g
        before = torch.cat([h0.unsqueeze(0), h[:-1]])  # h_{t-1}
        return grad_b * before.conj(), grad_b, carry


def linear_scan(
    a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, is_first: torch.Tensor | None = None
) -> torch.Tensor:
    """Every ``h_t = a_t * h_{t-1} + b_t`` from ``h0``: a, b (T, B, ...), h0 (B, ...), real or
    complex; where ``is_first`` (T, B) is true the carry is cut (``a_t = 0``), so ``h_t = b_t``."""
    if is_first is not None:
        real = a.real.dtype if a.is_complex() else a.dtype  # no .real: ONNX has no complex
        keep = (~is_first).to(real).view(*is_first.shape, *([1] * (a.dim() - 2)))
        a = a * keep
    if b.shape[0] == 0:
        return b.clone()
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (a, b, h0)):
        # acting: plain functional ops (no Function, no out=), which an exported graph holds
        steps, h = [], h0
        for t in range(b.shape[0]):
            h = torch.addcmul(b[t], a[t], h)
            steps.append(h)
        return torch.stack(steps)
    return _LinearScan.apply(a.contiguous(), b.contiguous(), h0.contiguous())


class _MinRNNCore(VectorCore):
    """Shared by minGRU and minLSTM: per layer one input projection to the gates and the
    candidate, then :func:`linear_scan`."""

    _gates: int  # gate projections besides the candidate

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1) -> None:
        super().__init__(input_size, hidden_size, num_layers)
        self.layers = nn.ModuleList(
            nn.Linear(input_size if k == 0 else hidden_size, (self._gates + 1) * hidden_size)
            for k in range(num_layers)
        )
        self.state_shapes = ((num_layers, hidden_size),)

    def _coefficients(self, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) of the scan from one layer's projection (T, B, (gates + 1) H)."""
        raise NotImplementedError

    def _unroll(
        self, x: torch.Tensor, state: State, is_first: torch.Tensor
    ) -> tuple[torch.Tensor, State]:
        finals = []
        for k, layer in enumerate(self.layers):
            a, b = self._coefficients(layer(x))
            x = linear_scan(a, b, state[0][:, k], is_first)
            finals.append(x[-1])
        return x, (torch.stack(finals, 1),)


class MinGRUCore(_MinRNNCore):
    """minGRU (module docstring): ``h_t = (1 - z) h_{t-1} + z W_h x``, z = sigmoid(W_z x)."""

    _gates = 1

    def _coefficients(self, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, candidate = projected.chunk(2, -1)
        z = torch.sigmoid(gate)
        return 1 - z, z * candidate


class MinLSTMCore(_MinRNNCore):
    """minLSTM (module docstring): forget and input gates normalised to sum to one."""

    _gates = 2

    def _coefficients(self, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f, i, candidate = projected.chunk(3, -1)
        # f / (f + i) with f = sigmoid(u), i = sigmoid(v), in a form that cannot overflow
        forget = torch.sigmoid(nn.functional.logsigmoid(f) - nn.functional.logsigmoid(i))
        return forget, (1 - forget) * candidate


class LRUCore(VectorCore):
    """The Linear Recurrent Unit (Orvieto et al. 2023, "Resurrecting Recurrent Neural Networks
    for Long Sequences"): input Linear(F, H), then ``num_layers`` blocks of

      x_t = lambda * x_{t-1} + gamma * (B u_t)     (N complex modes, diagonal lambda)
      y_t = Re(C x_t) + D * u_t,    block output LayerNorm(u + W GELU(y))

    with ``lambda = exp(-exp(nu) + i exp(theta))`` (|lambda| < 1 for any parameters: stable),
    initialised uniformly on the ring ``r_min <= |lambda| <= r_max``, phase in ``[0,
    max_phase]``, and ``gamma = sqrt(1 - |lambda|^2)`` normalising each mode's input. The
    recurrence runs as the complex :func:`linear_scan`. State: the modes as real pairs, (B,
    num_layers, N, 2)."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        state_size: int | None = None,
        r_min: float = 0.0,
        r_max: float = 0.99,
        max_phase: float = 6.28,
    ) -> None:
        state_size = hidden_size if state_size is None else state_size
        super().__init__(input_size, hidden_size, num_layers, state_size=state_size)
        if not 0 <= r_min < r_max < 1 or not max_phase > 0:
            raise ValueError(
                f"r_min={r_min}, r_max={r_max}, max_phase={max_phase}; expected "
                "0 <= r_min < r_max < 1 and max_phase > 0"
            )
        self.state_size = state_size
        self.encoder = nn.Linear(input_size, hidden_size)
        H, N = hidden_size, state_size
        u1, u2 = torch.rand(num_layers, N), torch.rand(num_layers, N)
        radius = torch.sqrt(u1 * (r_max**2 - r_min**2) + r_min**2)  # uniform on the ring
        self.nu_log = nn.Parameter(torch.log(-torch.log(radius)))
        self.theta_log = nn.Parameter(torch.log(max_phase * u2))
        self.gamma_log = nn.Parameter(torch.log(torch.sqrt(1 - radius**2)))
        self.b = nn.Parameter(torch.randn(num_layers, N, H, 2) / (2 * H) ** 0.5)
        self.c = nn.Parameter(torch.randn(num_layers, H, N, 2) / N**0.5)
        self.d = nn.Parameter(torch.randn(num_layers, H))
        self.mix = nn.ModuleList(nn.Linear(H, H) for _ in range(num_layers))
        self.norms = nn.ModuleList(nn.LayerNorm(H) for _ in range(num_layers))
        self.state_shapes = ((num_layers, state_size, 2),)

    def lambdas(self) -> torch.Tensor:
        """(num_layers, N) complex: ``exp(-exp(nu) + i exp(theta))``."""
        return torch.exp(torch.complex(-torch.exp(self.nu_log), torch.exp(self.theta_log)))

    def _unroll(
        self, x: torch.Tensor, state: State, is_first: torch.Tensor
    ) -> tuple[torch.Tensor, State]:
        u, lam, finals = self.encoder(x), self.lambdas(), []
        for k in range(self.num_layers):
            b = torch.view_as_complex(self.b[k].contiguous())  # (N, H)
            c = torch.view_as_complex(self.c[k].contiguous())  # (H, N)
            drive = torch.exp(self.gamma_log[k]) * (u.to(b.dtype) @ b.t())  # (T, B, N)
            x0 = torch.view_as_complex(state[0][:, k].contiguous())  # (B, N)
            modes = linear_scan(lam[k].expand_as(drive), drive, x0, is_first)
            y = (modes @ c.t()).real + self.d[k] * u
            u = self.norms[k](u + self.mix[k](torch.nn.functional.gelu(y)))
            finals.append(torch.view_as_real(modes[-1]))
        return u, (torch.stack(finals, 1),)


class FFMCore(VectorCore):
    """Fast and Forgetful Memory (Morad et al. 2023, "Reinforcement Learning with Fast and
    Forgetful Memory"), ``num_layers`` stacked. Per layer, from the input x_t:

      x^_t = W_1 x_t * sigmoid(W_2 x_t)                     (m memory traces, gated input)
      S_t  = gamma * S_{t-1} + x^_t 1_c^T                   (m x c complex, gamma_jk =
                                                             exp(-alpha_j - i omega_k))
      z_t  = W_3 [Re S_t, Im S_t]                            (the flattened traces)
      o_t  = sigmoid(W_4 x_t),   y_t = LayerNorm(z_t) * o_t + W_5 x_t * (1 - o_t)

    alpha > 0 (decay per trace; initialised so the traces' half-lives span 1 to ~1000 steps)
    and omega (frequency per context, initialised on [0, pi]) are learned. The aggregator is
    the complex :func:`linear_scan`. State: S as real pairs, (B, num_layers, m, c, 2)."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        memory_size: int = 32,
        context_size: int = 4,
    ) -> None:
        super().__init__(
            input_size, hidden_size, num_layers, memory_size=memory_size, context_size=context_size
        )
        m, c = memory_size, context_size
        widths = [input_size] + [hidden_size] * (num_layers - 1)
        self.pre = nn.ModuleList(nn.Linear(w, 2 * m) for w in widths)  # W_1, W_2
        self.post = nn.ModuleList(nn.Linear(2 * m * c, hidden_size) for _ in widths)  # W_3
        self.gate = nn.ModuleList(nn.Linear(w, 2 * hidden_size) for w in widths)  # W_4, W_5
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_size) for _ in widths)
        half_lives = torch.logspace(0, 3, m)  # steps for a trace to fall to 1/2
        self.log_alpha = nn.Parameter(
            torch.log(math.log(2) / half_lives).expand(num_layers, m).clone()
        )
        self.omega = nn.Parameter(torch.linspace(0, math.pi, c).expand(num_layers, c).clone())
        self.state_shapes = ((num_layers, m, c, 2),)

    def gammas(self) -> torch.Tensor:
        """(num_layers, m, c) complex: ``exp(-alpha_j - i omega_k)``, |gamma| < 1."""
        alpha = torch.exp(self.log_alpha)[:, :, None]
        return torch.exp(
            torch.complex(
                -alpha.expand(-1, -1, self.omega.shape[1]),
                -self.omega[:, None, :].expand(-1, alpha.shape[1], -1),
            )
        )

    def _unroll(
        self, x: torch.Tensor, state: State, is_first: torch.Tensor
    ) -> tuple[torch.Tensor, State]:
        gammas, finals = self.gammas(), []
        for k in range(self.num_layers):
            value, gate = self.pre[k](x).chunk(2, -1)
            drive = (value * torch.sigmoid(gate)).to(gammas.dtype)  # (T, B, m)
            drive = drive[..., None].expand(*drive.shape, gammas.shape[-1])  # (T, B, m, c)
            s0 = torch.view_as_complex(state[0][:, k].contiguous())  # (B, m, c)
            traces = linear_scan(gammas[k].expand_as(drive), drive, s0, is_first)
            z = self.post[k](torch.cat([traces.real, traces.imag], -1).flatten(-2))
            out_gate, skip = self.gate[k](x).chunk(2, -1)
            o = torch.sigmoid(out_gate)
            x = self.norms[k](z) * o + skip * (1 - o)
            finals.append(torch.view_as_real(traces[-1]))
        return x, (torch.stack(finals, 1),)


class MambaCore(VectorCore):
    """A selective state-space block in the manner of Mamba (Gu & Dao 2023, "Mamba: Linear-Time
    Sequence Modeling with Selective State Spaces"), pure PyTorch, ``num_layers`` stacked with
    residuals. Per layer, with E = hidden_size channels and N = state_size:

      u, g = W_in x                                   (E each)
      u    = silu(causal depthwise conv over the last ``conv_size`` steps of u)
      dt   = softplus(W_dt u),  B_t = W_B u,  C_t = W_C u          (E; N; N)
      h_t  = exp(dt * A) * h_{t-1} + (dt * u) B_t^T   (E x N, A = -exp(A_log) < 0: the decay
                                                       depends on the input: "selective")
      y_t  = W_out((h_t C_t + D * u) * silu(g)),      block output x + y_t

    An episode start resets h and the convolution's window (nothing before the start enters).
    The scan is :func:`linear_scan` over (E, N) per env. State: ``(h, window)``, h (B,
    num_layers, E, N), window (B, num_layers, conv_size - 1, E): the last inputs of the conv."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        state_size: int = 16,
        conv_size: int = 4,
    ) -> None:
        super().__init__(
            input_size, hidden_size, num_layers, state_size=state_size, conv_size=conv_size
        )
        E, N = hidden_size, state_size
        self.conv_size = conv_size
        self.encoder = nn.Linear(input_size, E)
        self.w_in = nn.ModuleList(nn.Linear(E, 2 * E) for _ in range(num_layers))
        self.conv = nn.Parameter(torch.randn(num_layers, conv_size, E) / conv_size**0.5)
        self.conv_bias = nn.Parameter(torch.zeros(num_layers, E))
        self.w_dt = nn.ModuleList(nn.Linear(E, E) for _ in range(num_layers))
        self.w_bc = nn.ModuleList(nn.Linear(E, 2 * N, bias=False) for _ in range(num_layers))
        # S4D-real initialisation of A: -(1, 2, ..., N) for every channel
        a = torch.arange(1, N + 1, dtype=torch.float32).expand(num_layers, E, N)
        self.a_log = nn.Parameter(torch.log(a).clone())
        self.d = nn.Parameter(torch.ones(num_layers, E))
        self.w_out = nn.ModuleList(nn.Linear(E, E) for _ in range(num_layers))
        self.state_shapes = ((num_layers, E, N), (num_layers, conv_size - 1, E))

    def _conv(
        self, k: int, u: torch.Tensor, window: torch.Tensor, is_first: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise conv of u (T, B, E) after the window (B, K-1, E), blind to steps of
        an earlier episode; returns the output and the next window."""
        T, K = u.shape[0], self.conv_size
        timeline = torch.cat([window.transpose(0, 1), u])  # (K-1+T, B, E)
        episode = torch.cat([is_first.new_zeros(K - 1, is_first.shape[1]), is_first]).long()
        episode = episode.cumsum(0)  # (K-1+T, B): the window's steps are episode 0
        out = self.conv_bias[k].expand_as(u)
        for lag in range(K):  # output t (timeline K-1+t) sees timeline K-1+t-lag
            seen = timeline[K - 1 - lag : K - 1 - lag + T]
            same = (episode[K - 1 - lag : K - 1 - lag + T] == episode[K - 1 :]).to(u.dtype)
            out = out + self.conv[k, K - 1 - lag] * seen * same[..., None]
        last = (episode[T:] == episode[-1]).to(u.dtype)[..., None]  # the next window's steps
        return out, (timeline[T:] * last).transpose(0, 1)

    def _unroll(
        self, x: torch.Tensor, state: State, is_first: torch.Tensor
    ) -> tuple[torch.Tensor, State]:
        h, hs, windows = self.encoder(x), [], []
        for k in range(self.num_layers):
            u, g = self.w_in[k](h).chunk(2, -1)
            u, window = self._conv(k, u, state[1][:, k], is_first)
            u = F.silu(u)
            dt = F.softplus(self.w_dt[k](u))  # (T, B, E)
            b, c = self.w_bc[k](u).chunk(2, -1)  # (T, B, N) each
            decay = torch.exp(dt[..., None] * -torch.exp(self.a_log[k]))  # (T, B, E, N)
            drive = (dt * u)[..., None] * b[:, :, None, :]
            modes = linear_scan(decay, drive, state[0][:, k], is_first)  # (T, B, E, N)
            y = (modes * c[:, :, None, :]).sum(-1) + self.d[k] * u
            h = h + self.w_out[k](y * F.silu(g))
            hs.append(modes[-1])
            windows.append(window)
        return h, (torch.stack(hs, 1), torch.stack(windows, 1))
