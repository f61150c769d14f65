"""Helpers that work on the state of any core: a tuple of tensors, batch dimension first."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memrl.cores.base import State


def select_state(state: State, index: torch.Tensor | slice | int | Sequence[int]) -> State:
    """Rows ``index`` of every tensor (an int keeps the batch dimension)."""
    if isinstance(index, int):
        index = slice(index, index + 1)
    return tuple(s[index] for s in state)


def cat_states(states: Sequence[State]) -> State:
    """Concatenate states along the batch dimension."""
    if not states:
        raise ValueError("cat_states needs at least one state")
    if len({len(s) for s in states}) != 1:
        raise ValueError(f"cat_states: states have different lengths {[len(s) for s in states]}")
    return tuple(torch.cat(parts, dim=0) for parts in zip(*states, strict=True))


def detach_state(state: State) -> State:
    """Cut the autograd graph (truncated BPTT)."""
    return tuple(s.detach() for s in state)


def state_to(state: State, device: torch.device | str) -> State:
    """Move every tensor to ``device``."""
    return tuple(s.to(device) for s in state)


def zero_state_where(state: State, mask: torch.Tensor) -> State:
    """Zero (the initial value of every core) the rows where ``mask`` (B,) bool is true."""
    if mask.dim() != 1 or (state and mask.shape[0] != state[0].shape[0]):
        raise ValueError(
            f"zero_state_where: mask must have shape (B,) = "
            f"({state[0].shape[0] if state else '?'},), got {tuple(mask.shape)}"
        )
    return tuple(s.masked_fill(mask.view(-1, *([1] * (s.dim() - 1))), 0.0) for s in state)
