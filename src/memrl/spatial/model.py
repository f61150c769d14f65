"""The stack of the spatial-memory spec and its losses.

::

    image --frozen encoder (backbone + FPN)--> P_t --per-channel standardisation--> z_t
    z_t, ConditionVector c_t, is_first/RecoveryTag --SpatialMemory--> h_t
    (h_t, a_t broadcast over the map) --predictor--> z^_{t+1}   L_dyn vs StopGrad(z_{t+1})
        (with ``residual``: z^_{t+1} = z_t + predictor(h_t, a_t), the change from the frame)
    (h_t, z_t) --policy--> tanh action;   h_t --segmenter--> P(phase boundary at t)
    z_t --segmenter_z--> the same head without memory (the comparison of the spec's claim)
    h_t --ood--> P(OOD tag at t), trained only when the dataset has ``ood`` labels

Every loss is averaged over valid steps with the spec's TrustMatrix weights ``w_t`` (1 when the
dataset has no ``trust`` key): ``L = sum_t w_t l_t / sum_t w_t``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memrl.cores import State
from memrl.nn.fpn import make_spatial_encoder
from memrl.nn.losses import weighted_mean
from memrl.spatial.memory import SpatialMemory

ACTION_DIM = 3


def map_head(in_channels: int, size: int, outputs: int) -> nn.Sequential:
    """A shallow head on a (in_channels, size, size) map: two convolutions, then an MLP."""
    reduced = (size + 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),  # size -> ceil(size / 2)
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * reduced * reduced, 128),
        nn.ReLU(),
        nn.Linear(128, outputs),
    )


class Predictor(nn.Module):
    """Forward dynamics, a shallow ConvNet: (h_t, a_t broadcast over the map) -> z^_{t+1}."""

    def __init__(self, memory_channels: int, channels: int, width: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(memory_channels + ACTION_DIM, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, channels, 1),
        )
        # zero output at the start: a residual predictor starts as the copy baseline
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, h: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """h (N, K, S, S), actions (N, 3) -> (N, C, S, S)."""
        a = actions[:, :, None, None].expand(-1, -1, *h.shape[-2:])
        return self.net(torch.cat([h, a], 1))


class FrameDecoder(nn.Module):
    """The pretrain phase's decoder: feature maps P (N, C, S, S) -> frames (N, 3, 2S, 2S) in
    [0, 1] (a 3x3 conv, one stride-2 transposed conv, a 3x3 conv to RGB)."""

    def __init__(self, channels: int, size: int, width: int = 64) -> None:
        super().__init__()
        self.size = size
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.SiLU(),
            nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(width // 2, 3, 3, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float())


def frame_target(images: torch.Tensor, size: int) -> torch.Tensor:
    """What :class:`FrameDecoder` reconstructs: images (N, 3, H, W) uint8 area-averaged to
    (N, 3, 2 * size, 2 * size), in [0, 1]."""
    return F.adaptive_avg_pool2d(images.float() / 255, 2 * size)


class SpatialModel(nn.Module):
    """Encoder, memory, predictor and heads (module docstring)."""

    def __init__(
        self,
        backbone: str = "cnn",
        pretrained: bool | None = None,
        channels: int = 128,
        size: int = 14,
        core: str = "conv_gru",
        hidden_channels: int = 128,
        num_layers: int = 1,
        condition_dim: int = 3,
        s4d_grid: int = 4,
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.residual = residual
        self.encoder = make_spatial_encoder(backbone, channels, size, pretrained)
        self.encoder.requires_grad_(False)  # frozen: the spec's Stage 1 features
        self.memory = SpatialMemory(
            core, channels, size, hidden_channels, num_layers, condition_dim, s4d_grid=s4d_grid
        )
        K = self.memory.out_channels
        self.predictor = Predictor(K, channels)
        self.policy = nn.Sequential(map_head(K + channels, size, ACTION_DIM), nn.Tanh())
        self.segmenter = map_head(K, size, 1)
        self.segmenter_z = map_head(channels, size, 1)
        self.ood = map_head(K, size, 1)
        # statistics of the data, set before training and saved with the weights
        self.register_buffer("feature_mean", torch.zeros(channels, size, size))
        self.register_buffer("feature_std", torch.ones(channels, 1, 1))
        self.register_buffer("condition_mean", torch.zeros(max(condition_dim, 1)))
        self.register_buffer("condition_std", torch.ones(max(condition_dim, 1)))
        self.register_buffer("action_scale", torch.ones(ACTION_DIM))
        self.channels, self.size, self.condition_dim = channels, size, condition_dim

    def train(self, mode: bool = True) -> SpatialModel:
        super().train(mode)
        self.encoder.eval()  # frozen, whatever the rest does
        return self

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) uint8 -> raw frozen features P (N, C, S, S); no graph is built,
        so no gradient can reach the encoder (the StopGrad of the spec's target)."""
        return self.encoder(images)

    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        """P (..., C, S, S) -> z: minus the data's mean map, over each channel's spread."""
        return (features.float() - self.feature_mean) / self.feature_std

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) uint8 -> z (N, C, S, S)."""
        return self.standardize(self.features(images))

    def condition(self, states: torch.Tensor) -> torch.Tensor | None:
        """Raw conditioning features (..., D) -> standardised ConditionVector, or None."""
        if self.condition_dim == 0:
            return None
        return (states - self.condition_mean) / self.condition_std

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        return self.memory.initial_state(batch_size, device)

    def remember(
        self, z: torch.Tensor, condition: torch.Tensor | None, state: State, is_first: torch.Tensor
    ) -> tuple[torch.Tensor, State]:
        """z (T, B, C, S, S) -> memory maps h (T, B, K, S, S) and the state after the last step."""
        return self.memory(z, condition, state, is_first)

    def predict_next(self, h: torch.Tensor, actions: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """h (..., K, S, S), scaled actions (..., 3), z_t (..., C, S, S) -> z^_{t+1}; z_t is
        used only by a residual predictor (the network itself sees h_t and a_t alone)."""
        lead = h.shape[:-3]
        out = self.predictor(h.flatten(0, len(lead) - 1), actions.flatten(0, len(lead) - 1))
        out = out.view(*lead, *out.shape[1:])
        return z.detach() + out if self.residual else out

    def act(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(h, z) (..., K | C, S, S) -> tanh outputs (..., 3) in the scaled action space."""
        return _per_map(self.policy, torch.cat([h, z], -3))

    def boundary_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., K, S, S) -> logit of a phase boundary at t, (...)."""
        return _per_map(self.segmenter, h)[..., 0]

    def boundary_logits_z(self, z: torch.Tensor) -> torch.Tensor:
        """The memoryless segmenter: z (..., C, S, S) -> logits (...)."""
        return _per_map(self.segmenter_z, z)[..., 0]

    def ood_logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., K, S, S) -> logit of an OOD tag at t, (...)."""
        return _per_map(self.ood, h)[..., 0]

    def to_action(self, raw: torch.Tensor) -> torch.Tensor:
        """Policy outputs -> env actions, clipped to [-1, 1]."""
        return (raw * self.action_scale).clamp(-1, 1)


class SpatialStep(nn.Module):
    """One greedy step of the whole stack as a robot runs it: ``forward(image (B, H, W, 3) uint8
    as the push env renders it, gripper state (B, 3), is_first (B,), *memory)`` -> ``(action
    (B, 3), *next_memory)``: encoder, standardisation, memory step (FiLM-conditioned), policy and
    action scaling. What ``spatial-eval`` runs in the env and ``memrl export`` writes."""

    def __init__(self, model: SpatialModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, state: torch.Tensor, is_first: torch.Tensor, *memory):
        m = self.model
        z = m.encode(image.permute(0, 3, 1, 2))  # (B, C, S, S)
        h, next_memory = m.memory.step(z, m.condition(state), tuple(memory), is_first)
        return (m.to_action(m.act(h, z)), *next_memory)


def _per_map(net: nn.Module, maps: torch.Tensor) -> torch.Tensor:
    lead = maps.shape[:-3]
    out = net(maps.reshape(-1, *maps.shape[-3:]))
    return out.view(*lead, out.shape[-1])


# -- losses -------------------------------------------------------------------------------------


def dynamics_per_step(
    prediction: torch.Tensor, z_next: torch.Tensor, kind: str = "mse"
) -> torch.Tensor:
    """L_dyn of the spatial-memory spec per step against StopGrad(z_{t+1}): the mean squared
    error over the map (``mse``) or 1 - cosine similarity of the flattened maps (``cosine``).
    ``prediction``, ``z_next`` (..., C, S, S) -> (...)."""
    target = z_next.detach()  # StopGrad
    if kind == "mse":
        return (prediction - target).pow(2).mean((-3, -2, -1))
    if kind == "cosine":
        return 1 - F.cosine_similarity(prediction.flatten(-3), target.flatten(-3), dim=-1)
    raise ValueError(f"dynamics loss {kind!r}; expected 'mse' or 'cosine'")


def dynamics_loss(
    prediction: torch.Tensor, z_next: torch.Tensor, weights: torch.Tensor, kind: str = "mse"
) -> torch.Tensor:
    """The trust-weighted mean of :func:`dynamics_per_step`; ``weights`` (...)."""
    return weighted_mean(dynamics_per_step(prediction, z_next, kind), weights)


def boundary_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, pos_weight: float
) -> torch.Tensor:
    """Binary cross-entropy of boundary logits, positives up-weighted by ``pos_weight``."""
    per_step = F.binary_cross_entropy_with_logits(
        logits, labels.to(logits.dtype), pos_weight=logits.new_tensor(pos_weight), reduction="none"
    )
    return weighted_mean(per_step, weights)


# -- metrics ------------------------------------------------------------------------------------
def boundary_peaks(prob: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Predicted boundaries of one episode: steps above ``threshold`` that are local maxima
    (>= both neighbours), so a run of high probabilities around one boundary counts once."""
    left = torch.cat([prob.new_full((1,), -1.0), prob[:-1]])
    right = torch.cat([prob[1:], prob.new_full((1,), -1.0)])
    peak = (prob > threshold) & (prob >= left) & (prob > right)
    return peak.nonzero().flatten()


def boundary_f1(
    prob: torch.Tensor,
    labels: torch.Tensor,
    lengths: torch.Tensor,
    tolerance: int = 1,
    threshold: float = 0.5,
) -> dict[str, float]:
    """Boundary F1 within ``tolerance`` steps over episodes laid flat (``lengths`` each): each
    true boundary matches at most one predicted peak (greedy, nearest first)."""
    tp = n_pred = n_true = 0
    for p, y in zip(prob.split(lengths.tolist()), labels.split(lengths.tolist()), strict=True):
        predicted = boundary_peaks(p, threshold).tolist()
        truth = y.nonzero().flatten().tolist()
        n_pred, n_true = n_pred + len(predicted), n_true + len(truth)
        pairs = sorted(
            (abs(a - b), a, b) for a in predicted for b in truth if abs(a - b) <= tolerance
        )
        used_p, used_t = set(), set()
        for _, a, b in pairs:
            if a not in used_p and b not in used_t:
                used_p.add(a)
                used_t.add(b)
        tp += len(used_p)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall}
