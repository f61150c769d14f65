"""Data-parallel training under torchrun (CPU, gloo, 2 processes): the same parameters as one
process with the global batch, trainers writing one run directory, and a failing rank ending
the job with its error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from memrl.rl.normalize import RunningMeanStd
from memrl.runs import load_checkpoint, read_metrics

WORKER = Path(__file__).with_name("distributed_worker.py")


def torchrun(nproc: int, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node nproc ARGS`` (one thread per process)."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(nproc), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_two_ranks_with_batch_b_end_where_one_rank_with_batch_2b_does(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    for nproc, out, batch in ((1, one, "16"), (2, two, "8")):
        proc = torchrun(nproc, str(WORKER), "train", str(out), batch)
        assert proc.returncode == 0, proc.stderr[-3000:]
    single, rank0, rank1 = (
        torch.load(p) for p in (one / "rank0.pt", two / "rank0.pt", two / "rank1.pt")
    )
    for a, b, c in zip(single["params"], rank0["params"], rank1["params"], strict=True):
        assert torch.equal(b, c)  # both ranks hold the same model
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)  # ... the single process's model

    # running statistics merged across ranks == one stream over every rank's batches
    reference = RunningMeanStd((3,))
    reference.update(torch.arange(12.0).view(4, 3))
    for rank in range(2):
        for i in range(3):
            g = torch.Generator().manual_seed(rank * 10 + i)
            reference.update(torch.randn(5 + rank, 3, generator=g) * (rank + 1) + rank)
    for merged in (rank0["stats"], rank1["stats"]):
        torch.testing.assert_close(merged["mean"], reference.mean)
        torch.testing.assert_close(merged["var"], reference.var)
        assert merged["count"] == pytest.approx(reference.count)
    # metrics: each key's mean over the ranks that report it
    assert rank0["figures"] == rank1["figures"] == {"a": 0.5, "only_rank0": 5.0}


def test_a_rank_that_raises_ends_the_job_quickly_with_its_error(tmp_path):
    start = time.perf_counter()
    proc = torchrun(2, str(WORKER), "fail", str(tmp_path), timeout=120)
    assert proc.returncode != 0
    assert "rank 1 failed on purpose" in proc.stderr
    assert time.perf_counter() - start < 60  # rank 0 was stopped, not left waiting


@pytest.fixture(scope="module")
def demos(push_demos):
    return push_demos(6)


def test_bc_under_torchrun_writes_one_run_and_resumes(demos, tmp_path):
    run = tmp_path / "bc"
    args = ["-m", "memrl", "bc", "--dataset", str(demos), "--batch-size", "16", "--device", "cpu"]
    proc = torchrun(2, *args, "--epochs", "2", "--output-dir", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run directory") == 1  # rank 0 alone reports
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    assert json.loads((run / "summary.json").read_text())["processes"] == 2
    assert len(load_checkpoint(run / "checkpoints" / "last.pt")["rng_ranks"]) == 2
    proc = torchrun(2, "-m", "memrl", "bc", "--resume", str(run), "--epochs", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 3


def test_ppo_under_torchrun_counts_every_rank_s_steps(tmp_path):
    run = tmp_path / "ppo"
    args = ["-m", "memrl", "ppo", "--env", "popgym/RepeatPreviousEasy", "--num-envs", "4"]
    args += ["--rollout-steps", "32", "--total-steps", "1024", "--minibatch-steps", "64"]
    args += ["--eval-episodes", "4", "--device", "cpu", "--norm-obs", "--target-kl", "0.05"]
    proc = torchrun(2, *args, "--output-dir", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["total_steps"] == 1024
    # 2 ranks x 4 envs x 32 steps = 256 steps per update: 4 updates, logged once each
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [256, 512, 768, 1024]
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["update"] == 4
    # observation statistics hold both ranks' observations: 2 ranks x 4 rollouts x 4 envs x
    # 33 observations (the carried one and 32 new)
    assert ckpt["agent"]["obs_norm"]["count"] == pytest.approx(2 * 4 * 4 * 33, abs=1e-3)
