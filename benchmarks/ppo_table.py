"""Final return and wall time of memrl ppo for each environment x core (the README's table).

python benchmarks/ppo_table.py --envs popgym/RepeatPreviousEasy --cores none gru lstm s4d
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from memrl.rl.ppo import PPOConfig, train_ppo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--envs",
        nargs="+",
        default=[
            "popgym/RepeatPreviousEasy",
            "popgym/PositionOnlyCartPoleEasy",
            "popgym/CountRecallEasy",
        ],
    )
    parser.add_argument("--cores", nargs="+", default=["none", "gru", "lstm", "s4d"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--total-steps", type=int, default=500_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks_ppo_table.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for env in args.envs:
            for core in args.cores:
                for seed in args.seeds:
                    cfg = PPOConfig(
                        env=env,
                        core=core,
                        seed=seed,
                        device="cpu",
                        total_steps=args.total_steps,
                        output_dir=Path(tmp) / f"{env.replace('/', '_')}-{core}-{seed}",
                    )
                    rows.append(train_ppo(cfg) | {"seed": seed})
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n{args.total_steps:,} steps, greedy evaluation over 32 episodes, seeds {args.seeds}\n")
    print("| env | core | final return (mean of seeds) | per seed | wall s | steps/s |")
    print("|---|---|---:|---|---:|---:|")
    for env in args.envs:
        for core in args.cores:
            mine = [r for r in rows if r["env"] == env and r["core"] == core]
            returns = [r["final_eval_return"] for r in mine]
            print(
                f"| {env} | {core} | {statistics.mean(returns):.3f} | "
                f"{', '.join(f'{x:.2f}' for x in returns)} | "
                f"{statistics.mean(r['wall_seconds'] for r in mine):.0f} | "
                f"{statistics.mean(r['sps'] for r in mine):,.0f} |"
            )


if __name__ == "__main__":
    main()
