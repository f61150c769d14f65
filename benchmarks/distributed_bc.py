"""Scaling out: `memrl bc` on one process vs `torchrun` with N processes, same global batch.

    python benchmarks/distributed_bc.py [--episodes 40] [--epochs 4] [--batch-size 64] [--nproc 2]

Collects ``--episodes`` expert demonstrations (once), then trains BC-CNN for ``--epochs`` epochs:
1. one process with ``--nproc`` threads (what a user without torchrun gets),
2. one process with one thread,
3. ``torchrun --nproc_per_node NPROC`` with one thread per process and batch ``batch-size /
   NPROC`` per process (the same global batch).
Reports training samples/s (median over the epochs after the first; validation excluded) and
the final validation loss, with the ratios to run 1. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from memrl.runs import read_metrics


def train(args: list[str], threads: int, nproc: int | None) -> dict[str, float]:
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    launcher = [sys.executable, "-m", "memrl"]
    if nproc is not None:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launcher += ["--nproc_per_node", str(nproc), "-m", "memrl"]
    subprocess.run([*launcher, "bc", *args], check=True, env=env, capture_output=True)
    run = Path(args[args.index("--output-dir") + 1])
    records = read_metrics(run / "metrics.jsonl")
    return {
        "samples_per_s": statistics.median(r["samples_per_s"] for r in records[1:]),
        "val_loss": records[-1]["val_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "push.hdf5"
        collect = ["push-collect", "--episodes", str(args.episodes), "--output", str(data)]
        subprocess.run([sys.executable, "-m", "memrl", *collect], check=True, capture_output=True)
        common = ["--dataset", str(data), "--epochs", str(args.epochs), "--device", "cpu"]
        per_rank = str(args.batch_size // args.nproc)
        runs = [
            (f"1 process, {args.nproc} threads", args.nproc, None, str(args.batch_size)),
            ("1 process, 1 thread", 1, None, str(args.batch_size)),
            (f"torchrun {args.nproc} processes x 1 thread", 1, args.nproc, per_rank),
        ]
        rows = []
        for name, threads, nproc, batch in runs:
            out = ["--batch-size", batch, "--output-dir", str(Path(tmp) / name.replace(" ", "_"))]
            rows.append((name, train([*common, *out], threads, nproc)))
    base = rows[0][1]["samples_per_s"]
    print(
        f"\nmemrl bc (cnn), {args.episodes} demos, global batch {args.batch_size}, "
        f"{args.epochs} epochs, CPU\n"
    )
    print("| setting | samples/s | vs 1 process | final val loss |")
    print("|---|---:|---:|---:|")
    for name, result in rows:
        print(
            f"| {name} | {result['samples_per_s']:,.0f} | {result['samples_per_s'] / base:.2f}x "
            f"| {result['val_loss']:.4f} |"
        )
    print(json.dumps({name: result for name, result in rows}))


if __name__ == "__main__":
    main()
