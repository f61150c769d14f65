"""``memrl ppo``: recurrent PPO with per-env memory, stored state and truncated BPTT.

Seeds 002 and 004. Rollout: each env's core state is carried across steps and rollouts and
reset exactly where an episode starts (``is_first``). The vector env autoresets in the same step
(gymnasium's SAME_STEP mode): the observation after a terminal step is already the next
episode's first one, so no transition spans two episodes and no reset step is ever trained as
a real step; a truncated episode is bootstrapped from the value of its final observation, run
through the pre-reset state. Update: PPO over sequences of ``bptt_len`` steps, minibatches of
whole sequences, each started from the state stored at its first step.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from memrl.cores import State, select_state
from memrl.envs import make_vector_env, vector_env_seeds
from memrl.rl.buffer import RolloutBuffer, SequenceBatch
from memrl.rl.distributions import (
    action_head,
    action_mask_tensor,
    make_distribution,
    to_env_actions,
)
from memrl.rl.evaluate import EpisodeTracker, evaluate
from memrl.rl.normalize import ObsNormalizer, RewardScaler
from memrl.rl.policy import RecurrentActorCritic
from memrl.runs import ConfigError, Run, RunOptions, distributed

RNN_CORES = ("gru", "lstm")  # the cores that take --rnn-init


@dataclasses.dataclass
class PPOConfig(RunOptions):
    """Recurrent PPO on any gymnasium / POPGym environment."""

    env: str = "popgym/RepeatPreviousEasy"
    """Environment: popgym/<Name>, a registered gymnasium id, or module:Class."""
    core: Literal["none", "gru", "lstm", "s4d"] = "gru"
    """Memory core (none = the feed-forward baseline on the same code path)."""
    num_envs: int = 16
    """Parallel environments."""
    vector: Literal["sync", "async"] = "sync"
    """gymnasium.vector SyncVectorEnv, or AsyncVectorEnv (one process per env)."""
    rollout_steps: int = 128
    """Steps per env per rollout."""
    total_steps: int = 500_000
    """Environment steps in total (all envs)."""
    hidden_size: int = 128
    """Encoder and core width."""
    num_layers: int = 1
    """Core layers."""
    separate_critic: bool = False
    """Give the critic its own encoder and memory."""
    rnn_init: Literal["orthogonal", "pytorch"] = "orthogonal"
    """Initialisation of a gru/lstm core: orthogonal recurrent weights and zero biases (the LSTM's
    forget-gate bias 1), or PyTorch's own uniform one (sb3-contrib's)."""
    bptt_len: int = 16
    """Truncated-BPTT sequence length; must divide rollout_steps."""
    split_episodes: bool = False
    """Also start a training sequence at every episode start (sequences of at most bptt_len
    steps, shorter ones padded and left out of the loss), as sb3-contrib does: a sequence that
    begins an episode then starts from the exact zero state, and with bptt_len >= the episode
    length each episode is one sequence."""
    epochs: int = 4
    """PPO epochs per rollout."""
    minibatch_steps: int = 512
    """Steps per minibatch (whole sequences: minibatch_steps / bptt_len of them)."""
    lr: float = 1e-3
    """Adam learning rate (1e-3 matters for the LSTM on POPGym: ../shared/notes/popgym.md)."""
    anneal_lr: bool = True
    """Anneal the learning rate linearly to zero."""
    gamma: float = 0.99
    """Discount."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    clip_coef: float = 0.2
    """PPO ratio clip."""
    clip_value: bool = False
    """Clip the value update around the old values too."""
    ent_coef: float = 0.01
    """Entropy bonus."""
    vf_coef: float = 0.5
    """Value-loss weight."""
    max_grad_norm: float = 0.5
    """Gradient-norm clip."""
    target_kl: float | None = None
    """Stop the epoch loop early when the approximate KL exceeds this."""
    burn_in: int = 0
    """R2D2 burn-in: re-derive each sequence's initial state by replaying the B steps before it
    (no gradient) from the state stored there; 0 <= B <= bptt_len."""
    refresh_states: bool = True
    """Before each epoch after the first, recompute the stored sequence-start states with the
    current weights (PPO's new log-probs then condition on the new policy's memory of the
    rollout, not on the rollout policy's)."""
    norm_adv: bool = True
    """Normalise advantages per minibatch."""
    norm_obs: bool = False
    """Running observation normalisation."""
    norm_reward: bool = False
    """Running reward scaling by the std of the discounted return."""
    eval_episodes: int = 32
    """Episodes of the final evaluation (greedy actions)."""
    checkpoint_interval: int = 20
    """Checkpoint every this many rollouts (and at the end)."""

    def __post_init__(self) -> None:
        for name in (
            "num_envs",
            "rollout_steps",
            "total_steps",
            "hidden_size",
            "num_layers",
            "bptt_len",
            "epochs",
            "minibatch_steps",
            "checkpoint_interval",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; expected a positive integer")
        if not 0 <= self.burn_in <= self.bptt_len:
            raise ValueError(f"burn_in={self.burn_in}; expected 0 <= burn_in <= bptt_len")
        if self.rollout_steps % self.bptt_len:
            raise ValueError(
                f"bptt_len={self.bptt_len} must divide rollout_steps={self.rollout_steps}"
            )
        if self.minibatch_steps % self.bptt_len:
            raise ValueError(
                f"minibatch_steps={self.minibatch_steps} must be a multiple of "
                f"bptt_len={self.bptt_len}"
            )
        if self.rnn_init != "orthogonal" and self.core not in RNN_CORES:
            raise ValueError(f"rnn_init={self.rnn_init!r} applies to gru and lstm, not {self.core}")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr}; expected a positive number")
        if not 0 <= self.gamma <= 1 or not 0 <= self.gae_lambda <= 1:
            raise ValueError(f"gamma={self.gamma}, gae_lambda={self.gae_lambda}; expected [0, 1]")


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
            **({"init": cfg.rnn_init} if cfg.core in RNN_CORES else {}),
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

    def distribution(self, params: torch.Tensor, mask: torch.Tensor | None):
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
        the state stored at its first step."""
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
                dist = self.distribution(dist_params, mb.masks)
                log_ratio = mb.real(dist.log_prob(mb.actions)) - mb.real(mb.log_probs)
                ratio = log_ratio.exp()
                entropy = mb.real(dist.entropy()).mean()
                adv = mb.real(mb.advantages)
                if cfg.norm_adv:
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                clipped_ratio = ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)
                pg_loss = torch.max(-adv * ratio, -adv * clipped_ratio).mean()
                values, returns, old_values = (
                    mb.real(values),
                    mb.real(mb.returns),
                    mb.real(mb.values),
                )
                v_loss = (values - returns).square()
                if cfg.clip_value:
                    v_clip = old_values + (values - old_values).clamp(-cfg.clip_coef, cfg.clip_coef)
                    v_loss = torch.max(v_loss, (v_clip - returns).square())
                v_loss = 0.5 * v_loss.mean()
                loss = pg_loss - cfg.ent_coef * entropy + cfg.vf_coef * v_loss
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                distributed.average_gradients(params)
                grad_norm = nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, foreach=True)
                self.optimizer.step()
                with torch.no_grad():
                    approx_kl = ((ratio - 1) - log_ratio).mean().item()
                    clipfrac = ((ratio - 1).abs() > cfg.clip_coef).float().mean().item()
                for key, value in (
                    ("loss/policy", pg_loss.item()),
                    ("loss/value", v_loss.item()),
                    ("loss/entropy", entropy.item()),
                    ("approx_kl", approx_kl),
                    ("clipfrac", clipfrac),
                    ("grad_norm", float(grad_norm)),
                ):
                    sums[key] = sums.get(key, 0.0) + value
                count += 1
            if cfg.target_kl is not None:  # every rank stops at the same epoch
                approx_kl = float(distributed.all_sum(torch.tensor(approx_kl))) / (
                    distributed.world_size()
                )
                if approx_kl > cfg.target_kl:
                    break
        return {k: v / max(count, 1) for k, v in sums.items()}


@dataclass
class Carry:
    """What a rollout hands to the next: the envs' last observation and info, each env's core
    state and whether its next step starts an episode."""

    obs: np.ndarray
    info: dict
    state: State
    is_first: torch.Tensor  # (N,) bool
    episodes: EpisodeTracker
    reward_scaler: RewardScaler
    returns: list[float] = field(default_factory=list)  # of the episodes ended this rollout


def collect_rollout(agent: PPOAgent, envs, buffer: RolloutBuffer, carry: Carry) -> torch.Tensor:
    """Fill ``buffer`` with ``buffer.T`` steps of every env; returns the bootstrap value of the
    observation after the last step. The vector env autoresets in the same step, so the
    observation after a done is the next episode's first: it is marked ``is_first`` and the core
    resets on it. A truncated episode's reward gets ``gamma * V(final_obs)``, the value computed
    from the state that had not been reset."""
    policy, device, gamma = agent.policy, agent.device, agent.cfg.gamma
    policy.eval()
    with torch.inference_mode():
        obs = agent.obs_tensor(carry.obs, update=True)
        mask = agent.mask_tensor(carry.info)
        state, is_first = carry.state, carry.is_first
        for t in range(buffer.T):
            buffer.store_state(t, state)
            dist_params, value, next_state = policy.step(obs, state, is_first)
            dist = agent.distribution(dist_params, mask)
            action = dist.sample()
            buffer.obs[t], buffer.is_first[t], buffer.actions[t] = obs, is_first, action
            buffer.log_probs[t], buffer.values[t] = dist.log_prob(action), value
            if mask is not None:
                buffer.masks[t] = mask
            obs_np, reward_np, term_np, trunc_np, info = envs.step(agent.env_actions(action))
            done_np = term_np | trunc_np
            carry.episodes.update(reward_np, done_np)
            reward = carry.reward_scaler(
                torch.as_tensor(reward_np, dtype=torch.float32), torch.as_tensor(done_np)
            )
            truncated = np.flatnonzero(trunc_np & ~term_np)
            if len(truncated):
                final = np.stack([info["final_obs"][i] for i in truncated])
                rows = torch.as_tensor(truncated, device=device)
                _, final_value, _ = policy.step(
                    agent.obs_tensor(final, update=False),
                    select_state(next_state, rows),
                    torch.zeros(len(truncated), dtype=torch.bool, device=device),
                )
                reward[truncated] += gamma * final_value.float().cpu()
            is_first = torch.as_tensor(done_np, device=device)
            buffer.rewards[t], buffer.dones[t] = reward.to(device), is_first
            state = next_state
            obs = agent.obs_tensor(obs_np, update=True)
            mask = agent.mask_tensor(info)
        _, last_value, _ = policy.step(obs, state, is_first)
    carry.obs, carry.info, carry.state, carry.is_first = obs_np, info, state, is_first
    carry.returns = carry.episodes.pop()
    return last_value


def train_ppo(cfg: PPOConfig) -> dict[str, float]:
    """Train; writes the run directory and summary.json; returns the summary. Under torchrun
    each process runs its own ``num_envs`` envs; ``total_steps`` counts all processes' steps."""
    run = Run("ppo", cfg)
    device = run.device
    N, T, ranks = cfg.num_envs, cfg.rollout_steps, run.world_size
    try:
        envs = make_vector_env(cfg.env, N, cfg.seed, cfg.vector, autoreset_mode="same_step")
        agent = PPOAgent(cfg, envs.single_observation_space, envs.single_action_space, device)
    except ValueError as err:  # unknown env id, unsupported space: the user's input
        raise ConfigError(f"--env {cfg.env}: {err}") from None
    num_updates = max(1, cfg.total_steps // (N * T * ranks))
    generator = torch.Generator().manual_seed(cfg.seed + run.rank)
    reward_scaler = RewardScaler(N, cfg.gamma, cfg.norm_reward)
    update, mmer, wall = 0, -float("inf"), 0.0
    if (ckpt := run.restore()) is not None:
        agent.load_state_dict(ckpt["agent"])
        reward_scaler.load_state_dict(ckpt["reward_scaler"])
        generator.set_state(ckpt["generator"])
        update, mmer, wall = ckpt["update"], ckpt["mmer"], ckpt["wall_seconds"]
        if run.rank:  # rank 0's generator was saved
            generator.manual_seed(cfg.seed + run.rank + 7919 * update)
    distributed.broadcast_parameters(agent.policy)
    # envs cannot be checkpointed: on resume they restart, with fresh seeds, and memory with them;
    # rank r's envs are envs r*N .. (r+1)*N-1 of one process with N*ranks envs
    seeds = vector_env_seeds(cfg.seed + update, N * ranks)[run.rank * N : (run.rank + 1) * N]
    obs, info = envs.reset(seed=seeds)
    carry = Carry(
        obs,
        info,
        agent.policy.initial_state(N, device),
        torch.ones(N, dtype=torch.bool, device=device),
        EpisodeTracker(N),
        reward_scaler,
    )
    mask = agent.mask_tensor(info)
    buffer = RolloutBuffer(
        T,
        N,
        int(np.prod(envs.single_observation_space.shape)),
        (agent.head.action_dim,),
        agent.head.action_dtype,
        None if mask is None else mask.shape[-1],
        cfg.bptt_len,
        device,
        burn_in=cfg.burn_in,
        split_episodes=cfg.split_episodes,
    )
    bar = run.progress(num_updates * N * T * ranks)
    start = time.perf_counter() - wall
    while update < num_updates:
        update += 1
        if cfg.anneal_lr:
            for group in agent.optimizer.param_groups:
                group["lr"] = cfg.lr * (1.0 - (update - 1) / num_updates)
        stats_before = [agent.obs_norm.stats.state_dict(), reward_scaler.stats.state_dict()]
        last_value = collect_rollout(agent, envs, buffer, carry)
        agent.obs_norm.stats.merge_ranks(stats_before[0])
        reward_scaler.stats.merge_ranks(stats_before[1])
        buffer.compute_gae(last_value, cfg.gamma, cfg.gae_lambda)
        agent.policy.train()
        figures = agent.update(buffer, generator)
        step, wall = update * N * T * ranks, time.perf_counter() - start
        run.check_finite(step, loss=figures["loss/policy"] + figures["loss/value"])
        figures.update(sps=step / wall, lr=agent.optimizer.param_groups[0]["lr"])
        if carry.returns:
            figures["episode_return"] = float(np.mean(carry.returns))
        figures = distributed.mean_over_ranks(figures)
        if "episode_return" in figures:
            mmer = max(mmer, figures["episode_return"])
            figures["mmer"] = mmer
        run.log(step, figures)
        bar.update(N * T * ranks)
        bar.set_postfix(
            ret=f"{figures.get('episode_return', float('nan')):.2f}", sps=f"{figures['sps']:.0f}"
        )
        if update % cfg.checkpoint_interval == 0 or update == num_updates:
            run.save(
                step,
                {
                    "agent": agent.state_dict(),
                    "generator": generator.get_state(),
                    "reward_scaler": reward_scaler.state_dict(),
                    "update": update,
                    "mmer": mmer,
                    "wall_seconds": wall,
                },
            )
    bar.close()
    envs.close()
    summary = {
        "env": cfg.env,
        "core": cfg.core,
        "total_steps": num_updates * N * T * ranks,
        "wall_seconds": wall,
        "sps": num_updates * N * T * ranks / wall,
        "processes": ranks,
        "mmer": mmer,
    }
    run.finish()
    if not run.is_main:
        return summary
    eval_return = evaluate(agent, cfg.env, cfg.eval_episodes, seed=cfg.seed + 10_000)
    summary["final_eval_return"] = eval_return
    (run.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"ppo[{cfg.core}] {cfg.env}: final eval return {eval_return:.3f}, mmer {mmer:.3f}, "
        f"{summary['sps']:.0f} steps/s; run directory {run.dir}"
    )
    return summary
