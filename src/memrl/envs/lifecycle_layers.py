"""The seed-lifecycle task's layers for G hosts side by side: the seeds' blueprints (each an
nn.Module, the single-seed reference that draws a seed's weights, and a batched branch that
computes G seeds of it at once), the grouped convolution, the head, and a slot.

Activations are ``(B, H, W, G, C)``: host g's minibatch in column g. A layer of G hosts is one
grouped, channels-last convolution (``groups = G``) with the hosts' weights stacked ``(G, ...)``.
Every host's numbers are the same bit for bit however many hosts run beside it and in which
column (``_with_twin``, ``_ContiguousGrad``, the head's pooling): a single env and each env of
the batched vector env play exactly alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

# ----------------------------------------------------------------------------- blueprints
# Each blueprint is an nn.Module builder (what a seed's initial weights and parameter count are)
# and a batched branch (what G seeds of it compute): seed(h) = h + branch(h), the branch's
# last layer zero-initialised so that a new seed is the identity.


class _Residual(nn.Module):
    """``h + branch(h)``; the branch's last layer starts at zero, so a new seed is the identity."""

    def __init__(self, branch: nn.Module, last: nn.Module) -> None:
        super().__init__()
        self.branch = branch
        for p in last.parameters():
            nn.init.zeros_(p)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.branch(h)


class _SpatialAttention(nn.Module):
    """Single-head self-attention of every position of a (B, C, H, W) map over a 4x4 average-
    pooled summary of the map (at most 16 keys: cheap enough for an epoch on one CPU thread)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.query = nn.Conv2d(channels, channels, 1)
        self.key_value = nn.Conv2d(channels, 2 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, c, height, width = h.shape
        q = self.query(h).flatten(2).transpose(1, 2)  # (B, H*W, C)
        summary = F.adaptive_avg_pool2d(h, (min(height, 4), min(width, 4)))
        k, v = self.key_value(summary).flatten(2).transpose(1, 2).chunk(2, dim=-1)  # (B, <=16, C)
        weights = torch.softmax(q @ k.transpose(1, 2) / c**0.5, dim=-1)  # (B, H*W, <=16)
        return self.out((weights @ v).transpose(1, 2).reshape(b, c, height, width))


def _norm(c: int) -> nn.Module:
    branch = nn.BatchNorm2d(c)
    return _Residual(branch, branch)


def _depthwise(c: int) -> nn.Module:
    last = nn.Conv2d(c, c, 1)
    return _Residual(nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.ReLU(), last), last)


def _conv_light(c: int) -> nn.Module:
    last = nn.Conv2d(max(c // 2, 1), c, 1)
    return _Residual(
        nn.Sequential(nn.Conv2d(c, max(c // 2, 1), 3, padding=1), nn.ReLU(), last), last
    )


def _conv_heavy(c: int) -> nn.Module:
    last = nn.Conv2d(c, c, 3, padding=1)
    return _Residual(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), last), last)


def _attention(c: int) -> nn.Module:
    branch = _SpatialAttention(c)
    return _Residual(branch, branch.out)


BLUEPRINTS: dict[str, Callable[[int], nn.Module]] = {
    "norm": _norm,
    "depthwise": _depthwise,
    "conv_light": _conv_light,
    "conv_heavy": _conv_heavy,
    "attention": _attention,
}
"""A seed's module by blueprint name, given its slot's channels (the single-seed reference)."""


def _with_twin(h: torch.Tensor, *params: torch.Tensor) -> list[torch.Tensor]:
    """A lone host (G = 1) beside a detached copy of itself. oneDNN and MKL run other kernels
    for one group than for two or more, which add in another order; computed as one of two, a
    host's numbers are the same bit for bit however many hosts run beside it and in whichever
    column (checked for every column of 1 to 17 hosts, each layer and blueprint, forward and
    backward), so the single env and every env of the vector env agree exactly. The copy's
    outputs are dropped and take no gradient."""
    h = _ContiguousGrad.apply(h)
    return [torch.cat([t, t.detach()], dim) for t, dim in [(h, 3), *((p, 0) for p in params)]]


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose gradient is made contiguous: the layout a gradient arrives in picks
    the kernel of the op that consumes it (BatchNorm's backward, say), so a lone host's gradient
    must come back as a batch's would, not as a slice of its twin's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def head(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Global average pooling, then each host's linear layer: h (B, H, W, G, C), weight (G,
    classes, C), bias (G, classes) -> logits (G, B, classes)."""
    if h.shape[3] == 1:
        return head(*_with_twin(h, weight, bias))[:1]
    b, height, width, g, c = h.shape
    # mean over a contiguous last dim (a copy): reduced across (H, W) in place, the sums would
    # be vectorised across hosts and a host's order would depend on its column
    pooled = h.permute(3, 0, 4, 1, 2).reshape(g, b, c, height * width).mean(3)  # (G, B, C)
    return torch.baddbmm(bias.unsqueeze(1), pooled, weight.transpose(1, 2))


def grouped_conv(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int, padding: int,
    groups: int = 1,
) -> torch.Tensor:  # fmt: skip
    """G convolutions at once. h (B, H, W, G, C); weight (G, C_out, C / groups, k, k) and bias
    (G, C_out), one conv per host; returns (B, H', W', G, C_out)."""
    b, height, width, g, c = h.shape
    if g == 1:
        pair = grouped_conv(*_with_twin(h, weight, bias), stride, padding, groups)
        return pair[:, :, :, :1].contiguous()  # as every (B, H, W, G, C) here, for the next op
    x = h.reshape(b, height, width, g * c).permute(0, 3, 1, 2)  # (B, G*C, H, W) channels-last
    y = F.conv2d(x, weight.flatten(0, 1), bias.flatten(), stride, padding, 1, g * groups)
    y = y.contiguous(memory_format=torch.channels_last)
    return y.permute(0, 2, 3, 1).unflatten(3, (g, -1))


def _norm_branch(h, params, buffers, training):
    weight, bias = params
    running_mean, running_var = buffers  # (G, C): updated in place in training, as BatchNorm2d
    b, height, width, g, c = h.shape
    x = h.reshape(b, height, width, g * c).permute(0, 3, 1, 2)
    y = F.batch_norm(
        x, running_mean.view(-1), running_var.view(-1), weight.flatten(), bias.flatten(),
        training, 0.1, 1e-5,
    )  # fmt: skip
    return y.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).unflatten(3, (g, c))


def _depthwise_branch(h, params, buffers, training):
    w0, b0, w1, b1 = params
    return grouped_conv(grouped_conv(h, w0, b0, 1, 1, groups=h.shape[-1]).relu(), w1, b1, 1, 0)


def _conv_light_branch(h, params, buffers, training):
    w0, b0, w1, b1 = params
    return grouped_conv(grouped_conv(h, w0, b0, 1, 1).relu(), w1, b1, 1, 0)


def _conv_heavy_branch(h, params, buffers, training):
    w0, b0, w1, b1 = params
    return grouped_conv(grouped_conv(h, w0, b0, 1, 1).relu(), w1, b1, 1, 1)


def _attention_branch(h, params, buffers, training):
    wq, bq, wkv, bkv, wo, bo = params
    b, height, width, g, c = h.shape
    q = grouped_conv(h, wq, bq, 1, 0).permute(0, 3, 1, 2, 4).reshape(b, g, height * width, c)
    x = h.reshape(b, height, width, g * c).permute(0, 3, 1, 2)
    summary = F.adaptive_avg_pool2d(x, (min(height, 4), min(width, 4)))
    summary = summary.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    kv = grouped_conv(summary.unflatten(3, (g, c)), wkv, bkv, 1, 0)  # (B, h', w', G, 2C)
    k, v = kv.permute(0, 3, 1, 2, 4).flatten(2, 3).chunk(2, dim=-1)  # (B, G, <=16, C)
    weights = torch.softmax(q @ k.transpose(-1, -2) / c**0.5, dim=-1)  # (B, G, H*W, <=16)
    out = (weights @ v).unflatten(2, (height, width)).permute(0, 2, 3, 1, 4)  # (B, H, W, G, C)
    return grouped_conv(out, wo, bo, 1, 0)


_BRANCHES: dict[str, Callable[..., torch.Tensor]] = {
    "norm": _norm_branch,
    "depthwise": _depthwise_branch,
    "conv_light": _conv_light_branch,
    "conv_heavy": _conv_heavy_branch,
    "attention": _attention_branch,
}


def module_tensors(modules: Sequence[nn.Module]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Parameters and buffers, in module order (BatchNorm's batch counter left out: with a
    fixed momentum it changes no output)."""
    params = [p for m in modules for p in m.parameters()]
    buffers = [b for m in modules for n, b in m.named_buffers() if "num_batches" not in n]
    return params, buffers


# ----------------------------------------------------------------------------- slots


@dataclass
class LiveSeed:
    """A seed as its host runs it: where, which blueprint, its alpha (0: not in the forward
    pass), and whether it learns on its local target (TRAINING) rather than with the host."""

    slot: int
    blueprint: str
    alpha: float
    learning: bool = False


@dataclass
class SlotSeeds:
    """The seeds of one blueprint that one pass runs in one slot."""

    blueprint: str
    positions: torch.Tensor | None  # (P,) among the pass's hosts; None: all of them, in order
    params: list[torch.Tensor]  # (P, *shape) each
    buffers: list[torch.Tensor]  # (P, *shape): BatchNorm running statistics
    alphas: torch.Tensor | None  # (P, 1) lerp weights; None: the seed's whole output (a learner)


def run_slot(h: torch.Tensor, seeds: Sequence[SlotSeeds], training: bool) -> torch.Tensor:
    """A slot of G hosts, h (B, H, W, G, C): ``h + alpha * branch(h)`` (= ``lerp(h, seed(h),
    alpha)``) for the hosts that run a seed there, h itself for the others. The seeded hosts are
    gathered once and added back once, whatever the number of blueprints: each full-size
    gather or scatter costs a pass over the slot's activations (and another in the backward)."""
    if not seeds:
        return h
    if len(seeds) == 1 and seeds[0].positions is None:
        return h + _weighted_branch(h, seeds[0], training)
    positions = torch.cat([s.positions for s in seeds])
    part, deltas, start = h.index_select(3, positions), [], 0
    for s in seeds:
        size = len(s.positions)
        own = part if len(seeds) == 1 else part.narrow(3, start, size).contiguous()
        deltas.append(_weighted_branch(own, s, training))
        start += size
    return h.index_add(3, positions, deltas[0] if len(deltas) == 1 else torch.cat(deltas, 3))


def _weighted_branch(h: torch.Tensor, seeds: SlotSeeds, training: bool) -> torch.Tensor:
    """``alpha * branch(h)``. Both ends pass through ``_ContiguousGrad``: the gradient the
    branch gets is contiguous (a slice of the slot's otherwise), and what it gives back to h is
    summed inside the branch first (attention uses h twice), then added to h's own, in this
    order for one host and for a batch alike: float addition is not associative."""
    h = _ContiguousGrad.apply(h)
    branch = _BRANCHES[seeds.blueprint](h, seeds.params, seeds.buffers, training)
    if seeds.alphas is not None:  # as (P, C): 4x faster than broadcasting (P, 1) over channels
        branch = branch * seeds.alphas.expand(-1, branch.shape[-1]).contiguous()
    return _ContiguousGrad.apply(branch)


def positions_in(members: Sequence[int], among: Sequence[int]) -> torch.Tensor | None:
    """Where ``members`` sit in ``among``; None when they are all of ``among``, in order."""
    if list(members) == list(among):
        return None
    where = {host: i for i, host in enumerate(among)}
    return torch.as_tensor([where[m] for m in members])


def image_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per image: logits (G, B, classes), y (G, B) -> (G, B)."""
    g, b, classes = logits.shape
    flat = F.cross_entropy(logits.reshape(g * b, classes), y.reshape(-1), reduction="none")
    return flat.view(g, b)


def task_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per host: logits (G, B, classes), y (G, B) -> (G,)."""
    return image_losses(logits, y).mean(1)
