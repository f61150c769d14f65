"""Spatial memory cores: ``ConvGRUCore`` and ``ConvLSTMCore`` over (C, H, W) feature maps.

Every gate is a 'same'-padded convolution of ``[h, x]``, split into its x part and its h part:
the x part of all ``T`` steps is ONE convolution over (T*B, C, H, W) per layer; only the h part
runs per step. Layers run one after the other over the whole sequence (a layer's output maps are
the next layer's input). State: (B, num_layers, K, H, W) per tensor, batch first.

``core(x, state, is_first, gate_hook=hook)`` (and ``core.step``) lets a caller transform the
gate pre-activations of every step before their nonlinearities -- e.g. FiLM conditioning,
``a <- (1 + gamma) a + beta`` -- without re-implementing the cell: see :data:`GateHook`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch
from torch import nn

from memrl.cores.base import Core, State, check_positive

GateHook = Callable[[torch.Tensor, int, int, slice], torch.Tensor]
"""``hook(pre, layer, t, gates) -> pre``: transform the gate pre-activations ``pre``
(B, n * K, H, W) of ``layer`` at step ``t`` of the unroll (0 for ``step``) before their
nonlinearities; ``gates`` is the slice of the layer's ``core.gate_channels`` (G * K, in the
order of its x convolution) that ``pre`` holds. ConvGRU calls it twice per step, for (z, r) with
``slice(0, 2K)`` and for the candidate h~ with ``slice(2K, 3K)`` (it depends on r); ConvLSTM
once, for (i, f, g, o) with ``slice(0, 4K)``. The result must keep ``pre``'s shape."""


def _no_hook(pre: torch.Tensor, layer: int, t: int, gates: slice) -> torch.Tensor:
    return pre


def _pair(spatial_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    size = (spatial_size, spatial_size) if isinstance(spatial_size, int) else tuple(spatial_size)
    if len(size) != 2 or not all(isinstance(s, int) and s >= 1 for s in size):
        raise ValueError(
            f"spatial_size must be a positive int or (height, width), got {spatial_size!r}"
        )
    return size  # type: ignore[return-value]


class _ConvRecurrentCore(Core):
    """What both conv cores share: sizes, convolutions, the layer-by-layer unroll."""

    _x_gates: int  # gate blocks of the x convolution
    _n_state: int  # tensors in the state: 1 for (h,), 2 for (h, c)

    def __init__(
        self,
        input_channels: int,
        hidden_channels: int,
        spatial_size: int | tuple[int, int],
        kernel_size: int = 3,
        num_layers: int = 1,
    ) -> None:
        super().__init__()
        check_positive(
            input_channels=input_channels,
            hidden_channels=hidden_channels,
            kernel_size=kernel_size,
            num_layers=num_layers,
        )
        height, width = _pair(spatial_size)
        self.input_channels, self.hidden_channels = input_channels, hidden_channels
        self.kernel_size, self.num_layers = kernel_size, num_layers
        self.feature_shape = (input_channels, height, width)
        self.output_shape = (hidden_channels, height, width)
        self.gate_channels = self._x_gates * hidden_channels  # a layer's gate pre-activations
        self.state_shapes = ((num_layers, hidden_channels, height, width),) * self._n_state
        K = hidden_channels
        self.x_convs = nn.ModuleList(
            nn.Conv2d(
                input_channels if k == 0 else K, self._x_gates * K, kernel_size, padding="same"
            )
            for k in range(num_layers)
        )
        self._build_recurrent_convs()
        self.to(memory_format=torch.channels_last)  # ~10% faster oneDNN convolutions on CPU

    @abc.abstractmethod
    def _build_recurrent_convs(self) -> None:
        """Create the h-part convolutions (and adjust the x-part, e.g. a gate bias)."""

    def _h_convs(self, out_gates: int) -> nn.ModuleList:
        """One bias-free 'same' convolution K -> out_gates * K per layer."""
        K = self.hidden_channels
        return nn.ModuleList(
            nn.Conv2d(K, out_gates * K, self.kernel_size, padding="same", bias=False)
            for _ in range(self.num_layers)
        )

    @property
    def output_channels(self) -> int:
        return self.hidden_channels

    def forward(
        self,
        x: torch.Tensor,
        state: State,
        is_first: torch.Tensor,
        gate_hook: GateHook | None = None,
    ) -> tuple[torch.Tensor, State]:
        """Unroll over a sequence (:meth:`Core.forward`), ``gate_hook`` (:data:`GateHook`)
        applied to every step's gate pre-activations; None leaves them as they are."""
        self._check(x, state, is_first, sequence=True)
        return self._unroll(x, tuple(state), is_first, gate_hook or _no_hook)

    def step(
        self,
        x_t: torch.Tensor,
        state: State,
        is_first_t: torch.Tensor,
        gate_hook: GateHook | None = None,
    ) -> tuple[torch.Tensor, State]:
        """One step (:meth:`Core.step`); ``gate_hook`` is called with ``t = 0``."""
        self._check(x_t, state, is_first_t, sequence=False)
        hook = gate_hook or _no_hook
        y, state = self._unroll(x_t.unsqueeze(0), tuple(state), is_first_t.unsqueeze(0), hook)
        return y[0], state

    def _unroll(
        self,
        x: torch.Tensor,
        state: State,
        is_first: torch.Tensor,
        gate_hook: GateHook = _no_hook,
    ) -> tuple[torch.Tensor, State]:
        T, B = is_first.shape
        if T == 0:
            return x.new_zeros(0, B, *self.output_shape), state
        keep = (~is_first).to(x.dtype).view(T, B, 1, 1, 1)
        finals: list[list[torch.Tensor]] = [[] for _ in state]
        for k, x_conv in enumerate(self.x_convs):
            x_proj = x_conv(x.flatten(0, 1)).unflatten(0, (T, B))  # (T, B, G*K, H, W)
            # unbind/split, not indexing: their backward stacks/concatenates once instead of
            # zero-filling a full-size gradient per step
            x_steps = x_proj.unbind(0)
            ys, layer_state = [], tuple(s.unbind(1)[k] for s in state)
            for t in range(T):
                layer_state = tuple(s * keep[t] for s in layer_state)
                layer_state = self._cell(k, t, x_steps[t], layer_state, gate_hook)
                ys.append(layer_state[0])
            x = torch.stack(ys)  # (T, B, K, H, W)
            for final, s in zip(finals, layer_state, strict=True):
                final.append(s)
        return x, tuple(torch.stack(f, 1) for f in finals)

    @abc.abstractmethod
    def _cell(
        self, k: int, t: int, x_proj: torch.Tensor, state: State, gate_hook: GateHook
    ) -> State:
        """Step ``t`` of layer ``k``: ``x_proj`` is this step's x part of every gate."""


class ConvGRUCore(_ConvRecurrentCore):
    """ConvGRU, exactly the equations of the spatial-memory spec ('same' padding, biases in
    the x part)::

        z = σ(W_z * [h, x]),  r = σ(W_r * [h, x]),
        h~ = tanh(W_h * [r ⊙ h, x]),  h = (1 - z) ⊙ h + z ⊙ h~

    State ``(h,)``, h (B, num_layers, K, H, W); ``y`` is the last layer's h.
    """

    _x_gates, _n_state = 3, 1  # x convolution: (z, r, h~)

    def _build_recurrent_convs(self) -> None:
        self.h_convs_zr, self.h_convs_n = self._h_convs(2), self._h_convs(1)

    def _cell(
        self, k: int, t: int, x_proj: torch.Tensor, state: State, gate_hook: GateHook
    ) -> State:
        (h,) = state
        K = self.hidden_channels
        x_zr, x_n = x_proj.split([2 * K, K], 1)
        zr = gate_hook(x_zr + self.h_convs_zr[k](h), k, t, slice(0, 2 * K))
        z, r = torch.sigmoid(zr).chunk(2, 1)  # (B, K, H, W) each
        h_new = torch.tanh(gate_hook(x_n + self.h_convs_n[k](r * h), k, t, slice(2 * K, 3 * K)))
        return (torch.lerp(h, h_new, z),)


class ConvLSTMCore(_ConvRecurrentCore):
    """ConvLSTM (Shi et al. 2015) without peephole connections, forget-gate bias 1::

        [i, f, g, o] = W * [h, x] + b,  c = σ(f) ⊙ c + σ(i) ⊙ tanh(g),  h = σ(o) ⊙ tanh(c)

    State ``(h, c)``, each (B, num_layers, K, H, W); ``y`` is the last layer's h.
    """

    _x_gates, _n_state = 4, 2  # x convolution: (i, f, g, o)

    def _build_recurrent_convs(self) -> None:
        self.h_convs = self._h_convs(4)
        K = self.hidden_channels
        with torch.no_grad():
            for conv in self.x_convs:
                conv.bias[K : 2 * K] = 1.0  # forget gate

    def _cell(
        self, k: int, t: int, x_proj: torch.Tensor, state: State, gate_hook: GateHook
    ) -> State:
        h, c = state
        pre = gate_hook(x_proj + self.h_convs[k](h), k, t, slice(0, 4 * self.hidden_channels))
        i, f, g, o = pre.chunk(4, dim=1)  # (B, K, H, W) each
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
