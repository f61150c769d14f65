"""Step latency at batch 1 of a deployed memory policy: the PyTorch policy (``memrl.deploy.
load_policy``), its TorchScript export and its ONNX export run by onnxruntime, per core.

For each core a tiny ``memrl ppo`` run (random weights matter not for latency: the shapes are
the defaults', hidden 128) is exported both ways; each runner then acts on one stream, and the
table gives the median microseconds per ``act`` over --steps steps after a warm-up, with the
memory carried. One thread.

python benchmarks/deploy_latency.py                  # every vector core
python benchmarks/deploy_latency.py --cores gru lstm --steps 2000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import get_args

import torch

from memrl import deploy
from memrl.cli import main as memrl
from memrl.cores import VectorCoreName


def latency_us(runner: deploy.Runner, obs_dim: int, steps: int) -> float:
    runner.reset(1)
    obs, times = torch.randn(1, obs_dim), []
    for t in range(steps + 50):
        start = time.perf_counter()
        runner.act(obs, torch.tensor([t == 0]))
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times[50:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cores", nargs="+", default=list(get_args(VectorCoreName)))
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| core | PyTorch µs | TorchScript µs | ONNX (onnxruntime) µs |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for core in args.cores:
            run = Path(tmp) / core
            flags = ["--num-envs", "2", "--rollout-steps", "16", "--total-steps", "32"]
            memrl(["ppo", "--core", core, *flags, "--device", "cpu", "--output-dir", str(run)])
            reference = deploy.load_policy(run)
            obs_dim = reference.step.obs_mean.numel()
            cells = [latency_us(reference, obs_dim, args.steps)]
            memrl(["export", str(run), "--output", str(run / "p.ts")])
            cells.append(latency_us(deploy.load(run / "p.ts"), obs_dim, args.steps))
            if core in deploy.COMPLEX_STATE:
                cells.append(None)
            else:
                memrl(["export", str(run), "--format", "onnx", "--output", str(run / "p.onnx")])
                cells.append(latency_us(deploy.load(run / "p.onnx"), obs_dim, args.steps))
            shown = ["–" if c is None else f"{c:.0f}" for c in cells]
            print(f"| {core} | " + " | ".join(shown) + " |", flush=True)


if __name__ == "__main__":
    main()
