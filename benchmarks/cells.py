"""Shared by the table benchmarks: a cell is one ``memrl`` run directory, trained once, resumed
from its last checkpoint when a sitting was killed, skipped when finished."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from memrl.runs import read_metrics


def memrl(*args: str) -> None:
    """Run ``python -m memrl ARGS`` in a child process; a failure stops the benchmark."""
    subprocess.run([sys.executable, "-m", "memrl", *args], check=True)


def train_or_resume(run_dir: Path, command: list[str], output_flag: str, device: str) -> None:
    """Train ``memrl COMMAND`` into ``run_dir``, or resume it from its last checkpoint; a
    finished run (``summary.json``) is left alone."""
    if (run_dir / "summary.json").exists():
        return
    if (run_dir / "checkpoints" / "last.pt").exists():
        memrl(*command, "--resume", str(run_dir))
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # killed before its first checkpoint
        memrl(*command, output_flag, str(run_dir), "--device", device)


def train_wall(run_dir: Path, measured: float) -> float:
    """The run's training seconds: its summary's, else its last metrics record's time, else
    what the caller measured."""
    wall = json.loads((run_dir / "summary.json").read_text()).get("wall_seconds")
    if wall is None:
        records = read_metrics(run_dir / "metrics.jsonl")
        wall = records[-1].get("time", measured) if records else measured
    return wall
