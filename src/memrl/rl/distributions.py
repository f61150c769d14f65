"""Action distributions for PPO: masked (multi-head) categorical and diagonal Gaussian.

>>> head = action_head(env.single_action_space)        # e.g. MultiDiscrete([8, 8])
>>> logits = policy_head(features)                      # (B, head.num_params) = (B, 16)
>>> dist = make_distribution(head, logits, mask=masks)  # masks: (B, 16) bool or ((B, 8), (B, 8))
>>> actions = dist.sample()                             # (B, 2) long, one column per head
>>> env.step(to_env_actions(head, actions))

Discrete-type spaces (Discrete, MultiDiscrete, MultiBinary, and Tuple / Dict of those) become
one categorical head per discrete choice, sampled independently: the joint log-prob and the
entropy are sums over heads (the factored "dual head" of the R2D2 LSTM spec, e.g. a grid's (x, y)).
A float Box becomes a diagonal Gaussian over its flattened dimensions: the policy outputs the
mean and owns its log-std; actions are not squashed (the env wrapper clips them).

Masks follow gymnasium's ``action_mask`` convention: true (or non-zero) = allowed. A masked
action has probability exactly zero: it is never sampled or chosen by ``mode()``, its log-prob
is ``-inf``, and log-probs and entropy are those of the softmax renormalised over the allowed
actions. A row (and head) with no allowed action is a ValueError naming it.

All methods accept any leading batch shape, e.g. (B, ...) in the rollout or (T, B, ...) in the
update; ``sample`` and ``mode`` return detached actions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

_SUPPORTED = (
    "Discrete, MultiDiscrete, MultiBinary and Tuple/Dict of these (one categorical head per "
    "discrete choice), or a float Box (diagonal Gaussian)"
)
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class ActionHead:
    """What the policy head must output for an action space.

    ``kind`` is ``"categorical"`` (``sizes`` = categories per head, ``num_params`` logits in head
    order, actions ``(..., len(sizes))`` long) or ``"gaussian"`` (``sizes = (D,)``: the policy
    outputs D means and keeps its own D log-stds; actions ``(..., D)`` float).
    """

    space: spaces.Space
    kind: str
    sizes: tuple[int, ...]

    @property
    def num_params(self) -> int:
        """Outputs of the policy's action layer: all logits, or the Gaussian's means."""
        return sum(self.sizes)

    @property
    def action_dim(self) -> int:
        """Columns of an action tensor: one per categorical head, or the Gaussian's D."""
        return len(self.sizes) if self.kind == "categorical" else self.sizes[0]

    @property
    def action_dtype(self) -> torch.dtype:
        """torch.long (categorical) or torch.float32 (Gaussian)."""
        return torch.long if self.kind == "categorical" else torch.float32


def action_head(space: spaces.Space) -> ActionHead:
    """The ActionHead for ``space``; an unsupported space is a ValueError naming it."""
    if isinstance(space, spaces.Box):
        if not np.issubdtype(space.dtype, np.floating):
            raise ValueError(
                f"unsupported action space {space}: a Box of {space.dtype} (only float Boxes "
                f"get a Gaussian); supported: {_SUPPORTED}"
            )
        return ActionHead(space, "gaussian", (int(np.prod(space.shape)),))
    sizes = _categorical_sizes(space, space)
    if not sizes:
        raise ValueError(f"unsupported action space {space}: no action heads")
    return ActionHead(space, "categorical", tuple(sizes))


def action_head_sizes(space: spaces.Space) -> tuple[int, ...]:
    """Categories per head (categorical) or ``(D,)`` means (Gaussian); the policy's action
    layer has ``sum(...)`` outputs."""
    return action_head(space).sizes


def _categorical_sizes(space: spaces.Space, root: spaces.Space) -> list[int]:
    if isinstance(space, spaces.Discrete):
        return [int(space.n)]
    if isinstance(space, spaces.MultiDiscrete):
        return [int(n) for n in np.asarray(space.nvec).ravel()]
    if isinstance(space, spaces.MultiBinary):
        return [2] * int(np.prod(space.shape))
    if isinstance(space, (spaces.Tuple, spaces.Dict)):
        children = space.spaces if isinstance(space, spaces.Tuple) else space.spaces.values()
        return [n for child in children for n in _categorical_sizes(child, root)]
    what = "a Box inside a Tuple/Dict" if isinstance(space, spaces.Box) else str(space)
    raise ValueError(f"unsupported action space {root} ({what}); supported: {_SUPPORTED}")


def make_distribution(
    head: ActionHead | spaces.Space,
    params: Tensor,
    mask: Any = None,
    log_std: Tensor | None = None,
) -> MaskedCategorical | DiagGaussian:
    """The distribution of ``head`` (or of an action space; pass the ActionHead in hot loops).

    params: (..., head.num_params) logits, or the Gaussian's means.
    mask: categorical only; a (..., num_params) bool tensor/array, a sequence of per-element
      masks (one (..., n_i) per head, or per Tuple element) concatenated in head order, or for a
      Dict space a mapping from key to mask.
    log_std: Gaussian only; (D,) or (..., D).
    """
    if not isinstance(head, ActionHead):
        head = action_head(head)
    if head.kind == "gaussian":
        if mask is not None:
            raise ValueError(f"action masks need a discrete action space, got {head.space}")
        if log_std is None:
            raise ValueError(f"a Gaussian for {head.space} needs log_std, got None")
        return DiagGaussian(params, log_std)
    if log_std is not None:
        raise ValueError(f"log_std is for Box action spaces, got {head.space}")
    if mask is not None:
        mask = action_mask_tensor(head, mask, params.device)
    return MaskedCategorical(params, head.sizes, mask)


def action_mask_tensor(head: ActionHead, mask: Any, device: torch.device | None = None) -> Tensor:
    """Any accepted mask form -> one (..., head.num_params) bool tensor (true = allowed), e.g.
    to store in a rollout buffer. Accepts a tensor or numpy array (bool or integer), a sequence
    of parts joined along the last axis in head order (one per head or per Tuple element), or
    for a Dict space a mapping from key to part."""
    if head.kind != "categorical":
        raise ValueError(f"action masks need a discrete action space, got {head.space}")
    if isinstance(mask, Mapping):
        if not isinstance(head.space, spaces.Dict):
            raise ValueError(f"a mask mapping needs a Dict action space, got {head.space}")
        mask = [mask[key] for key in head.space.spaces]
    return _join_mask(mask, head.num_params, device)


class MaskedCategorical:
    """Independent categorical heads with optional action masks.

    logits: (..., sum(sizes)), the heads' logits one after another.
    sizes: categories per head; default one head over all logits.
    mask: None, or (..., sum(sizes)) bool (true = allowed), or a sequence of parts joined
      along the last axis in head order; numpy arrays and integer masks are accepted.

    Internally the heads share one (..., H, n_max) tensor; heads smaller than n_max are padded
    with masked entries, so every method is a handful of tensor ops whatever H.
    """

    def __init__(
        self, logits: Tensor, sizes: Sequence[int] | None = None, mask: Any = None
    ) -> None:
        sizes = (logits.shape[-1],) if sizes is None else tuple(int(n) for n in sizes)
        if logits.shape[-1] != sum(sizes):
            raise ValueError(
                f"logits have {logits.shape[-1]} entries in the last axis; heads of sizes "
                f"{sizes} need {sum(sizes)}"
            )
        self.sizes = sizes
        batch, num_heads, n_max = logits.shape[:-1], len(sizes), max(sizes)
        allowed = None if mask is None else _join_mask(mask, sum(sizes), logits.device)
        if allowed is not None and allowed.shape != logits.shape:
            raise ValueError(
                f"action mask of shape {tuple(allowed.shape)} does not match logits of shape "
                f"{tuple(logits.shape)} (heads of sizes {sizes})"
            )
        if len(set(sizes)) > 1:
            index, padding_allowed = _padding(sizes, logits.device)
            padded = logits.new_full((*batch, num_heads * n_max), -math.inf)
            padded[..., index] = logits
            logits = padded
            if allowed is None:
                allowed = padding_allowed  # (H * n_max,), broadcasts over the batch
            else:
                padded_mask = allowed.new_zeros((*batch, num_heads * n_max))
                padded_mask[..., index] = allowed
                allowed = padded_mask
        logits = logits.reshape(*batch, num_heads, n_max)
        if allowed is not None:
            allowed = allowed.reshape(*allowed.shape[:-1], num_heads, n_max)
            if mask is not None:
                _check_some_allowed(allowed, sizes)
        self.allowed = allowed  # (..., H, n_max) bool, or None: every action allowed
        self._masked = None if allowed is None else ~allowed
        if mask is not None:  # (padding alone is -inf already)
            logits = logits.masked_fill(self._masked, -math.inf)
        self.log_probs = torch.log_softmax(logits, dim=-1)  # (..., H, n_max), -inf if masked

    def sample(self) -> Tensor:
        """(..., H) long; Gumbel-max: argmax(log p - log E), E ~ Exp(1), exact and cheaper
        than torch.distributions.Categorical."""
        with torch.no_grad():
            noise = torch.empty_like(self.log_probs).exponential_().log_()
            keys = self.log_probs - noise
            if self._masked is not None:
                # E can be exactly 0 (-log E = inf; inf - inf = NaN): re-mask after the noise.
                keys = keys.masked_fill(self._masked, -math.inf)
            return keys.argmax(dim=-1)

    def mode(self) -> Tensor:
        """(..., H) long: the most probable allowed action of every head."""
        return self.log_probs.detach().argmax(dim=-1)

    def log_prob(self, actions: Tensor) -> Tensor:
        """(...,): joint log-prob, the sum over heads; actions (..., H) integer."""
        if actions.shape != self.log_probs.shape[:-1]:
            raise ValueError(
                f"actions of shape {tuple(actions.shape)}; expected "
                f"{tuple(self.log_probs.shape[:-1])} (batch..., one column per head)"
            )
        picked = self.log_probs.gather(-1, actions.long().unsqueeze(-1))
        return picked.squeeze(-1).sum(-1)

    def entropy(self) -> Tensor:
        """(...,): the sum over heads of the entropy over allowed actions."""
        log_probs = self.log_probs
        if self._masked is not None:
            # 0 * log 0: zero the -inf first, so neither value nor gradient becomes NaN.
            log_probs = log_probs.masked_fill(self._masked, 0.0)
        return -(log_probs.exp() * log_probs).sum(-1).sum(-1)


class DiagGaussian:
    """Independent normals over the last axis: mean (..., D), log_std (D,) or (..., D)."""

    def __init__(self, mean: Tensor, log_std: Tensor) -> None:
        if log_std.shape[-1] != mean.shape[-1]:
            raise ValueError(
                f"log_std of shape {tuple(log_std.shape)} does not match mean of shape "
                f"{tuple(mean.shape)} in the last axis"
            )
        self.mean = mean
        self.log_std = log_std.expand_as(mean)
        self.std = self.log_std.exp()

    def sample(self) -> Tensor:
        """(..., D) float."""
        with torch.no_grad():
            return self.mean + self.std * torch.randn_like(self.mean)

    def mode(self) -> Tensor:
        """(..., D): the mean."""
        return self.mean.detach()

    def log_prob(self, actions: Tensor) -> Tensor:
        """(...,): summed over the D dimensions."""
        z = (actions - self.mean) / self.std
        return (-0.5 * z.square() - self.log_std - _HALF_LOG_2PI).sum(-1)

    def entropy(self) -> Tensor:
        """(...,): summed over the D dimensions."""
        return (0.5 + _HALF_LOG_2PI + self.log_std).sum(-1)


def to_env_actions(head: ActionHead, actions: Tensor, batched: bool = True) -> Any:
    """Sampled actions -> what ``env.step`` takes: numpy arrays with the space's dtype and shape
    (tuples for Tuple spaces, dicts for Dict spaces).

    batched: actions (B, action_dim) for a vector env (each leaf gets a leading B axis);
      False: actions (action_dim,) for a single env (a Discrete leaf becomes a Python int).
    """
    values = actions.detach().cpu().numpy()
    if not batched:
        values = values[None]
    if values.ndim != 2 or values.shape[1] != head.action_dim:
        expected = f"(B, {head.action_dim})" if batched else f"({head.action_dim},)"
        raise ValueError(
            f"actions of shape {tuple(actions.shape)} for {head.space}; expected {expected}"
        )
    if head.kind == "gaussian":
        out = values.astype(head.space.dtype).reshape(len(values), *head.space.shape)
    else:
        out, _ = _split_actions(head.space, values.astype(np.int64), 0)
    return out if batched else _unbatch(head.space, out)


def _split_actions(space: spaces.Space, values: np.ndarray, column: int) -> tuple[Any, int]:
    """The leaf actions of ``space`` from columns ``column...`` of (B, H) head choices."""
    batch = len(values)
    if isinstance(space, spaces.Discrete):
        return values[:, column] + int(space.start), column + 1
    if isinstance(space, (spaces.MultiDiscrete, spaces.MultiBinary)):
        width = int(np.prod(space.shape))
        leaf = values[:, column : column + width].reshape(batch, *space.shape)
        if isinstance(space, spaces.MultiDiscrete):
            leaf = leaf + space.start
        return leaf.astype(space.dtype), column + width
    if isinstance(space, spaces.Tuple):
        parts = []
        for child in space.spaces:
            part, column = _split_actions(child, values, column)
            parts.append(part)
        return tuple(parts), column
    parts = {}
    for key, child in space.spaces.items():
        parts[key], column = _split_actions(child, values, column)
    return parts, column


def _unbatch(space: spaces.Space, batched: Any) -> Any:
    if isinstance(space, spaces.Discrete):
        return int(batched[0])
    if isinstance(space, spaces.Tuple):
        return tuple(
            _unbatch(child, part) for child, part in zip(space.spaces, batched, strict=True)
        )
    if isinstance(space, spaces.Dict):
        return {key: _unbatch(child, batched[key]) for key, child in space.spaces.items()}
    return batched[0]


def _join_mask(mask: Any, num_params: int, device: torch.device | None) -> Tensor:
    parts = mask if isinstance(mask, (list, tuple)) else [mask]
    parts = [torch.as_tensor(part, device=device) for part in parts]
    joined = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    if joined.dtype != torch.bool:
        joined = joined != 0
    if joined.ndim == 0 or joined.shape[-1] != num_params:
        shapes = [tuple(part.shape) for part in parts]
        raise ValueError(
            f"action mask of shape(s) {shapes} has {joined.shape[-1] if joined.ndim else 0} "
            f"entries in the last axis; expected {num_params} (one per logit), as one mask or "
            "per-head parts joined along the last axis"
        )
    return joined


def _check_some_allowed(allowed: Tensor, sizes: tuple[int, ...]) -> None:
    empty = ~allowed.any(-1)  # (..., H)
    if bool(empty.any()):
        where = empty.nonzero().tolist()
        shown = ", ".join(
            f"row {tuple(idx[:-1]) if len(idx) > 2 else idx[0]} head {idx[-1]}"
            for idx in where[:10]
        )
        more = f" and {len(where) - 10} more" if len(where) > 10 else ""
        raise ValueError(
            f"action mask allows no action in {shown}{more} (heads of sizes {sizes}); every "
            "row needs at least one allowed action per head"
        )


@functools.lru_cache(maxsize=64)
def _padding(sizes: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """Where each head's logits go in the (H * n_max) padded layout, and which slots are real.
    Built outside inference mode: a cached inference tensor would break a later backward."""
    n_max = max(sizes)
    with torch.inference_mode(False):
        index = torch.tensor([h * n_max + i for h, n in enumerate(sizes) for i in range(n)])
        allowed = torch.zeros(len(sizes) * n_max, dtype=torch.bool)
        allowed[index] = True
        return index.to(device), allowed.to(device)
