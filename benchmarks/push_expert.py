"""The scripted push expert on fresh seeds: success rate, episode length, seconds per episode.

    python benchmarks/push_expert.py [--episodes 100] [--first-seed 1000] [--noise 0.0]

Seeds first-seed .. first-seed + episodes - 1 (default 1000..1099: disjoint from the seeds that
`memrl push-collect` uses by default and from the tests). Each episode runs in a fresh env with
the 84 x 84 camera rendering every step, one after another in this process, exactly as
push-collect records it; "s / episode" is the wall time of one such episode. Prints a markdown
table, the share of steps in each phase, and the seeds the expert failed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from memrl.envs.expert import rollout_expert
from memrl.envs.push import PHASES, PushConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--first-seed", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.0)
    args = parser.parse_args()

    config = PushConfig()
    lengths, successes, seconds, failed = [], [], [], []
    phase_counts = np.zeros(len(PHASES), dtype=np.int64)
    for seed in range(args.first_seed, args.first_seed + args.episodes):
        start = time.perf_counter()
        episode = rollout_expert(config, seed, noise=args.noise)
        seconds.append(time.perf_counter() - start)
        success = episode["attrs"]["success"]
        successes.append(success)
        lengths.append(len(episode["actions"]))
        phase_counts += np.bincount(episode["phase"], minlength=len(PHASES))
        if not success:
            failed.append(seed)

    to_success = np.array([n for n, ok in zip(lengths, successes, strict=True) if ok])
    last = args.first_seed + args.episodes - 1
    print(f"scripted push expert, seeds {args.first_seed}..{last}, noise {args.noise}\n")
    print(
        "| episodes | success | steps to success (mean) | (p90) | steps / episode | s / episode |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    mean_steps = f"{to_success.mean():.1f}" if len(to_success) else "-"
    p90_steps = f"{np.percentile(to_success, 90):.0f}" if len(to_success) else "-"
    print(
        f"| {args.episodes} | {np.mean(successes):.1%} | {mean_steps} | {p90_steps} "
        f"| {np.mean(lengths):.1f} | {np.mean(seconds):.3f} |"
    )
    shares = phase_counts / phase_counts.sum()
    print(
        "\nsteps per phase: "
        + ", ".join(f"{p} {s:.0%}" for p, s in zip(PHASES, shares, strict=True))
    )
    print(f"failed seeds: {failed or 'none'}")


if __name__ == "__main__":
    main()
