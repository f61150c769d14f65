"""S4D: a stack of diagonal state-space blocks (Gu, Gupta, Goel, Ré 2022, "On the
Parameterization and Initialization of Diagonal State Space Models").

Each block runs, per feature h, N/2 complex modes (conjugate symmetry, y = 2 Re(C x)):
``x_t = Abar x_{t-1} + Bbar u_t``, ``y_t = 2 Re(C x_t) + D u_t`` with ZOH discretisation, then
GELU, a Linear(H, H) mixing, a residual and an optional post-LayerNorm (the S4 block, with a
Linear instead of a GLU mixing). The same recurrence is computed three ways that agree exactly:

- ``fft``: FFT convolution with the kernel K, plus the incoming state's decaying contribution and
  the final state in closed form; used when no reset falls inside the sequence.
- ``scan``: closed form inside chunks of ``chunk_size`` steps (each episode piece of a chunk
  convolved on its own), sequential only across chunks; resets anywhere. Its cost grows with the
  most resets inside one chunk, so it suits episodes longer than a chunk.
- ``recurrent``: one step at a time; what ``step`` (T = 1) uses.

What memrl does differently: POPGym's S4D trains every sequence from a zero state and the
reference S4D has no resets; here the state is carried in and out and zeroed where ``is_first``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from memrl.cores.base import State, VectorCore, check_positive

MODES = ("auto", "fft", "scan", "recurrent")
INITS = ("lin", "inv")


def _vandermonde(dt_a: torch.Tensor, length: int) -> torch.Tensor:
    """[Re; Im] of Abar^l = exp(l dt A) for l < length, (H, 2 * N/2, L): the Vandermonde matrix of
    §3, kept real so products that only need Re(...) cost half of a complex product."""
    steps = torch.arange(length, device=dt_a.device, dtype=dt_a.real.dtype)
    magnitude = torch.exp(dt_a.real.unsqueeze(-1) * steps)  # (H, N/2, L)
    phase = dt_a.imag.unsqueeze(-1) * steps  # (H, N/2, L)
    return torch.cat([magnitude * torch.cos(phase), magnitude * torch.sin(phase)], dim=1)


def _re_dot(w: torch.Tensor, vandermonde: torch.Tensor) -> torch.Tensor:
    """2 Re(sum_n w_n Abar_n^l) (conjugate symmetry, §3): w (H, M, N/2) complex -> (H, M, L)."""
    return 2 * torch.cat([w.real, -w.imag], dim=-1) @ vandermonde


def _power_sum(u: torch.Tensor, vandermonde: torch.Tensor) -> torch.Tensor:
    """sum_l Abar^l u_l: u (H, M, L) real -> (H, M, N/2) complex."""
    re, im = (u @ vandermonde.transpose(1, 2)).chunk(2, dim=-1)
    return torch.complex(re, im)


def _fft_unroll(
    u: torch.Tensor, x0: torch.Tensor, dt_a: torch.Tensor, b_bar: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reset-free unroll of u (T, B, H) from x0 (B, H, N/2): causal FFT convolution, O(T log T).

    Powers Abar^t, t < T, are used as Abar^(jL) Abar^i with t = jL + i and L ~ sqrt(T), so no
    (H, N/2, T) tensor is ever built (memory traffic, not flops, bounds this on a CPU).
    """
    length, batch, hidden = u.shape
    size = math.isqrt(length - 1) + 1  # L >= sqrt(T)
    n_blocks = -(-length // size)  # J = ceil(T / L)
    vandermonde = _vandermonde(dt_a, size)  # (H, N, L)
    block_steps = size * torch.arange(n_blocks, device=u.device, dtype=u.dtype)
    a_blocks = torch.exp(dt_a.unsqueeze(1) * block_steps[:, None])  # (H, J, N/2): Abar^(jL)

    def over_time(w: torch.Tensor) -> torch.Tensor:
        """2 Re(sum_n w_n Abar_n^t) for t < T: w (H, M, N/2) complex -> (H, M, T)."""
        w_blocks = (w.unsqueeze(2) * a_blocks.unsqueeze(1)).flatten(1, 2)  # (H, M J, N/2)
        return _re_dot(w_blocks, vandermonde).view(hidden, -1, n_blocks * size)[..., :length]

    u_hbt = u.permute(2, 1, 0).contiguous()  # (H, B, T)
    x0 = x0.transpose(0, 1)  # (H, B, N/2)
    n_fft = 2 * length
    kernel = over_time((c * b_bar).unsqueeze(1))  # (H, 1, T): K_t, §3
    spectrum = torch.fft.rfft(u_hbt, n=n_fft) * torch.fft.rfft(kernel, n=n_fft)  # (H, B, T + 1)
    y = torch.fft.irfft(spectrum, n=n_fft)[..., :length]  # (H, B, T)
    y = y + over_time((c * torch.exp(dt_a)).unsqueeze(1) * x0)  # 2 Re(C Abar^(t+1) x0)
    # x_T = Abar^T x0 + sum_m Abar^m Bbar u_(T-1-m), m = jL + i
    u_back = F.pad(u_hbt.flip(-1), (0, n_blocks * size - length)).view(hidden, -1, size)
    inner = _power_sum(u_back, vandermonde).view(hidden, batch, n_blocks, -1)  # (H, B, J, N/2)
    to_end = (inner * a_blocks.unsqueeze(1)).sum(2)  # (H, B, N/2)
    x_last = torch.exp(length * dt_a).unsqueeze(1) * x0 + b_bar.unsqueeze(1) * to_end
    return y.permute(2, 1, 0), x_last.transpose(0, 1)


def _scan_chunks(
    u: torch.Tensor,
    is_first: torch.Tensor,
    x0: torch.Tensor,
    dt_a: torch.Tensor,
    b_bar: torch.Tensor,
    c: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """n chunks of L steps: u (H, B, n, L), is_first (B, n, L), x0 (H, B, N/2) -> y, last state."""
    hidden, batch, n, length = u.shape
    vandermonde = _vandermonde(dt_a, length)  # (H, N, L)
    seg = is_first.cumsum(-1)  # (B, n, L): resets so far inside the chunk
    lag = torch.arange(length, device=u.device)
    lag = lag[:, None] - lag[None, :]  # (L, L): t - s
    kernel = _re_dot((c * b_bar).unsqueeze(1), vandermonde)[:, 0]  # (H, L)
    toeplitz = kernel[:, lag.clamp(min=0)] * (lag >= 0)  # (H, L, L): K_(t-s), causal
    # y_t = sum_s K_(t-s) u_s over s in t's episode: convolve each episode piece of the chunk on
    # its own (G pieces, G - 1 = most inner resets in one chunk), keep y_t from t's own piece
    piece = seg - seg[..., :1]  # (B, n, L): a reset at the chunk's first step starts piece 0
    n_pieces = int(piece.max()) + 1
    in_piece = (piece.unsqueeze(-2) == torch.arange(n_pieces, device=u.device)[:, None]).to(u.dtype)
    u_pieces = (u.unsqueeze(3) * in_piece).reshape(hidden, -1, length)  # (H, B n G, L)
    y_pieces = (u_pieces @ toeplitz.transpose(1, 2)).view(hidden, batch, n, n_pieces, length)
    y = (y_pieces * in_piece).sum(3)  # (H, B, n, L)

    # what each chunk adds to the state by its end, and whether the carried state survives it
    to_end = (seg == seg[..., -1:]).to(u.dtype)  # (B, n, L): no reset in (k, L - 1]
    ends = (u * to_end).flip(-1).reshape(hidden, -1, length)  # (H, B n, L), last step first
    local_end = b_bar.unsqueeze(1) * _power_sum(ends, vandermonde)
    local_end = local_end.view(hidden, batch, n, -1)  # (H, B, n, N/2)
    survives = (seg[..., -1] == 0).to(u.dtype).unsqueeze(-1)  # (B, n, 1)
    a_bar_chunk = torch.exp(length * dt_a).unsqueeze(1)  # (H, 1, N/2): Abar^L
    starts, state = [], x0
    for local, kept in zip(
        local_end.unbind(2), survives.unbind(1), strict=True
    ):  # one backward copy
        starts.append(state)
        state = local + kept * a_bar_chunk * state
    carried = torch.stack(starts, 2).view(hidden, batch * n, -1)  # (H, B n, N/2): entering state
    from_carried = _re_dot((c * torch.exp(dt_a)).unsqueeze(1) * carried, vandermonde)
    alive = (seg == 0).to(u.dtype)  # (B, n, L): no reset in [0, t]
    return y + from_carried.view(hidden, batch, n, length) * alive, state


def _scan_unroll(
    u: torch.Tensor,
    is_first: torch.Tensor,
    x0: torch.Tensor,
    dt_a: torch.Tensor,
    b_bar: torch.Tensor,
    c: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resettable unroll of u (T, B, H): full chunks of chunk_size steps, then the remainder."""
    length, batch, hidden = u.shape
    n_full = length // chunk_size
    ys, state = [], x0.transpose(0, 1)  # (H, B, N/2)
    for start, n, size in ((0, n_full, chunk_size), (n_full * chunk_size, 1, length % chunk_size)):
        if n * size == 0:
            continue
        stop = start + n * size
        u_c = u[start:stop].reshape(n, size, batch, hidden).permute(3, 2, 0, 1)  # (H, B, n, L)
        first_c = is_first[start:stop].reshape(n, size, batch).permute(2, 0, 1)  # (B, n, L)
        y, state = _scan_chunks(u_c, first_c, state, dt_a, b_bar, c)
        ys.append(y.permute(2, 3, 1, 0).reshape(n * size, batch, hidden))
    return torch.cat(ys), state.transpose(0, 1)


def _recurrent_unroll(
    u: torch.Tensor,
    is_first: torch.Tensor,
    x: torch.Tensor,
    dt_a: torch.Tensor,
    b_bar: torch.Tensor,
    c: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t = Abar x_{t-1} + Bbar u_t, y_t = 2 Re(C x_t), one step at a time (§2, recurrent view)."""
    a_bar = torch.exp(dt_a)  # (H, N/2)
    keep = (~is_first).to(u.dtype)[..., None, None]  # (T, B, 1, 1)
    ys = []
    for t in range(u.shape[0]):
        x = a_bar * x * keep[t] + b_bar * u[t].unsqueeze(-1)  # (B, H, N/2)
        ys.append(2 * (c * x).sum(-1).real)  # (B, H)
    return torch.stack(ys), x


class S4DBlock(nn.Module):
    """One S4D block: diagonal SSM + D skip, GELU, Linear mixing, residual, optional LayerNorm."""

    def __init__(
        self, hidden_size: int, state_size: int, init: str, dt_min: float, dt_max: float, norm: bool
    ) -> None:
        super().__init__()
        n_modes = state_size // 2
        log_dt = torch.rand(hidden_size) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        n = torch.arange(n_modes, dtype=torch.float64)
        if init == "lin":  # S4D-Lin (§4): A_n = -1/2 + i pi n
            a_imag = math.pi * n
        else:  # S4D-Inv (§4): A_n = -1/2 + i N/pi (N/(2n+1) - 1)
            a_imag = state_size / math.pi * (state_size / (2 * n + 1) - 1)
        self.log_dt = nn.Parameter(log_dt)  # (H,): log dt ~ U[log dt_min, log dt_max]
        self.log_neg_a_real = nn.Parameter(torch.full((hidden_size, n_modes), math.log(0.5)))
        self.a_imag = nn.Parameter(a_imag.to(log_dt.dtype).expand(hidden_size, n_modes).clone())
        b = torch.zeros(hidden_size, n_modes, 2)
        b[..., 0] = 1.0
        self.b = nn.Parameter(b)  # (H, N/2, [re, im]): B = 1
        self.c = nn.Parameter(torch.randn(hidden_size, n_modes, 2) * math.sqrt(0.5))  # C ~ CN(0, 1)
        self.d = nn.Parameter(torch.randn(hidden_size))  # (H,)
        self.mix = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size) if norm else nn.Identity()

    def a(self) -> torch.Tensor:
        """A = -exp(log_neg_a_real) + i a_imag, (H, N/2): Re(A) < 0 keeps every mode stable (§3)."""
        return torch.complex(-torch.exp(self.log_neg_a_real), self.a_imag)

    def discretize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ZOH (§3): dt A, Bbar = (exp(dt A) - 1) / A * B, and C; each (H, N/2) complex."""
        a = self.a()
        dt_a = a * torch.exp(self.log_dt).unsqueeze(-1)
        b_bar = (torch.exp(dt_a) - 1) / a * torch.view_as_complex(self.b)
        return dt_a, b_bar, torch.view_as_complex(self.c)

    def forward(
        self, u: torch.Tensor, is_first: torch.Tensor, x0: torch.Tensor, mode: str, chunk_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """u (T, B, H), x0 (B, H, N/2) complex -> output (T, B, H), state after the last step."""
        dt_a, b_bar, c = self.discretize()
        if mode == "fft":  # a reset at t = 0 only discards the incoming state
            x0 = x0 * (~is_first[0]).to(u.dtype)[:, None, None]
            y, x_last = _fft_unroll(u, x0, dt_a, b_bar, c)
        elif mode == "scan":
            y, x_last = _scan_unroll(u, is_first, x0, dt_a, b_bar, c, chunk_size)
        else:
            y, x_last = _recurrent_unroll(u, is_first, x0, dt_a, b_bar, c)
        y = y + self.d * u  # D skip
        return self.norm(u + self.mix(F.gelu(y))), x_last


class S4DCore(VectorCore):
    """Input Linear(F, H), then ``num_layers`` S4D blocks; ``y`` is the last block's output.

    The state is one tensor (B, num_layers, H, state_size / 2, 2): real and imaginary parts of the
    complex modes. ``mode``: ``auto`` (``recurrent`` for T = 1, ``fft`` when ``is_first[1:]`` has
    no True, ``scan`` otherwise; checking that costs one host sync), or force one of the three.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        state_size: int = 64,
        init: str = "lin",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        layer_norm: bool = True,
        mode: str = "auto",
        chunk_size: int = 32,
    ) -> None:
        super().__init__(input_size, hidden_size, num_layers, prefix="S4DCore: ")
        if (
            not isinstance(state_size, int)
            or isinstance(state_size, bool)
            or state_size < 2
            or state_size % 2
        ):
            raise ValueError(
                f"S4DCore: state_size must be a positive even int (N/2 conjugate pairs), "
                f"got {state_size!r}"
            )
        if init not in INITS:
            raise ValueError(f"S4DCore: unknown init {init!r}; expected one of {', '.join(INITS)}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"S4DCore: need 0 < dt_min <= dt_max, got {dt_min=}, {dt_max=}")
        self.mode = mode
        self.chunk_size = chunk_size
        self.state_shapes = ((num_layers, hidden_size, state_size // 2, 2),)
        self.encoder = nn.Linear(input_size, hidden_size)
        self.blocks = nn.ModuleList(
            S4DBlock(hidden_size, state_size, init, dt_min, dt_max, layer_norm)
            for _ in range(num_layers)
        )

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"S4DCore: unknown mode {value!r}; expected one of {', '.join(MODES)}")
        self._mode = value

    @property
    def chunk_size(self) -> int:
        return self._chunk_size

    @chunk_size.setter
    def chunk_size(self, value: int) -> None:
        check_positive("S4DCore: ", chunk_size=value)
        self._chunk_size = value

    def _resolve_mode(self, is_first: torch.Tensor) -> str:
        if self.mode == "auto" and is_first.shape[0] == 1:
            return "recurrent"  # step(): no host sync
        inner_reset = bool(is_first[1:].any())
        if self.mode == "auto":
            return "scan" if inner_reset else "fft"
        if self.mode == "fft" and inner_reset:
            raise ValueError(
                "S4DCore: mode 'fft' cannot unroll a reset inside the sequence (is_first[1:] has "
                "True); use mode 'scan', 'recurrent' or 'auto'"
            )
        return self.mode

    def _unroll(
        self, x: torch.Tensor, state: State, is_first: torch.Tensor
    ) -> tuple[torch.Tensor, State]:
        mode = self._resolve_mode(is_first)
        h = self.encoder(x)  # (T, B, H)
        last = []
        for i, block in enumerate(self.blocks):
            x0 = torch.complex(state[0][:, i, ..., 0], state[0][:, i, ..., 1])  # (B, H, N/2)
            h, x_last = block(h, is_first, x0, mode, self.chunk_size)
            last.append(torch.view_as_real(x_last))  # (B, H, N/2, 2)
        return h, (torch.stack(last, 1),)
