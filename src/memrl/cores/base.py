"""The core protocol: one recurrent-memory API for every pipeline.

Sequences are time-major: ``x`` is ``(T, B, *features)`` and ``is_first`` is ``(T, B)`` bool,
true where step ``t`` starts a new episode. Wherever ``is_first[t, b]`` is true the core resets
state ``b`` to its initial value (zeros, for every core here) *before* consuming ``x[t, b]``,
whatever state was passed in. A state is a tuple of tensors with the batch dimension first, so a
buffer can store, index, concatenate and detach the state of any core without knowing which one
it is (``memrl.cores.state``).
"""

from __future__ import annotations

import abc

import torch
from torch import nn

State = tuple[torch.Tensor, ...]


class Core(nn.Module, abc.ABC):
    """Base class of every memory core.

    Subclasses set ``feature_shape`` (the trailing shape of one input step), ``output_shape`` and
    ``state_shapes`` (per batch element, one entry per state tensor) and implement ``_unroll``.
    ``forward`` and ``step`` check their inputs here, at the boundary, so a wrong shape, dtype or
    device fails with a message that names it instead of deep inside a kernel.
    """

    feature_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    state_shapes: tuple[tuple[int, ...], ...]

    @property
    def _reference(self) -> torch.Tensor | None:
        return next(self.parameters(), None)

    def initial_state(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> State:
        """Zeros of the right shapes: ``tuple`` of ``(batch_size, *shape)`` tensors."""
        if not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"batch_size must be a non-negative int, got {batch_size!r}")
        ref = self._reference
        if device is None:
            device = ref.device if ref is not None else torch.device("cpu")
        if dtype is None:
            dtype = ref.dtype if ref is not None else torch.get_default_dtype()
        return tuple(
            torch.zeros(batch_size, *shape, device=device, dtype=dtype)
            for shape in self.state_shapes
        )

    def forward(
        self, x: torch.Tensor, state: State, is_first: torch.Tensor
    ) -> tuple[torch.Tensor, State]:
        """Unroll over a sequence: ``x`` (T, B, *features), ``is_first`` (T, B) bool.

        Returns ``y`` (T, B, *output_shape) and the state after the last step.
        """
        self._check(x, state, is_first, sequence=True)
        if x.shape[0] == 0 or x.shape[1] == 0:  # no step or no sequence: nothing to run
            return x.new_zeros(*x.shape[:2], *self.output_shape), tuple(state)
        return self._unroll(x, tuple(state), is_first)

    def step(
        self, x_t: torch.Tensor, state: State, is_first_t: torch.Tensor
    ) -> tuple[torch.Tensor, State]:
        """One step: ``x_t`` (B, *features), ``is_first_t`` (B,) bool."""
        self._check(x_t, state, is_first_t, sequence=False)
        if x_t.shape[0] == 0:
            return x_t.new_zeros(0, *self.output_shape), tuple(state)
        y, state = self._unroll(x_t.unsqueeze(0), tuple(state), is_first_t.unsqueeze(0))
        return y[0], state

    @abc.abstractmethod
    def _unroll(
        self, x: torch.Tensor, state: State, is_first: torch.Tensor
    ) -> tuple[torch.Tensor, State]:
        """Unroll checked inputs; ``is_first`` is (T, B) bool."""

    def _check(
        self, x: torch.Tensor, state: State, is_first: torch.Tensor, *, sequence: bool
    ) -> None:
        # runs at every rollout step: the messages are built only when a check fails
        name = type(self).__name__
        n_lead = 2 if sequence else 1
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"{name}: x must be a torch.Tensor of shape {self._want(sequence)}, got {type(x)}"
            )
        if x.dim() != n_lead + len(self.feature_shape) or x.shape[n_lead:] != self.feature_shape:
            raise ValueError(
                f"{name}: x must have shape {self._want(sequence)}, got {tuple(x.shape)}"
            )
        ref = self._reference
        if ref is not None:
            if x.dtype != ref.dtype:
                raise TypeError(
                    f"{name}: x has dtype {x.dtype} but the core's parameters are {ref.dtype}; "
                    f"convert one of them (e.g. core.to({x.dtype}))"
                )
            if x.device != ref.device:
                raise ValueError(
                    f"{name}: x is on {x.device} but the core's parameters are on {ref.device}"
                )
        lead_shape = x.shape[:n_lead]
        if not isinstance(is_first, torch.Tensor) or is_first.dtype != torch.bool:
            got = is_first.dtype if isinstance(is_first, torch.Tensor) else type(is_first)
            raise TypeError(
                f"{name}: is_first must be a bool tensor of shape {tuple(lead_shape)}, got {got}"
            )
        if is_first.shape != lead_shape:
            raise ValueError(
                f"{name}: is_first must have shape {tuple(lead_shape)} to match x, "
                f"got {tuple(is_first.shape)}"
            )
        if is_first.device != x.device:
            raise ValueError(f"{name}: is_first is on {is_first.device} but x is on {x.device}")
        batch = x.shape[n_lead - 1]
        if not isinstance(state, (tuple, list)) or len(state) != len(self.state_shapes):
            raise ValueError(
                f"{name}: state must be a tuple of {len(self.state_shapes)} tensors "
                f"(from core.initial_state), got {type(state).__name__} of length "
                f"{len(state) if isinstance(state, (tuple, list)) else '?'}"
            )
        for i, (s, shape) in enumerate(zip(state, self.state_shapes, strict=True)):
            if not isinstance(s, torch.Tensor) or s.shape != (batch, *shape):
                got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise ValueError(f"{name}: state[{i}] must have shape {(batch, *shape)}, got {got}")
            if s.dtype != x.dtype or s.device != x.device:
                raise ValueError(
                    f"{name}: state[{i}] is {s.dtype} on {s.device}, "
                    f"expected {x.dtype} on {x.device}"
                )

    def _want(self, sequence: bool) -> str:
        """The expected shape of ``x``, for messages: ``(T, B, 64)`` or ``(B, 64)``."""
        return ("(T, B, " if sequence else "(B, ") + ", ".join(map(str, self.feature_shape)) + ")"


class VectorCore(Core):
    """A core over feature vectors: ``x`` (T, B, input_size) -> ``y`` (T, B, hidden_size).
    Subclasses pass their sizes up (checked: positive ints, ``prefix`` in the message) and set
    ``state_shapes``."""

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int, prefix: str = "", **sizes: int
    ) -> None:
        super().__init__()
        check_positive(
            prefix, input_size=input_size, hidden_size=hidden_size, num_layers=num_layers, **sizes
        )
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.feature_shape, self.output_shape = (input_size,), (hidden_size,)

    @property
    def output_size(self) -> int:
        return self.hidden_size


def check_positive(prefix: str = "", **sizes: int) -> None:
    """A clear error unless every size is a positive int (``True`` is not a size)."""
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{prefix}{name} must be a positive int, got {value!r}")
