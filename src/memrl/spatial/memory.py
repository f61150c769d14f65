"""SpatialMemory: a memrl core over feature maps, gated by a conditioning vector (the
spatial-memory spec).

``SpatialMemory(z (T, B, C, S, S), condition (T, B, D), state, is_first (T, B))`` returns the
memory maps ``h`` (T, B, K, S, S) and the new state; the state is the core's own (batch first),
so every ``memrl.cores.state`` helper works on it. ``is_first`` carries episode starts *and* the
spec's RecoveryTag: a tagged step resets the memory before it is consumed, like an episode start.

Two kinds, chosen by the core's name:

- ``conv_gru`` | ``conv_lstm`` (1-2 layers, the spec's Phase I): the conv core of
  ``memrl.cores``, with the ConditionVector acting where the spec puts it -- FiLM on the **gate
  pre-activations**, ``a <- (1 + gamma(c)) a + beta(c)`` for every gate (z, r and the candidate
  of the GRU; i, f, g, o of the LSTM), per layer and per channel, through the core's gate hook
  (:data:`memrl.cores.conv.GateHook`). FiLM starts at zero, so an untrained conditioning leaves
  the core exactly as ``core(x, ...)`` computes it.
- ``s4d`` (the spec's Phase II): the maps are average-pooled to a ``grid x grid`` grid and
  flattened (C * grid^2 features), the S4D core runs over that sequence, and its output is
  reshaped to (C, grid, grid) and upsampled back to S x S for the heads. S4D has no gates, so
  FiLM acts on its input vector instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memrl.cores import CONV_CORES, Core, State, make_core
from memrl.cores.conv import GateHook

SPATIAL_CORES = (*CONV_CORES, "s4d")


class SpatialMemory(nn.Module):
    """Memory over feature maps with FiLM conditioning (module docstring)."""

    def __init__(
        self,
        core: str,
        channels: int,
        size: int,
        hidden_channels: int = 128,
        num_layers: int = 1,
        condition_dim: int = 0,
        kernel_size: int = 3,
        s4d_grid: int = 4,
        s4d_state_size: int = 64,
    ) -> None:
        super().__init__()
        if core not in SPATIAL_CORES:
            raise ValueError(f"core={core!r}; expected one of {', '.join(SPATIAL_CORES)}")
        if not 1 <= num_layers <= 2:
            raise ValueError(f"num_layers={num_layers}; the spec's memory has 1 or 2 layers")
        if condition_dim < 0:
            raise ValueError(f"condition_dim={condition_dim}; expected >= 0")
        self.kind, self.size, self.condition_dim = core, size, condition_dim
        if core == "s4d":
            if not 1 <= s4d_grid <= size:
                raise ValueError(f"s4d_grid={s4d_grid}; expected 1..{size}")
            self.grid = s4d_grid
            width = channels * s4d_grid**2
            self.core: Core = make_core(
                "s4d",
                input_size=width,
                hidden_size=width,
                num_layers=num_layers,
                state_size=s4d_state_size,
            )
            self.out_channels = channels
            film_width = width
        else:
            self.core = make_core(
                core,
                input_channels=channels,
                hidden_channels=hidden_channels,
                spatial_size=size,
                kernel_size=kernel_size,
                num_layers=num_layers,
            )
            self.out_channels = hidden_channels
            film_width = num_layers * self.core.gate_channels
        # ConditionVector -> (gamma, beta); zero-initialised: no modulation until trained
        self.film = nn.Linear(condition_dim, 2 * film_width) if condition_dim else None
        if self.film is not None:
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        return self.core.initial_state(batch_size, device)

    def forward(
        self,
        z: torch.Tensor,
        condition: torch.Tensor | None,
        state: State,
        is_first: torch.Tensor,
    ) -> tuple[torch.Tensor, State]:
        """z (T, B, C, S, S), condition (T, B, D) or None, is_first (T, B) bool ->
        h (T, B, K, S, S) and the state after the last step."""
        if z.dim() != 5:
            raise ValueError(f"z has shape {tuple(z.shape)}; expected (T, B, C, S, S)")
        film = self._film(condition, z.shape[:2])
        if self.kind == "s4d":
            return self._s4d(z, film, state, is_first)
        hook = None if film is None else self._film_hook(film)
        return self.core(z, state, is_first, gate_hook=hook)

    def step(
        self, z_t: torch.Tensor, condition_t: torch.Tensor | None, state: State, is_first_t
    ) -> tuple[torch.Tensor, State]:
        """One step: z_t (B, C, S, S), condition_t (B, D) or None, is_first_t (B,) bool."""
        condition = None if condition_t is None else condition_t[None]
        h, state = self(z_t[None], condition, state, is_first_t[None])
        return h[0], state

    # -- helpers --------------------------------------------------------------------------------
    def _film(self, condition: torch.Tensor | None, lead: torch.Size) -> torch.Tensor | None:
        """(gamma, beta) stacked, (T, B, 2, width), or None without conditioning."""
        if self.film is None:
            if condition is not None:
                raise ValueError("condition given but the memory was built with condition_dim=0")
            return None
        if condition is None or tuple(condition.shape) != (*lead, self.condition_dim):
            got = None if condition is None else tuple(condition.shape)
            raise ValueError(f"condition has shape {got}; expected {(*lead, self.condition_dim)}")
        return self.film(condition).unflatten(-1, (2, -1))

    def _s4d(self, z, film, state, is_first):
        T, B, C = z.shape[:3]
        x = F.adaptive_avg_pool2d(z.flatten(0, 1), self.grid).view(T, B, -1)  # (T, B, C g^2)
        if film is not None:
            x = (1 + film[:, :, 0]) * x + film[:, :, 1]
        y, state = self.core(x, state, is_first)  # (T, B, C g^2)
        grid = y.reshape(T * B, C, self.grid, self.grid)
        h = F.interpolate(grid, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return h.view(T, B, C, self.size, self.size), state

    def _film_hook(self, film: torch.Tensor) -> GateHook:
        """The core's gate hook for FiLM ``film`` (T, B, 2, layers * G * K): layer k's gates
        take the k-th block of G * K channels of gamma and beta."""
        width = self.core.gate_channels  # G * K
        gamma, beta = film[..., None, None].unbind(2)  # (T, B, layers * G * K, 1, 1) each

        def hook(pre: torch.Tensor, layer: int, t: int, gates: slice) -> torch.Tensor:
            lo, hi = layer * width + gates.start, layer * width + gates.stop
            return (1 + gamma[t, :, lo:hi]) * pre + beta[t, :, lo:hi]

        return hook
