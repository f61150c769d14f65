"""``memrl ppo-eval RUN_DIR``: evaluate a PPO checkpoint, optionally resetting the memory every
K steps (the temporal-awareness ablation of the Tamiyo recurrence spec); a sweep over K writes a
return-vs-K plot."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import tyro

from memrl.envs import make_vector_env, vector_env_seeds
from memrl.rl.agent import PPOAgent
from memrl.rl.config import PPOConfig
from memrl.runs import ConfigError, load_checkpoint, load_config, resolve_device, write_json
from memrl.runs.metrics import plt


@dataclasses.dataclass
class PPOEvalConfig:
    """Evaluate the last checkpoint of a `memrl ppo` run."""

    run_dir: Annotated[Path, tyro.conf.Positional]
    """Run directory written by `memrl ppo`."""
    episodes: int = 32
    """Episodes per evaluation."""
    reset_every: Annotated[
        tuple[int, ...], tyro.conf.arg(help_behavior_hint="(default: no forced reset)")
    ] = ()
    """Also evaluate with the memory reset every K steps (several K: a return-vs-K plot)."""
    greedy: bool = True
    """Greedy (mode) actions; --no-greedy samples."""
    seed: int = 10_000
    """Seed of the evaluation environments."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Where to evaluate: auto picks cuda, then mps, then cpu."""

    def __post_init__(self) -> None:
        if self.episodes < 1:
            raise ValueError(f"--episodes {self.episodes}; expected a positive integer")
        if any(k < 1 for k in self.reset_every):
            raise ValueError(
                f"--reset-every {' '.join(map(str, self.reset_every))}; expected positive integers"
            )


def evaluate(
    agent: PPOAgent,
    env_id: str,
    episodes: int,
    seed: int,
    reset_every: int | None = None,
    greedy: bool = True,
    env_kwargs: Mapping[str, Any] | None = None,
) -> float:
    """Mean undiscounted return over ``episodes`` episodes; ``reset_every`` K resets the memory
    every K steps (the Tamiyo recurrence spec's temporal-awareness ablation); ``env_kwargs`` go
    to the environment's constructor (the training run's ``env_options``)."""
    found = evaluate_episodes(agent, env_id, episodes, seed, reset_every, greedy, env_kwargs)
    return float(np.mean([e["return"] for e in found]))


def evaluate_episodes(
    agent: PPOAgent,
    env_id: str,
    episodes: int,
    seed: int,
    reset_every: int | None = None,
    greedy: bool = True,
    env_kwargs: Mapping[str, Any] | None = None,
) -> list[dict[str, float]]:
    """``evaluate``'s episodes one by one: per episode its undiscounted ``"return"`` and the
    numbers of the env's ``info["episode"]`` at its last step, when the env gives one (the seed
    lifecycle's final accuracy, culls, ...). The same ``seed`` plays the same episodes."""
    num_envs = min(episodes, 16)
    envs = make_vector_env(
        env_id, num_envs, seed, "sync", autoreset_mode="same_step", **(env_kwargs or {})
    )
    policy, device = agent.policy, agent.device
    obs_np, info = envs.reset(seed=vector_env_seeds(seed, num_envs))
    state = policy.initial_state(num_envs, device)
    is_first = torch.ones(num_envs, dtype=torch.bool, device=device)
    returns, finished, t = np.zeros(num_envs), [], 0
    policy.eval()
    with torch.inference_mode():
        while len(finished) < episodes:
            obs = agent.obs_tensor(obs_np, update=False)
            reset = is_first
            if reset_every is not None and t % reset_every == 0:
                reset = torch.ones_like(is_first)
            dist_params, _, state = policy.step(obs, state, reset)
            dist = agent.distribution(dist_params, agent.mask_tensor(info))
            action = dist.mode() if greedy else dist.sample()
            obs_np, reward, term, trunc, info = envs.step(agent.env_actions(action))
            done = term | trunc
            finished += ended_episodes(returns, reward, done, info)
            is_first = torch.as_tensor(done, device=device)
            t += 1
    envs.close()
    return finished[:episodes]


def ended_episodes(
    returns: np.ndarray, reward: np.ndarray, done: np.ndarray, info: dict
) -> list[dict[str, float]]:
    """Add a same-step-autoreset vector env's ``reward`` to the running ``returns`` (N,), and
    for each env that ``done`` marks: its episode's return and the numbers of its final
    ``info["episode"]`` (its running return then restarts at 0)."""
    returns += reward
    stats = info.get("final_info", {}).get("episode", {})
    ended = []
    for i in np.flatnonzero(done):
        ended.append({"return": float(returns[i])})
        ended[-1].update({k: float(v[i]) for k, v in stats.items() if not k.startswith("_")})
    returns[done] = 0.0
    return ended


def run_ppo_eval(cfg: PPOEvalConfig) -> dict:
    """Load the run's config and last checkpoint, evaluate, write eval.json (and the sweep
    plot)."""
    if not (cfg.run_dir / "config.yaml").is_file():
        raise ConfigError(f"{cfg.run_dir} is not a memrl ppo run directory (no config.yaml)")
    train_cfg = load_config(PPOConfig, cfg.run_dir / "config.yaml")
    ckpt = load_checkpoint(cfg.run_dir / "checkpoints" / "last.pt")
    try:
        device = resolve_device(cfg.device)
    except ValueError as err:  # e.g. cuda asked for on a machine without it
        raise ConfigError(f"--device {cfg.device}: {err}") from None
    env_kwargs = train_cfg.env_options  # the run's environment, as it trained
    try:
        probe = make_vector_env(train_cfg.env, 1, cfg.seed, "sync", **env_kwargs)
    except (ValueError, TypeError) as err:  # a hand-edited config.yaml
        raise ConfigError(f"{cfg.run_dir / 'config.yaml'} {train_cfg.env_flags}: {err}") from None
    agent = PPOAgent(train_cfg, probe.single_observation_space, probe.single_action_space, device)
    probe.close()
    agent.load_state_dict(ckpt["agent"])
    results = {
        "env": train_cfg.env,
        "env_kwargs": list(train_cfg.env_kwargs),
        "core": train_cfg.core,
        "episodes": cfg.episodes,
        "step": ckpt["step"],
        "return": evaluate(
            agent, train_cfg.env, cfg.episodes, cfg.seed, greedy=cfg.greedy, env_kwargs=env_kwargs
        ),
    }
    if cfg.reset_every:
        sweep = {
            k: evaluate(agent, train_cfg.env, cfg.episodes, cfg.seed, k, cfg.greedy, env_kwargs)
            for k in cfg.reset_every
        }
        results["return_vs_reset_every"] = {str(k): v for k, v in sweep.items()}
        fig, ax = plt.subplots(figsize=(5, 3.4))
        ax.plot(list(sweep), list(sweep.values()), "o-", label="memory reset every K steps")
        ax.axhline(results["return"], color="gray", ls="--", label="no forced reset")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("K (steps between memory resets)")
        ax.set_ylabel("mean episode return")
        ax.set_title(f"{train_cfg.env} ({train_cfg.core})")
        ax.legend()
        fig.tight_layout()
        (cfg.run_dir / "plots").mkdir(exist_ok=True)
        fig.savefig(cfg.run_dir / "plots" / "return_vs_reset_every.png", dpi=110)
        plt.close(fig)
    write_json(cfg.run_dir / "eval.json", results)
    print(json.dumps(results, indent=2))
    return results
