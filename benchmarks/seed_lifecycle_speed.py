"""Env steps per second of memrl/SeedLifecycle's vector envs, side by side, under random masked
actions from one generator (so every variant plays the same episodes and sees the same masks):

  per-env          N single envs in gymnasium's SyncVectorEnv (``batched=False``): how
                   ``make_vector_env`` ran N envs before the batched env; one torch thread
  per-env async    the same N single envs in an AsyncVectorEnv (one process per env)
  batched          ``make_vector_env``'s default: all N hosts trained as one computation, one
                   thread (every env bit-identical to its single env)
  batched 2 thr    the same with ``num_threads=2`` (equal to the single env up to rounding)

python benchmarks/seed_lifecycle_speed.py                        # N = 4, 16, 64: ~8 minutes
python benchmarks/seed_lifecycle_speed.py --num-envs 16 --steps 10

Prints one row per N: steps/s of each (wall clock) and each one's ratio to per-env, and the
1-minute load average over the row (the machine's other work slows every variant).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from memrl.envs import make_vector_env

ENV = "memrl/SeedLifecycle"


def random_masked_actions(info: dict, rng: np.random.Generator) -> np.ndarray:
    """Per env, a uniformly random allowed operation and a random blueprint."""
    masks = info["action_mask"]  # (N, 4 + blueprints)
    return np.array([[rng.choice(np.flatnonzero(m[:4])), rng.integers(len(m) - 4)] for m in masks])


VARIANTS = {
    "per-env": {"batched": False},
    "per-env async": {"vector": "async"},
    "batched": {},
    "batched 2 thr": {"num_threads": 2},
}


def measure(num_envs: int, steps: int, options: dict, seed: int) -> float:
    """Steps/s over ``steps`` vector steps after one warm-up step (25 steps = one episode and
    its autoreset)."""
    envs = make_vector_env(ENV, num_envs, seed, autoreset_mode="same_step", **options)
    rng = np.random.default_rng(seed)
    _, info = envs.reset()
    _, _, _, _, info = envs.step(random_masked_actions(info, rng))
    wall = time.perf_counter()
    for _ in range(steps):
        _, _, _, _, info = envs.step(random_masked_actions(info, rng))
    wall = time.perf_counter() - wall
    envs.close()
    return num_envs * steps / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-envs", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--steps", type=int, default=25, help="vector steps measured per env")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{ENV}, random masked actions, {args.steps} vector steps, {os.cpu_count()} CPUs")
    print(f"{'N':>4} " + " ".join(f"{name + ' steps/s':>22}" for name in VARIANTS) + "  load")
    for n in args.num_envs:
        load = os.getloadavg()[0]
        sps = {
            name: measure(n, args.steps, options, args.seed) for name, options in VARIANTS.items()
        }
        cells = [f"{v:>10.1f} ({v / sps['per-env']:>4.1f}x)" for v in sps.values()]
        load = (load + os.getloadavg()[0]) / 2
        print(f"{n:>4} " + " ".join(f"{c:>22}" for c in cells) + f"  {load:.1f}", flush=True)


if __name__ == "__main__":
    main()
