"""``memrl ppo``: recurrent PPO with per-env memory, stored state and truncated BPTT (the Tamiyo
recurrence spec; the stored (h, c) and burn-in of the R2D2 LSTM spec).

The loop is CleanRL's: collect a rollout, each env's memory carried across steps and rollouts and
reset where an episode starts (:mod:`memrl.rl.rollout`); compute GAE; then PPO epochs over
minibatches of whole sequences of ``bptt_len`` steps, each started from the state stored at its
first step (:class:`~memrl.rl.agent.PPOAgent`, :func:`~memrl.rl.agent.ppo_loss`).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from memrl.envs import make_vector_env, vector_env_seeds
from memrl.rl.agent import PPOAgent
from memrl.rl.buffer import RolloutBuffer
from memrl.rl.config import PPOConfig
from memrl.rl.distributions import action_head
from memrl.rl.evaluate import evaluate
from memrl.rl.normalize import RewardScaler
from memrl.rl.rollout import Carry, EpisodeTracker, collect_rollout
from memrl.runs import ConfigError, Run, distributed


def train_ppo(cfg: PPOConfig) -> dict[str, float]:
    """Train; writes the run directory and summary.json; returns the summary. Under torchrun
    each process runs its own ``num_envs`` envs; ``total_steps`` counts all processes' steps."""
    try:  # unknown env id, constructor keyword or value, unsupported space: the user's input
        envs = make_vector_env(
            cfg.env, cfg.num_envs, cfg.seed, cfg.vector, autoreset_mode="same_step",
            **cfg.env_options,
        )  # fmt: skip
        action_head(envs.single_action_space)
    except (ValueError, TypeError) as err:  # before the run directory exists
        raise ConfigError(f"{cfg.env_flags}: {err}") from None
    run = Run("ppo", cfg)
    device = run.device
    N, T, ranks = cfg.num_envs, cfg.rollout_steps, run.world_size
    steps_per_update = N * T * ranks  # every count below is in environment steps
    num_updates = max(1, cfg.total_steps // steps_per_update)
    run.check_budget(num_updates * steps_per_update, "--total-steps")
    agent = PPOAgent(cfg, envs.single_observation_space, envs.single_action_space, device)
    generator = run.generator()  # minibatch order
    reward_scaler = RewardScaler(N, cfg.gamma, cfg.norm_reward)
    update, mmer, wall = 0, -float("inf"), 0.0
    if (ckpt := run.restore()) is not None:
        agent.load_state_dict(ckpt["agent"])
        reward_scaler.load_state_dict(ckpt["reward_scaler"])
        update, mmer, wall = ckpt["update"], ckpt["mmer"], ckpt["wall_seconds"]
        if update * steps_per_update != run.start_step:
            raise ConfigError(
                f"--resume {run.dir}: its {run.start_step} steps are not {update} updates of "
                f"{N} envs x {T} steps x {ranks} processes; resume with the run's own "
                "--num-envs, --rollout-steps and number of processes"
            )
        if run.is_main:
            generator.set_state(ckpt["generator"])
        else:  # the checkpoint holds rank 0's generator only
            generator = run.generator(update)
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
    bar = run.progress(num_updates * steps_per_update)
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
        step, wall = update * steps_per_update, time.perf_counter() - start
        run.check_finite(step, loss=figures["loss/policy"] + figures["loss/value"])
        figures.update(sps=step / wall, lr=agent.optimizer.param_groups[0]["lr"])
        if carry.returns:
            figures["episode_return"] = float(np.mean(carry.returns))
        figures = distributed.mean_over_ranks(figures)
        if "episode_return" in figures:
            mmer = max(mmer, figures["episode_return"])
            figures["mmer"] = mmer
        run.log(step, figures)
        bar.update(steps_per_update)
        shown = {"ret": f"{figures['episode_return']:.2f}"} if "episode_return" in figures else {}
        bar.set_postfix(**shown, sps=f"{figures['sps']:.0f}")
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
        "total_steps": num_updates * steps_per_update,
        "wall_seconds": wall,
        "sps": num_updates * steps_per_update / wall,
        "processes": ranks,
        "mmer": mmer,
    }
    if run.is_main:
        summary["final_eval_return"] = evaluate(
            agent, cfg.env, cfg.eval_episodes, seed=cfg.seed + 10_000, env_kwargs=cfg.env_options
        )
    if not run.finish(summary):
        return summary
    print(
        f"ppo[{cfg.core}] {cfg.env}: final eval return {summary['final_eval_return']:.3f}, "
        f"mmer {mmer:.3f}, {summary['sps']:.0f} steps/s; run directory {run.dir}"
    )
    return summary
