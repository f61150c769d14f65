"""Where the time of ``memrl ppo`` goes, and the machine's ceiling for this setting.

    python benchmarks/ppo_profile.py [--env popgym/RepeatPreviousEasy] [--total-steps 65536]
        [--core lstm] [--separate-critic] [--threads 2]

Runs ``train_ppo`` with the issue's benchmark settings (16 envs x 128 steps, hidden 128, 4
epochs, minibatches of 512 steps) under cProfile and splits the wall time of the training loop
into: stepping the vector env (gymnasium + the env itself), the policy's forward passes in the
rollout (inference mode), the PPO update (forward, backward, Adam), and the rest (buffer, GAE,
logging, checkpoints). Then it steps the same vector env with random actions alone: steps/s of
an infinitely fast learner, the ceiling any PPO implementation has here.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from memrl.envs import make_vector_env, vector_env_seeds  # noqa: E402
from memrl.rl.ppo import PPOConfig, train_ppo  # noqa: E402

# (label, file suffix, function name): the cumulative time of these calls
PARTS = (
    ("vector env step", "gymnasium/vector/sync_vector_env.py", "step"),
    ("policy in the rollout", "memrl/rl/policy.py", "step"),
    ("PPO update", "memrl/rl/ppo.py", "update"),
)


def profile_training(args, out: Path) -> tuple[float, dict[str, float], float]:
    cfg = PPOConfig(
        env=args.env,
        core=args.core,
        num_envs=16,
        rollout_steps=128,
        total_steps=args.total_steps,
        hidden_size=128,
        separate_critic=args.separate_critic,
        epochs=4,
        minibatch_steps=512,
        eval_episodes=32,
        device="cpu",
        output_dir=out,
    )
    profiler = cProfile.Profile()
    profiler.enable()
    summary = train_ppo(cfg)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    parts = {}
    for label, suffix, name in PARTS:
        parts[label] = sum(
            ct for (file, _, fn), (_, _, _, ct, _) in stats.items()
            if file.endswith(suffix) and fn == name
        )  # fmt: skip
    return summary["wall_seconds"], parts, summary["sps"]


def env_ceiling(env_id: str, steps: int) -> float:
    envs = make_vector_env(env_id, 16, 0, autoreset_mode="same_step")
    envs.reset(seed=vector_env_seeds(0, 16))
    envs.action_space.seed(0)
    actions = [envs.action_space.sample() for _ in range(256)]
    start = time.perf_counter()
    for i in range(steps // 16):
        envs.step(actions[i % len(actions)])
    seconds = time.perf_counter() - start
    envs.close()
    return steps / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="popgym/RepeatPreviousEasy")
    parser.add_argument("--core", default="lstm")
    parser.add_argument("--total-steps", type=int, default=65536)
    parser.add_argument("--separate-critic", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()[0]:.2f}; torch threads {args.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        # the profiler's own overhead inflates Python-heavy parts: report shares and the plain sps
        wall, parts, _ = profile_training(args, Path(tmp) / "profiled")
        plain = train_ppo(
            PPOConfig(
                env=args.env, core=args.core, total_steps=args.total_steps, hidden_size=128,
                separate_critic=args.separate_critic, minibatch_steps=512, device="cpu",
                output_dir=Path(tmp) / "plain",
            )
        )  # fmt: skip
    ceiling = env_ceiling(args.env, args.total_steps)
    layout = "separate actor and critic" if args.separate_critic else "shared memory"
    print(f"\nmemrl ppo --core {args.core} ({layout}), {args.env}, {args.total_steps:,} steps\n")
    print("| part | share of the training loop |")
    print("|---|---:|")
    for label, seconds in parts.items():
        print(f"| {label} | {seconds / wall:.0%} |")
    print(f"| rest (buffer, GAE, logging, checkpoints) | {1 - sum(parts.values()) / wall:.0%} |")
    print(f"\nmemrl ppo without the profiler: {plain['sps']:,.0f} steps/s")
    print(f"the vector env alone, random actions: {ceiling:,.0f} steps/s (the ceiling)")
    print(f"memrl reaches {plain['sps'] / ceiling:.0%} of the ceiling")


if __name__ == "__main__":
    main()
