"""The Tamiyo recurrence spec's A/B on memrl/SeedLifecycle: PPO with a feed-forward policy
(--core none) vs LSTM vs GRU, each on both observations (``obs_mode`` "spec": one epoch of
view, the default; "rich": with the multi-epoch history), the same budget and seeds for all.

Every cell (obs_mode, core, seed) is a ``memrl ppo`` run directory under --out-dir; finished
cells are skipped and a killed run resumes from its last checkpoint, so the whole grid can run
across several sittings (run the same command again). After training, each policy plays the same
held-out episodes (--eval-seed): greedily, and with its memory reset every K steps.

Columns (mean ± std over seeds): the spec's four metrics -- final host validation accuracy;
episodes (of training, over all envs) until the smoothed training return first covers 90% of
the way from the untrained policies' return to the best final return of any policy (90% of the
best final return itself is no target: the host gains ~0.7 of accuracy whatever the controller
does, so every policy starts above it); cull precision (share of the agent's culls whose seed had
a counterfactual contribution <= 0 when culled, pooled over seeds and episodes); and the episode
reward with the memory reset every K steps (a policy that uses its memory loses reward at small
K; --core none cannot) -- and the episode reward, parameters added to the host by live seeds,
and the policy's own parameter count. Two scripted rows give the scale on the same episodes:
the host trained alone (always WAIT) and "commit" (germinate norm, fossilise as soon as
allowed). Writes ab.json, learning_curves.png and the markdown table into --out-dir.

python benchmarks/seed_lifecycle_ab.py               # 5 seeds x 6 policies x 100k steps (~20 h)
python benchmarks/seed_lifecycle_ab.py --seeds 0 1 2 --total-steps 20000
python benchmarks/seed_lifecycle_ab.py --report      # the table and plot of the finished cells
python benchmarks/seed_lifecycle_ab.py --total-steps 800 --seeds 0 --episodes 2 --out-dir /tmp/ab
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import torch

from memrl.envs import make_vector_env, vector_env_seeds
from memrl.envs.seed_lifecycle import Op
from memrl.rl.agent import PPOAgent
from memrl.rl.config import PPOConfig
from memrl.rl.evaluate import ended_episodes, evaluate_episodes
from memrl.rl.ppo import train_ppo
from memrl.runs import load_checkpoint, read_metrics, write_json
from memrl.runs.metrics import plt

ENV = "memrl/SeedLifecycle"
EPISODE_STEPS = 25


def run_config(args: argparse.Namespace, obs_mode: str, core: str, seed: int) -> PPOConfig:
    """One cell's PPO run: one episode per env per rollout, whole episodes per sequence."""
    return PPOConfig(
        env=ENV,
        env_kwargs=(f"obs_mode={obs_mode}", f"num_threads={args.threads}"),
        core=core,
        seed=seed,
        device="cpu",
        num_envs=args.num_envs,
        rollout_steps=EPISODE_STEPS,
        bptt_len=EPISODE_STEPS,
        minibatch_steps=EPISODE_STEPS * max(args.num_envs // 2, 1),
        total_steps=args.total_steps,
        eval_episodes=1,  # the cell's own evaluation below plays the held-out episodes
        output_dir=args.out_dir / f"{obs_mode}-{core}-seed{seed}",
    )


def train_cell(cfg: PPOConfig) -> None:
    """Train, or resume a killed run from its last checkpoint; a finished run is left alone."""
    run_dir = cfg.output_dir
    if (run_dir / "summary.json").exists():
        return
    if (run_dir / "checkpoints" / "last.pt").exists():
        train_ppo(dataclasses.replace(cfg, output_dir=None, resume=run_dir))
        return
    if run_dir.exists():  # killed before its first checkpoint: nothing to keep
        shutil.rmtree(run_dir)
    train_ppo(cfg)


def evaluate_cell(args: argparse.Namespace, cfg: PPOConfig) -> dict:
    """The trained policy on the held-out episodes: greedy, then with resets every K steps."""
    path = cfg.output_dir / "ab_eval.json"
    if path.exists():
        return json.loads(path.read_text())
    probe = make_vector_env(ENV, 1, 0, **cfg.env_options)
    agent = PPOAgent(
        cfg, probe.single_observation_space, probe.single_action_space, torch.device("cpu")
    )
    probe.close()
    agent.load_state_dict(load_checkpoint(cfg.output_dir / "checkpoints" / "last.pt")["agent"])
    play = {"env_id": ENV, "episodes": args.episodes, "seed": args.eval_seed}
    result = {
        "episodes": evaluate_episodes(agent, env_kwargs=cfg.env_options, **play),
        "reset_every": {
            str(k): [
                e["return"]
                for e in evaluate_episodes(agent, reset_every=k, env_kwargs=cfg.env_options, **play)
            ]
            for k in args.reset_every
        },
        "policy_params": sum(p.numel() for p in agent.policy.parameters()),
        "curve": [
            (r["step"] // EPISODE_STEPS, r["episode_return"])
            for r in read_metrics(cfg.output_dir / "metrics.jsonl")
            if "episode_return" in r
        ],
    }
    write_json(path, result)
    return result


def wait(masks: np.ndarray) -> np.ndarray:
    """The host trained alone: always WAIT."""
    return np.zeros((len(masks), 2), dtype=np.int64)


def commit(masks: np.ndarray) -> np.ndarray:
    """GERMINATE the first blueprint (norm) when allowed, FOSSILIZE as soon as allowed: the
    best scripted controller of the reward's ordering test."""
    ops = np.where(
        masks[:, Op.FOSSILIZE],
        Op.FOSSILIZE,
        np.where(masks[:, Op.GERMINATE], Op.GERMINATE, Op.WAIT),
    )
    return np.stack([ops, np.zeros_like(ops)], 1).astype(np.int64)


def scripted_episodes(args: argparse.Namespace, policy) -> list[dict[str, float]]:
    """A scripted controller, ``policy(action masks (N, 9)) -> actions (N, 2)``, on the
    held-out episodes."""
    envs = make_vector_env(ENV, min(args.episodes, 16), args.eval_seed, autoreset_mode="same_step")
    _, info = envs.reset(seed=vector_env_seeds(args.eval_seed, envs.num_envs))
    returns, found = np.zeros(envs.num_envs), []
    while len(found) < args.episodes:
        _, reward, done, _, info = envs.step(policy(info["action_mask"]))
        found += ended_episodes(returns, reward, done, info)
    envs.close()
    return found[: args.episodes]


def smooth(values: list[float], window: int = 5) -> np.ndarray:
    """Trailing moving average (shorter at the start)."""
    v = np.asarray(values, dtype=float)
    c = np.cumsum(np.insert(v, 0, 0.0))
    starts = np.maximum(np.arange(1, len(v) + 1) - window, 0)
    return (c[1:] - c[starts]) / (np.arange(1, len(v) + 1) - starts)


def mean_std(values: list[float], digits: int = 3) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def final_return(curve: list) -> float:
    """Mean training return over the last tenth of the run."""
    returns = [r for _, r in curve]
    return float(np.mean(returns[-max(len(returns) // 10, 1) :]))


def episodes_to(curve: list, target: float) -> float | None:
    """Training episodes until the smoothed return first reaches ``target`` (None: never)."""
    reached = np.flatnonzero(smooth([r for _, r in curve]) >= target)
    return float(curve[reached[0]][0]) if len(reached) else None


def report(args: argparse.Namespace, cells: dict[tuple[str, str], list[dict]]) -> str:
    """The markdown table over the finished cells, and learning_curves.png."""
    finals = {key: [final_return(c["curve"]) for c in runs] for key, runs in cells.items()}
    best = max(statistics.mean(v) for v in finals.values())
    # the return of the untrained policies (the first rollout of every run): the host gains
    # about 0.7 of accuracy whatever the controller does, so 90% of the best final return
    # itself is reached at once; the target is 90% of the way from here to the best final
    start = statistics.mean(c["curve"][0][1] for runs in cells.values() for c in runs)
    target = start + 0.9 * (best - start)
    rows = []
    for (obs_mode, core), runs in cells.items():
        episodes = [c["episodes"] for c in runs]

        def per_seed(key: str, episodes=episodes) -> list[float]:
            return [statistics.mean(e[key] for e in eps) for eps in episodes]

        culls = sum(e["culls"] for eps in episodes for e in eps)
        harmful = sum(e["culls_harmful"] for eps in episodes for e in eps)
        reach = [episodes_to(c["curve"], target) for c in runs]
        reached = [r for r in reach if r is not None]
        rows.append({
            "obs_mode": obs_mode,
            "policy": core,
            "seeds": str(len(runs)),
            "final host acc": mean_std(per_seed("final_val_acc")),
            "episodes to 90% best": (
                mean_std(reached, 0) + ("" if len(reached) == len(reach) else
                                        f" ({len(reach) - len(reached)} never)")
            ) if reached else "never",
            "cull precision": f"{harmful / culls:.2f} ({culls:.0f})" if culls else "– (0)",
            "episode reward": mean_std(per_seed("return")),
            **{
                f"reward, reset every {k}": mean_std(
                    [statistics.mean(c["reset_every"][str(k)]) for c in runs]
                )
                for k in args.reset_every
            },
            "params added": f"{statistics.mean(per_seed('params_added')):,.0f}",
            "policy params": f"{runs[0]['policy_params']:,}",
        })  # fmt: skip
    for name, policy in (("scripted: wait (host alone)", wait), ("scripted: commit", commit)):
        played = scripted_episodes(args, policy)
        rows.append({
            "obs_mode": "–",
            "policy": name,
            "final host acc": mean_std([statistics.mean(e["final_val_acc"] for e in played)]),
            "episode reward": mean_std([statistics.mean(e["return"] for e in played)]),
            "params added": f"{statistics.mean(e['params_added'] for e in played):,.0f}",
        })  # fmt: skip
    plot_curves(cells, target, args.out_dir / "learning_curves.png")
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(r.get(c, "–")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot_curves(cells: dict[tuple[str, str], list[dict]], target: float, path: Path) -> None:
    """Training return vs episodes, one panel per obs_mode: mean over seeds, min-max band."""
    modes = sorted({m for m, _ in cells}, key=["spec", "rich"].index)
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 3.8), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for (obs_mode, core), runs in cells.items():
            if obs_mode != mode:
                continue
            length = min(len(c["curve"]) for c in runs)
            x = [e for e, _ in runs[0]["curve"][:length]]
            ys = np.stack([smooth([r for _, r in c["curve"][:length]]) for c in runs])
            (line,) = ax.plot(x, ys.mean(0), label=f"{core} ({len(runs)} seeds)")
            ax.fill_between(x, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
        ax.axhline(target, color="gray", ls="--", lw=1, label="90% of the way to the best final")
        ax.set_title(f'obs_mode="{mode}"')
        ax.set_xlabel("training episodes")
        ax.set_ylabel("episode return (smoothed)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cores", nargs="+", default=["none", "lstm", "gru"])
    parser.add_argument(
        "--obs-modes", nargs="+", choices=["spec", "rich"], default=["spec", "rich"]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--total-steps", type=int, default=100_000)
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--episodes", type=int, default=32, help="held-out evaluation episodes")
    parser.add_argument("--eval-seed", type=int, default=10_000)
    parser.add_argument("--reset-every", type=int, nargs="*", default=[1, 5])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (policy and hosts)")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/seed_lifecycle_ab"))
    parser.add_argument("--report", action="store_true", help="only report the finished cells")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    grid = [(m, c, s) for s in args.seeds for m in args.obs_modes for c in args.cores]
    cells: dict[tuple[str, str], list[dict]] = {
        (m, c): [] for m in args.obs_modes for c in args.cores
    }
    for obs_mode, core, seed in grid:  # seed by seed: every policy gets a result early
        cfg = run_config(args, obs_mode, core, seed)
        if not args.report:
            train_cell(cfg)
        if (cfg.output_dir / "summary.json").exists():
            cells[(obs_mode, core)].append(evaluate_cell(args, cfg))
    cells = {key: runs for key, runs in cells.items() if runs}
    if not cells:
        raise SystemExit(f"no finished cells in {args.out_dir}")
    table = report(args, cells)
    done = sum(len(r) for r in cells.values())
    header = (
        f"{ENV}: {args.total_steps:,} env steps per run ({args.total_steps // EPISODE_STEPS:,} "
        f"episodes), {done}/{len(grid)} cells finished, greedy evaluation over {args.episodes} "
        f"held-out episodes (seed {args.eval_seed})"
    )
    (args.out_dir / "ab.md").write_text(f"{header}\n\n{table}\n")
    write_json(args.out_dir / "ab.json", {f"{m}/{c}": runs for (m, c), runs in cells.items()})
    print(f"\n{header}\n\n{table}")


if __name__ == "__main__":
    main()
