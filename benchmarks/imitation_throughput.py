"""Training throughput of memrl's BC-CNN and ACT (samples/s), float32 and bfloat16 autocast.

    python benchmarks/imitation_throughput.py [--steps 20] [--batch-size 64] [--threads 2]

One optimiser step = forward, backward and Adam on a minibatch of random 84x84 frames (BC) or of
(frame, 10-action chunk) samples (ACT), at the sizes of ``memrl bc`` and ``memrl act``'s
defaults, with random-shift augmentation as in training. Three warm-up steps, then the median
step time over ``--steps``. LeRobot's ACT, the peer the issue names, does not install beside
torch 2.14.1 (lerobot 0.4.4 requires torch < 2.11), so it is not in this table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from memrl.data import Batch
from memrl.imitation.act import ACTConfig, ACTPolicy, act_loss
from memrl.imitation.bc import BCConfig, VisuomotorBCPolicy, bc_loss


def bc_batch(batch: int) -> Batch:
    return Batch(
        images=torch.randint(0, 256, (1, batch, 3, 84, 84), dtype=torch.uint8),
        states=torch.randn(1, batch, 3),
        actions=torch.rand(1, batch, 3),
        is_first=torch.ones(1, batch, dtype=torch.bool),
    )


def act_batch(batch: int, chunk: int) -> Batch:
    return Batch(
        images=torch.randint(0, 256, (1, batch, 3, 84, 84), dtype=torch.uint8),
        states=torch.randn(1, batch, 3),
        actions=torch.rand(chunk, batch, 3),
        is_first=torch.ones(1, batch, dtype=torch.bool),
        valid=torch.ones(chunk, batch, dtype=torch.bool),
    )


def step_seconds(policy, loss_fn, batch, bf16: bool, steps: int) -> float:
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-4)
    policy.train()
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = loss_fn(policy, batch, True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    act_cfg = ACTConfig()
    models = {
        "BC-CNN": (VisuomotorBCPolicy(BCConfig()), bc_loss, bc_batch(args.batch_size)),
        "ACT (24.4M)": (ACTPolicy(act_cfg), act_loss, act_batch(args.batch_size, 10)),
    }
    print(f"load average before: {os.getloadavg()[0]:.2f}; threads {args.threads}")
    print("\n| model | precision | ms / step | samples/s | bf16 speed-up |")
    print("|---|---|---:|---:|---:|")
    for name, (policy, loss_fn, batch) in models.items():
        fp32 = step_seconds(policy, loss_fn, batch, False, args.steps)
        bf16 = step_seconds(policy, loss_fn, batch, True, args.steps)
        for label, seconds in (("float32", fp32), ("bf16 autocast", bf16)):
            ratio = f"{fp32 / seconds:.2f}x" if label != "float32" else ""
            print(
                f"| {name} | {label} | {seconds * 1e3:.0f} | {args.batch_size / seconds:,.0f} "
                f"| {ratio} |"
            )


if __name__ == "__main__":
    main()
