"""The Tamiyo recurrence spec's A/B: PPO with a feed-forward policy (--core none) vs LSTM vs
GRU on the seed-lifecycle task (memrl/SeedLifecycle), same budget, several seeds; prints a
markdown table.

Columns (greedy evaluation over --episodes episodes after training; mean +- std over seeds):
final host validation accuracy, episode reward, parameters added by live seeds, cull precision
(share of the agent's culls whose seed had a counterfactual contribution <= 0 when culled,
pooled over seeds), fossilisations per episode, and the spec's temporal-awareness ablation:
the episode reward when the policy's memory is reset every K steps (memrl.rl.evaluate's
reset_every; a policy that uses its memory loses reward at small K, --core none cannot). A
"wait (no seeds)" row is the host trained alone, for scale.

python benchmarks/seed_lifecycle_ab.py   # the README's table: 3 seeds x 6,000 steps (~75 min)
python benchmarks/seed_lifecycle_ab.py --total-steps 50000   # a longer budget (~10 h on 1 thread)
python benchmarks/seed_lifecycle_ab.py --total-steps 200 --seeds 0 --episodes 2   # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from memrl.envs import make_env, make_vector_env, vector_env_seeds
from memrl.rl.evaluate import evaluate
from memrl.rl.ppo import PPOAgent, PPOConfig, train_ppo
from memrl.runs import load_checkpoint

ENV = "memrl/SeedLifecycle"


def episode_stats(agent: PPOAgent, episodes: int, seed: int) -> list[dict[str, float]]:
    """``info["episode"]`` of ``episodes`` greedy episodes, each with its return added."""
    num_envs = min(episodes, 16)
    envs = make_vector_env(ENV, num_envs, seed, "sync", autoreset_mode="same_step")
    obs_np, info = envs.reset(seed=vector_env_seeds(seed, num_envs))
    state = agent.policy.initial_state(num_envs, agent.device)
    is_first = torch.ones(num_envs, dtype=torch.bool)
    returns, finished = np.zeros(num_envs), []
    agent.policy.eval()
    with torch.inference_mode():
        while len(finished) < episodes:
            params, _, state = agent.policy.step(agent.obs_tensor(obs_np, False), state, is_first)
            action = agent.distribution(params, agent.mask_tensor(info)).mode()
            obs_np, reward, term, trunc, info = envs.step(agent.env_actions(action))
            returns += reward
            done = term | trunc
            for i in np.flatnonzero(done):
                stats = info["final_info"]["episode"]
                finished.append({k: float(v[i]) for k, v in stats.items() if not k.startswith("_")})
                finished[-1]["return"] = float(returns[i])
            returns[done] = 0.0
            is_first = torch.as_tensor(done)
    envs.close()
    return finished[:episodes]


def wait_only_stats(episodes: int, seed: int) -> list[dict[str, float]]:
    """The host trained alone (always WAIT)."""
    out = []
    for episode_seed in vector_env_seeds(seed, episodes):
        env = make_env(ENV)
        env.reset(seed=episode_seed)
        total, terminated = 0.0, False
        while not terminated:
            _, reward, terminated, _, info = env.step(np.zeros(2, dtype=np.int64))
            total += reward
        out.append(info["episode"] | {"return": total})
    return out


def summarise(name: str, per_seed: list[list[dict]], ablation: dict[int, list[float]]) -> dict:
    def mean_std(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {sd:.3f}"

    def per_seed_mean(key: str) -> list[float]:
        return [statistics.mean(e[key] for e in episodes) for episodes in per_seed]

    culls = sum(e["culls"] for episodes in per_seed for e in episodes)
    harmful = sum(e["culls_harmful"] for episodes in per_seed for e in episodes)
    return {
        "policy": name,
        "final host acc": mean_std(per_seed_mean("final_val_acc")),
        "episode reward": mean_std(per_seed_mean("return")),
        "params added": f"{statistics.mean(per_seed_mean('params_added')):,.0f}",
        "cull precision": f"{harmful / culls:.2f} ({int(culls)} culls)" if culls else "– (0 culls)",
        "fossilised / ep": f"{statistics.mean(per_seed_mean('fossilized')):.2f}",
        **{f"reward, reset every {k}": mean_std(v) if v else "–" for k, v in ablation.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cores", nargs="+", default=["none", "lstm", "gru"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--total-steps", type=int, default=6_000)
    parser.add_argument("--num-envs", type=int, default=8)
    parser.add_argument("--vector", choices=["sync", "async"], default="sync")
    parser.add_argument("--episodes", type=int, default=16, help="evaluation episodes")
    parser.add_argument("--reset-every", type=int, nargs="*", default=[1, 5])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks_seed_lifecycle_ab.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows, raw = [], {}
    eval_seed = 10_000
    with tempfile.TemporaryDirectory() as tmp:
        for core in args.cores:
            per_seed, ablation, walls = [], {k: [] for k in args.reset_every}, []
            for seed in args.seeds:
                cfg = PPOConfig(
                    env=ENV,
                    core=core,
                    seed=seed,
                    device="cpu",
                    num_envs=args.num_envs,
                    vector=args.vector,
                    rollout_steps=25,  # one episode per env per rollout
                    bptt_len=25,  # whole episodes
                    minibatch_steps=25 * max(args.num_envs // 2, 1),
                    total_steps=args.total_steps,
                    eval_episodes=args.episodes,
                    output_dir=Path(tmp) / f"{core}-{seed}",
                )
                start = time.perf_counter()
                train_ppo(cfg)
                walls.append(time.perf_counter() - start)
                probe = make_env(ENV)
                agent = PPOAgent(
                    cfg, probe.observation_space, probe.action_space, torch.device("cpu")
                )
                probe.close()
                agent.load_state_dict(
                    load_checkpoint(cfg.output_dir / "checkpoints" / "last.pt")["agent"]
                )
                per_seed.append(episode_stats(agent, args.episodes, eval_seed))
                for k in args.reset_every:
                    ablation[k].append(evaluate(agent, ENV, args.episodes, eval_seed, k))
            rows.append(
                summarise(core, per_seed, ablation)
                | {"train wall s": f"{statistics.mean(walls):.0f}"}
            )
            raw[core] = {"episodes": per_seed, "reset_every": ablation, "wall_seconds": walls}
    baseline = [wait_only_stats(args.episodes, eval_seed)]
    rows.append(summarise("wait (no seeds)", baseline, {k: [] for k in args.reset_every}))
    raw["wait"] = {"episodes": baseline}
    args.out.write_text(json.dumps(raw, indent=2) + "\n")
    print(
        f"\n{ENV}: {args.total_steps:,} env steps per run ({args.total_steps // 25:,} episodes), "
        f"seeds {args.seeds}, greedy evaluation over {args.episodes} episodes\n"
    )
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "–")) for c in columns) + " |")


if __name__ == "__main__":
    main()
