"""memrl's RSSM world model against torchrl's Gaussian RSSM: training throughput on CPU.

    python benchmarks/rssm_vs_torchrl.py [--batch-size 32] [--seq-len 64] [--deter 200]
        [--stoch 30] [--hidden 200] [--channels 16 32 64] [--steps 10] [--warmup 2]
        [--threads 2] [--repeats 3] [--out rssm_vs_torchrl.json]

Three measurements, each for both frameworks, in one process:

- training step: one batch of moving-dot sequences (``MovingDotConfig(grid_size=32)``, seed 0,
  the same batch every step) through encoder, rollout over T steps and decoder, the loss,
  backward, ``clip_grad_norm_(..., 100)`` and an Adam step (lr 1e-3). memrl runs ``RSSM``,
  ``rssm_loss`` and the step of ``memrl.world_model.train._train_step``; torchrl runs
  ``RSSMRollout(TensorDictModule(RSSMPrior), TensorDictModule(RSSMPosterior))`` with the key
  wiring of torchrl's Dreamer (sota-implementations/dreamer/dreamer_utils.py).
- training step, torchrl-style vision: the same, with torchrl's RSSM between conv layers of the
  same sizes built the way torchrl's own ``ObsEncoder`` / ``ObsDecoder`` are (ELU, NCHW) — what a
  torchrl user starts from; memrl's encoder and decoder run channels-last with SiLU.
- dynamics only: the recurrent rollout alone over a precomputed random embedding (T, B, E),
  forward and backward of ``sum(belief^2) + sum(state^2)``, no optimizer: memrl's
  ``RSSM.observe`` against ``RSSMRollout`` on a TensorDict holding the same embedding.

Each repeat runs ``--warmup`` untimed then ``--steps`` timed steps of one framework, then of the
other; the order alternates per repeat and the table gives the median over repeats of ms per
step, sequences/s (batch size / step time) and memrl / torchrl in sequences/s. The load average
is printed first: run it on a quiet machine (on 2 cores with another job busy, ``--threads 2``
ran a tiny case over 100x slower than ``--threads 1``, both frameworks alike).

Identical on both sides: the encoder and decoder (fresh ``memrl`` ``CNNEncoder(channels)``
and ``CNNDecoder(deter + stoch, channels)`` instances), all sizes (GRU input ``hidden``, belief
``deter``, Gaussian state ``stoch``, prior and posterior MLPs of width ``hidden``; the parameter
counts are equal), one GRU step (``torch.gru_cell`` in both), one prior and one posterior per
time step, a diagonal Gaussian state with std >= 0.1, zero initial state and belief, the
alignment (``h_t = GRU([z_{t-1}, a_t], h_{t-1})``, prior from ``h_t``, posterior from ``h_t``
and ``embed(obs_t)``; torchrl gets ``a_0`` zeroed, as memrl zeroes it at ``is_first``), the loss
(squared error summed over pixels, mean over (B, T), plus KL balancing 0.8 / 0.2 with 1 free nat
per step, KL of ``Independent(Normal)`` summed over latent dimensions), gradient clipping,
optimizer and thread count.

What differs: activations (memrl SiLU, torchrl's modules hard-code ELU); the std (memrl softplus +
0.1, torchrl max(softplus, 0.1)); memrl applies the posterior's embedding half
(``Linear(E, hidden)``) once to all steps and the prior head once to all beliefs after the loop,
torchrl applies both inside every step (the same FLOPs, in T smaller matmuls) and also draws an
unused prior sample per step; memrl masks ``z`` / ``a`` / the state with ``is_first`` every step
(torchrl's Gaussian rollout has no resets: every sequence here is one episode, so the results
agree); torchrl moves the per-step tensors through TensorDicts and stacks a TensorDict at the end,
memrl stacks plain tensors; initialisation (memrl: orthogonal recurrent weights, zero GRU biases;
torchrl: PyTorch's defaults) changes values, not work. Encoder and decoder run on plain tensors on
both sides (torchrl's Dreamer wraps them in TensorDictModules, one call each per training step:
negligible).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchrl
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import distributions as D
from torch import nn
from torchrl.data import Bounded
from torchrl.modules.models.model_based import RSSMPosterior, RSSMPrior, RSSMRollout

from memrl.envs.moving_dot import MovingDotConfig, generate_moving_dot_sequences
from memrl.world_model.rssm import RSSM, CNNDecoder, CNNEncoder, RSSMConfig, rssm_loss

GRID = 32
ACTION_DIM = 2
LR = 1e-3
GRAD_CLIP = 100.0
BETA, BALANCE, FREE_BITS = 1.0, 0.8, 1.0


def plain_vision(deter: int, stoch: int, channels: tuple[int, ...]) -> tuple[nn.Module, nn.Module]:
    """The same conv layers built the way torchrl's own ``ObsEncoder`` / ``ObsDecoder`` are (ELU,
    default NCHW memory format); those classes themselves are fixed to 64 x 64 images."""
    encoder, inp = [], 1
    for out in channels:
        encoder += [nn.Conv2d(inp, out, 4, stride=2, padding=1), nn.ELU()]
        inp = out
    rev = list(reversed(channels))
    decoder = [nn.Linear(deter + stoch, rev[0] * 16), nn.ELU(), nn.Unflatten(1, (rev[0], 4, 4))]
    for inp, out in zip(rev, [*rev[1:], 1], strict=True):
        decoder += [nn.ConvTranspose2d(inp, out, 4, stride=2, padding=1), nn.ELU()]
    return nn.Sequential(*encoder, nn.Flatten()), nn.Sequential(*decoder[:-1])


class TorchRLWorldModel(nn.Module):
    """torchrl's RSSM, wired as torchrl's Dreamer wires it, between memrl's encoder and decoder
    (``plain=False``) or the plain ones of :func:`plain_vision`."""

    def __init__(
        self, deter: int, stoch: int, hidden: int, channels: tuple[int, ...], plain: bool = False
    ) -> None:
        super().__init__()
        if plain:
            self.encoder, self.decoder = plain_vision(deter, stoch, channels)
        else:
            self.encoder = CNNEncoder(channels)
            self.decoder = CNNDecoder(deter + stoch, channels)
        embed_size = channels[-1] * 16
        action_spec = Bounded(-1.0, 1.0, shape=(ACTION_DIM,))
        prior = RSSMPrior(
            action_spec,
            hidden_dim=hidden,
            rnn_hidden_dim=deter,
            state_dim=stoch,
            action_dim=ACTION_DIM,
        )
        posterior = RSSMPosterior(
            hidden_dim=hidden,
            state_dim=stoch,
            rnn_hidden_dim=deter,
            obs_embed_dim=embed_size,
        )
        self.rollout = RSSMRollout(
            TensorDictModule(
                prior,
                in_keys=["state", "belief", "action"],
                out_keys=[("next", "prior_mean"), ("next", "prior_std"), "_", ("next", "belief")],
            ),
            TensorDictModule(
                posterior,
                in_keys=[("next", "belief"), ("next", "encoded_latents")],
                out_keys=[
                    ("next", "posterior_mean"),
                    ("next", "posterior_std"),
                    ("next", "state"),
                ],
            ),
        )
        self.deter, self.stoch = deter, stoch

    def observe(self, embed: torch.Tensor, actions: torch.Tensor) -> TensorDict:
        """Batch-first ``embed`` (B, T, E) and ``actions`` (B, T, A) -> the rollout's
        TensorDict (B, T); zero state and belief before the first step."""
        B, T = embed.shape[:2]
        td = TensorDict(
            {
                "state": embed.new_zeros(B, T, self.stoch),
                "belief": embed.new_zeros(B, T, self.deter),
                "action": actions,
                "next": {"encoded_latents": embed},
            },
            batch_size=(B, T),
        )
        return self.rollout(td)

    def loss(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """memrl's ``rssm_loss`` for torchrl's outputs; ``obs`` (B, T, 1, H, W)."""
        B, T = obs.shape[:2]
        embed = self.encoder(obs.flatten(0, 1)).view(B, T, -1)
        out = self.observe(embed, actions).get("next")
        features = torch.cat([out.get("belief"), out.get("state")], -1)
        recon = self.decoder(features.flatten(0, 1)).view(obs.shape)
        recon_loss = (recon - obs).square().sum((-3, -2, -1)).mean()
        q_mean, q_std = out.get("posterior_mean"), out.get("posterior_std")
        p_mean, p_std = out.get("prior_mean"), out.get("prior_std")
        dynamics = D.kl_divergence(_normal(q_mean.detach(), q_std.detach()), _normal(p_mean, p_std))
        representation = D.kl_divergence(
            _normal(q_mean, q_std), _normal(p_mean.detach(), p_std.detach())
        )
        kl = BALANCE * dynamics.clamp(min=FREE_BITS) + (1 - BALANCE) * representation.clamp(
            min=FREE_BITS
        )
        return recon_loss + BETA * kl.mean()


def _normal(mean: torch.Tensor, std: torch.Tensor) -> D.Distribution:
    """A diagonal Gaussian over the last dimension, built as memrl's ``RSSM.distribution``."""
    return D.Independent(D.Normal(mean, std, validate_args=False), 1, validate_args=False)


def train_step(
    loss_fn: Callable[[], torch.Tensor], model: nn.Module, optimizer: torch.optim.Optimizer
) -> Callable[[], None]:
    """One step of ``memrl.world_model.train._train_step`` around ``loss_fn``."""

    def step() -> None:
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()

    return step


def dynamics_step(
    rollout: Callable[[], tuple[torch.Tensor, torch.Tensor]], model: nn.Module
) -> Callable[[], None]:
    """Forward and backward of ``sum(belief^2) + sum(state^2)`` over the rollout."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        belief, state = rollout()
        (belief.square().sum() + state.square().sum()).backward()

    return step


def time_ms(step: Callable[[], None], steps: int, warmup: int) -> float:
    """ms per step over ``steps`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) * 1e3 / steps


def alternating(
    pair: dict[str, Callable[[], None]], steps: int, warmup: int, repeats: int
) -> dict[str, float]:
    """Median ms per step of each of two cases; the one that runs first alternates."""
    names = list(pair)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(time_ms(pair[name], steps, warmup))
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--deter", type=int, default=200, help="belief / GRU hidden size")
    parser.add_argument("--stoch", type=int, default=30, help="Gaussian state size")
    parser.add_argument("--hidden", type=int, default=200, help="MLP width, GRU input size")
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per repeat")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # memrl's training runs set it
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if load[0] > 0.5:
        print(f"note: load average {load[0]:.2f} > 0.5; the machine should be quiet")

    B, T, channels = args.batch_size, args.seq_len, tuple(args.channels)
    batch = generate_moving_dot_sequences(
        MovingDotConfig(grid_size=GRID, seq_len=T), B, torch.Generator().manual_seed(0)
    )
    obs, actions, is_first = batch["obs"], batch["actions"], batch["is_first"]
    actions_torchrl = actions * (~is_first).unsqueeze(-1)  # memrl zeroes a_t at is_first

    torch.manual_seed(0)
    memrl = RSSM(
        RSSMConfig(
            grid_size=GRID,
            action_dim=ACTION_DIM,
            channels=channels,
            deter_size=args.deter,
            hidden_size=args.hidden,
            stoch_size=args.stoch,
        )
    )
    torch.manual_seed(0)
    torchrl_model = TorchRLWorldModel(args.deter, args.stoch, args.hidden, channels)
    torch.manual_seed(0)
    torchrl_plain = TorchRLWorldModel(args.deter, args.stoch, args.hidden, channels, plain=True)
    sizes = {
        name: sum(p.numel() for p in model.parameters())
        for name, model in (("memrl", memrl), ("torchrl", torchrl_model), ("plain", torchrl_plain))
    }

    def memrl_loss() -> torch.Tensor:
        out = memrl(obs, actions, is_first=is_first)
        return rssm_loss(memrl, obs, out, BETA, BALANCE, FREE_BITS)["loss"]

    def torchrl_loss() -> torch.Tensor:
        return torchrl_model.loss(obs, actions_torchrl)

    def torchrl_plain_loss() -> torch.Tensor:
        return torchrl_plain.loss(obs, actions_torchrl)

    with torch.no_grad():
        init_loss = {"memrl": float(memrl_loss()), "torchrl": float(torchrl_loss())}

    embed = torch.randn(T, B, memrl.encoder.embed_size, generator=torch.Generator().manual_seed(1))
    embed_batch_first = embed.transpose(0, 1).contiguous()
    actions_tm, is_first_tm = actions.transpose(0, 1), is_first.T

    def memrl_dynamics() -> tuple[torch.Tensor, torch.Tensor]:
        out = memrl.observe(embed, actions_tm, is_first_tm, *memrl.initial(B))
        return out["h"], out["z"]

    def torchrl_dynamics() -> tuple[torch.Tensor, torch.Tensor]:
        out = torchrl_model.observe(embed_batch_first, actions_torchrl).get("next")
        return out.get("belief"), out.get("state")

    print(
        f"B={B} T={T} deter={args.deter} stoch={args.stoch} hidden={args.hidden} "
        f"channels={list(channels)} threads={args.threads}; parameters: memrl "
        f"{sizes['memrl']:,}, torchrl {sizes['torchrl']:,}; loss at init: memrl "
        f"{init_loss['memrl']:.2f}, torchrl {init_loss['torchrl']:.2f}"
    )
    measurements = {
        "training step": {
            "memrl": train_step(memrl_loss, memrl, torch.optim.Adam(memrl.parameters(), lr=LR)),
            "torchrl": train_step(
                torchrl_loss, torchrl_model, torch.optim.Adam(torchrl_model.parameters(), lr=LR)
            ),
        },
        "training step, torchrl-style vision": {
            "memrl": train_step(memrl_loss, memrl, torch.optim.Adam(memrl.parameters(), lr=LR)),
            "torchrl": train_step(
                torchrl_plain_loss,
                torchrl_plain,
                torch.optim.Adam(torchrl_plain.parameters(), lr=LR),
            ),
        },
        "dynamics only": {
            "memrl": dynamics_step(memrl_dynamics, memrl),
            "torchrl": dynamics_step(torchrl_dynamics, torchrl_model),
        },
    }
    rows = []
    for what, pair in measurements.items():
        ms = alternating(pair, args.steps, args.warmup, args.repeats)
        for framework in pair:
            rows.append(
                {
                    "measurement": what,
                    "framework": framework,
                    "ms_per_step": ms[framework],
                    "sequences_per_s": B / ms[framework] * 1e3,
                    "memrl_over_torchrl": ms["torchrl"] / ms["memrl"],
                }
            )

    print("\n| model | ms/step | sequences/s | memrl / torchrl |")
    print("|---|---:|---:|---:|")
    for row in rows:
        ratio = f"{row['memrl_over_torchrl']:.2f}x" if row["framework"] == "memrl" else ""
        print(
            f"| {row['framework']}, {row['measurement']} | {row['ms_per_step']:.1f} "
            f"| {row['sequences_per_s']:.1f} | {ratio} |"
        )
    if args.out is not None:
        result = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "load_average": load,
            "torch": torch.__version__,
            "torchrl": torchrl.__version__,
            "parameters": sizes,
            "init_loss": init_loss,
            "rows": rows,
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
