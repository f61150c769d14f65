"""``PPOAgent`` (policy, optimiser, observation normaliser; acting and the update) and
``ppo_loss``, the clipped-surrogate loss of one minibatch of sequences (Schulman et al. 2017)."""

from __future__ import annotations

import numpy as np
import torch

from memrl.cores import State
from memrl.rl.buffer import RolloutBuffer, SequenceBatch
from memrl.rl.config import PPOConfig
from memrl.rl.distributions import (
    DiagGaussian,
    MaskedCategorical,
    action_head,
    action_mask_tensor,
    make_distribution,
    to_env_actions,
)
from memrl.rl.normalize import ObsNormalizer
from memrl.rl.policy import RecurrentActorCritic
from memrl.runs import distributed


def ppo_loss(
    dist: MaskedCategorical | DiagGaussian, values: torch.Tensor, mb: SequenceBatch, cfg: PPOConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's loss on the real steps of ``mb`` (padding left out of every term and statistic):
    the clipped surrogate on (per-minibatch normalised) advantages, ``vf_coef`` times half the
    squared value error (optionally clipped around the old values) and ``-ent_coef`` times the
    entropy. ``dist`` and ``values`` (L, S) are the current policy's on ``mb``. Returns the loss
    and its detached terms with the approximate KL and the clipped fraction."""
    log_ratio = mb.real(dist.log_prob(mb.actions)) - mb.real(mb.log_probs)  # (n,)
    ratio = log_ratio.exp()
    entropy = mb.real(dist.entropy()).mean()
    adv = mb.real(mb.advantages)
    if cfg.norm_adv and len(adv) > 1:  # one step has no spread to normalise by
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    clipped_ratio = ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)
    pg_loss = torch.max(-adv * ratio, -adv * clipped_ratio).mean()
    values, returns, old_values = mb.real(values), mb.real(mb.returns), mb.real(mb.values)
    v_loss = (values - returns).square()
    if cfg.clip_value:
        v_clip = old_values + (values - old_values).clamp(-cfg.clip_coef, cfg.clip_coef)
        v_loss = torch.max(v_loss, (v_clip - returns).square())
    v_loss = 0.5 * v_loss.mean()
    loss = pg_loss - cfg.ent_coef * entropy + cfg.vf_coef * v_loss
    with torch.no_grad():
        stats = {
            "loss/policy": pg_loss.detach(),
            "loss/value": v_loss.detach(),
            "loss/entropy": entropy.detach(),
            "approx_kl": ((ratio - 1) - log_ratio).mean(),  # Schulman's k3 estimator
            "clipfrac": ((ratio - 1).abs() > cfg.clip_coef).float().mean(),
        }
    return loss, stats


class PPOAgent:
    """Policy, optimiser and observation normaliser, with acting and the PPO update."""

    def __init__(self, cfg: PPOConfig, obs_space, action_space, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.head = action_head(action_space)
        obs_dim = int(np.prod(obs_space.shape))
        gaussian = self.head.action_dim if self.head.kind == "gaussian" else 0
        self.policy = RecurrentActorCritic(
            obs_dim,
            self.head.num_params,
            cfg.core,
            cfg.hidden_size,
            cfg.num_layers,
            cfg.separate_critic,
            gaussian_dim=gaussian,
            **cfg.core_options,
        ).to(device)
        self.optimizer = torch.optim.Adam(
            self.policy.parameters(), lr=cfg.lr, eps=1e-5, fused=device.type in ("cpu", "cuda")
        )
        self.obs_norm = ObsNormalizer((obs_dim,), cfg.norm_obs)

    def obs_tensor(self, obs: np.ndarray, update: bool) -> torch.Tensor:
        obs = torch.as_tensor(obs, dtype=torch.float32).reshape(len(obs), -1)
        return self.obs_norm(obs, update).to(self.device)

    def mask_tensor(self, info: dict) -> torch.Tensor | None:
        """``info["action_mask"]`` of a vector env as (N, num_params) bool, or None."""
        if "action_mask" not in info:
            return None
        return action_mask_tensor(self.head, info["action_mask"], self.device)

    def distribution(
        self, params: torch.Tensor, mask: torch.Tensor | None
    ) -> MaskedCategorical | DiagGaussian:
        return make_distribution(self.head, params, mask, log_std=self.policy.log_std)

    def env_actions(self, actions: torch.Tensor):
        return to_env_actions(self.head, actions)

    def state_dict(self) -> dict:
        return {
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "obs_norm": self.obs_norm.stats.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.obs_norm.stats.load_state_dict(state["obs_norm"])

    @torch.no_grad()
    def sequence_start_state(self, mb: SequenceBatch) -> State:
        """The stored state, or with burn-in the state re-derived by replaying the steps before
        the sequence with the current weights (rows without such steps keep the stored one)."""
        if mb.burn_in is None:
            return mb.state
        burn = mb.burn_in
        _, _, warmed = self.policy(burn.obs, burn.state, burn.is_first)
        return tuple(
            torch.where(burn.valid.view(-1, *[1] * (w.dim() - 1)), w, s)
            for w, s in zip(warmed, mb.state, strict=True)
        )

    def update(self, buffer: RolloutBuffer, generator: torch.Generator) -> dict[str, float]:
        """PPO epochs over minibatches of whole sequences (truncated BPTT), each started from
        the state stored at its first step; returns the statistics averaged over minibatches."""
        cfg = self.cfg
        params = list(self.policy.parameters())
        sums: dict[str, float] = {}
        count = 0
        for epoch in range(cfg.epochs):
            approx_kl = 0.0
            if cfg.refresh_states and epoch > 0:  # the first epoch has the rollout's weights
                buffer.refresh_states(self.policy)
            for mb in buffer.minibatches(cfg.minibatch_steps, generator):
                dist_params, values, _ = self.policy(
                    mb.obs, self.sequence_start_state(mb), mb.is_first
                )
                loss, stats = ppo_loss(self.distribution(dist_params, mb.masks), values, mb, cfg)
                grad_norm = distributed.optimizer_step(
                    self.optimizer, loss, params, cfg.max_grad_norm
                )
                for key, value in [*stats.items(), ("grad_norm", grad_norm)]:
                    sums[key] = sums.get(key, 0.0) + float(value)
                approx_kl = float(stats["approx_kl"])
                count += 1
            if cfg.target_kl is not None:  # every rank stops at the same epoch
                approx_kl = float(distributed.all_sum(torch.tensor(approx_kl))) / (
                    distributed.world_size()
                )
                if approx_kl > cfg.target_kl:
                    break
        return {k: v / max(count, 1) for k, v in sums.items()}
