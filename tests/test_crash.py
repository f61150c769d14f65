"""Crash safety, tested the way crash-safe systems are: SIGKILL a training run at random points
(checkpoint writes included), resume it each time, and check what is left."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from memrl.runs import load_checkpoint, read_metrics

RECALL = ["recall", "--device", "cpu", "--deterministic", "--seq-len", "8", "--batch-size", "8"]
RECALL += ["--hidden-size", "16", "--steps", "600", "--log-interval", "10"]
RECALL += ["--checkpoint-interval", "2"]  # a checkpoint write every other step: kills land in them


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "memrl", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_after_progress(proc: subprocess.Popen, last: Path, past: int, delay: float) -> None:
    """SIGKILL ``proc`` ``delay`` seconds after its checkpoint passes step ``past``."""
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        try:
            if last.exists() and load_checkpoint(last)["step"] > past:
                break
        except Exception:  # caught mid-rename: look again
            pass
        time.sleep(0.02)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def newest_step(run: Path) -> int:
    """The step of the checkpoint a resume will load (checksum verified): ``last.pt``, or
    ``previous.pt`` when a kill fell between the two renames of a checkpoint write."""
    for name in ("last.pt", "previous.pt"):
        if (run / "checkpoints" / name).exists():
            return load_checkpoint(run / "checkpoints" / name)["step"]
    raise AssertionError(f"{run} holds no checkpoint")


def crash_and_resume(args: list[str], run: Path, kills: int, rng: random.Random) -> list[int]:
    """Start ``args`` in ``run``, kill it ``kills`` times at random points, resuming after each;
    returns the checkpoint step seen after every kill. The last resume runs to the end."""
    last = run / "checkpoints" / "last.pt"
    proc = start(*args, "--output-dir", str(run))
    stopped: list[int] = []
    for _ in range(kills):
        kill_after_progress(proc, last, stopped[-1] if stopped else 0, rng.uniform(0.0, 0.4))
        stopped.append(newest_step(run))
        proc = start(args[0], "--resume", str(run))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return stopped


def test_recall_killed_at_random_points_ends_as_if_never_stopped(tmp_path):
    whole = tmp_path / "whole"
    done = subprocess.run([sys.executable, "-m", "memrl", *RECALL, "--output-dir", str(whole)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr

    killed = tmp_path / "killed"
    stopped = crash_and_resume(RECALL, killed, kills=4, rng=random.Random(0))
    assert stopped == sorted(stopped) and stopped[-1] < 600, stopped  # killed part-way
    assert load_checkpoint(killed / "checkpoints" / "last.pt")["step"] == 600
    assert not list((killed / "checkpoints").glob(".*.tmp"))  # no torn write left behind
    steps = [r["step"] for r in read_metrics(killed / "metrics.jsonl")]
    assert steps == list(range(10, 601, 10))  # none duplicated, none missing
    a, b = load_file(whole / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ppo_killed_at_random_points_finishes_with_every_step_logged_once(tmp_path):
    args = ["ppo", "--device", "cpu", "--num-envs", "2", "--rollout-steps", "16"]
    args += ["--hidden-size", "16", "--total-steps", "3200", "--checkpoint-interval", "1"]
    args += ["--eval-episodes", "1"]
    run = tmp_path / "ppo"
    stopped = crash_and_resume(args, run, kills=3, rng=random.Random(1))
    assert stopped == sorted(stopped) and stopped[-1] < 3200, stopped
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 3200
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl")]
    assert steps == list(range(32, 3201, 32))  # environment steps, none duplicated or missing
    summary = json.loads((run / "summary.json").read_text())
    assert summary["total_steps"] == 3200
