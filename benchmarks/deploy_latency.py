"""Step latency at batch 1 of a deployed memory policy: the PyTorch policy (``memrl.deploy.
load_policy``), its TorchScript export and its ONNX export run by onnxruntime, per core, and
for the visuomotor BC policy (84 x 84 images) without memory, with a GRU and with a 4-frame stack,
and for the spatial-memory stack (encoder, ConvGRU over 14 x 14 maps, policy; default sizes).

For each policy a tiny ``memrl ppo`` / ``memrl bc`` run (trained weights matter not for latency:
the shapes are the defaults', ppo hidden 128) is exported both ways; each runner then acts on
one stream, and the table gives the median and 99th-percentile microseconds per ``act`` over
--steps steps after a warm-up, with the memory carried. One thread.

python benchmarks/deploy_latency.py                  # every vector core and the bc policies
python benchmarks/deploy_latency.py --cores gru lstm --bc none --no-spatial --steps 2000
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

BC = {"bc": [], "bc-gru": ["--use-gru"], "bc-stack4": ["--frame-stack", "4"]}


def latency_us(runner: deploy.Runner, obs, steps: int) -> tuple[float, float]:
    """Median and 99th percentile of one ``act`` on ``obs``, in microseconds."""
    runner.reset(1)
    times = []
    for t in range(steps + 50):
        start = time.perf_counter()
        runner.act(obs, torch.tensor([t == 0]))
        times.append(time.perf_counter() - start)
    times = times[50:]
    return 1e6 * statistics.median(times), 1e6 * statistics.quantiles(times, n=100)[98]


def measure(name: str, run: Path, obs, steps: int, onnx: bool = True) -> None:
    """One table row: the run's PyTorch policy and its two exports."""
    cells = [latency_us(deploy.load_policy(run), obs, steps)]
    memrl(["export", str(run), "--output", str(run / "p.ts")])
    cells.append(latency_us(deploy.load(run / "p.ts"), obs, steps))
    cells.append(None)
    if onnx:
        memrl(["export", str(run), "--format", "onnx", "--output", str(run / "p.onnx")])
        cells[-1] = latency_us(deploy.load(run / "p.onnx"), obs, steps)
    shown = ["–" if c is None else f"{c[0]:.0f} / {c[1]:.0f}" for c in cells]
    print(f"| {name} | " + " | ".join(shown) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cores", nargs="+", default=list(get_args(VectorCoreName)))
    parser.add_argument("--bc", nargs="+", default=list(BC), help="bc policies (or: none)")
    parser.add_argument("--no-spatial", action="store_true", help="skip the spatial stack")
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| policy | PyTorch µs (median / p99) | TorchScript µs | ONNX (onnxruntime) µs |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for core in args.cores:
            run = Path(tmp) / core
            flags = ["--num-envs", "2", "--rollout-steps", "16", "--total-steps", "32"]
            memrl(["ppo", "--core", core, *flags, "--device", "cpu", "--output-dir", str(run)])
            obs = torch.randn(1, deploy.load_policy(run).step.obs_mean.numel())
            measure(f"ppo, {core}", run, obs, args.steps, core not in deploy.COMPLEX_STATE)
        bc = [name for name in args.bc if name != "none"]
        if bc or not args.no_spatial:
            demos = Path(tmp) / "push.hdf5"
            memrl(["push-collect", "--episodes", "2", "--output", str(demos)])
        image = torch.randint(0, 256, (1, 84, 84, 3), dtype=torch.uint8)
        for name in bc:
            run = Path(tmp) / name
            flags = ["--dataset", str(demos), "--epochs", "1", "--val-fraction", "0.5"]
            memrl(["bc", *flags, *BC[name], "--device", "cpu", "--output-dir", str(run)])
            measure(name, run, {"image": image, "state": torch.zeros(1, 3)}, args.steps)
        if not args.no_spatial:
            run, flags = Path(tmp) / "spatial", ["--dataset", str(demos), "--epochs", "1"]
            flags += ["--val-fraction", "0.5", "--device", "cpu"]
            memrl(["spatial", "--phase", "A", *flags, "--random-encoder",
                   "--output-dir", str(run / "A")])  # fmt: skip
            memrl(["spatial", "--phase", "B", *flags, "--init-from", str(run / "A"),
                   "--output-dir", str(run / "B")])  # fmt: skip
            obs = {"image": image, "state": torch.zeros(1, 3)}
            measure("spatial, conv_gru", run / "B", obs, args.steps)


if __name__ == "__main__":
    main()
