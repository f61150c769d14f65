"""``memrl export`` and ``memrl.deploy``: the exported step equals the PyTorch policy over a
stream with episode resets, for every vector core; the runner keeps the memory."""

from __future__ import annotations

from typing import get_args

import pytest
import torch

from memrl import deploy
from memrl.cli import main
from memrl.cores import VectorCoreName

TINY = ["--num-envs", "2", "--rollout-steps", "16", "--total-steps", "32", "--hidden-size", "8"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    made = {}

    def run(core: str, *extra: str):
        key = (core, *extra)
        if key not in made:
            out = tmp_path_factory.mktemp("ppo") / core
            args = [
                "ppo",
                "--core",
                core,
                *TINY,
                *extra,
                "--device",
                "cpu",
                "--output-dir",
                str(out),
            ]
            assert main(args) == 0
            made[key] = out
        return made[key]

    return run


CASES = [(core, "torchscript") for core in get_args(VectorCoreName)] + [
    (core, "onnx") for core in get_args(VectorCoreName) if core not in deploy.COMPLEX_STATE
]


@pytest.mark.parametrize(("core", "fmt"), CASES)
def test_the_exported_step_equals_the_policy_over_a_stream_with_resets(core, fmt, runs, tmp_path):
    """200 steps of 3 streams, episodes starting at random steps: the exported file (TorchScript,
    or ONNX run by onnxruntime) and the PyTorch policy give the same actions and the same memory
    (1e-5), whatever the batch size it was traced with."""
    run = runs(core, "--norm-obs")
    out = tmp_path / ("policy.onnx" if fmt == "onnx" else "policy.ts")
    assert main(["export", str(run), "--output", str(out), "--format", fmt]) == 0
    exported, reference = deploy.load(out), deploy.load_policy(run)
    gen = torch.Generator().manual_seed(0)
    for runner in (exported, reference):
        runner.reset(3)
    for t in range(200):
        obs = torch.randn(3, reference.step.obs_mean.numel(), generator=gen) * 2
        is_first = (torch.rand(3, generator=gen) < 0.05) | (t == 0)
        a, b = exported.act(obs, is_first), reference.act(obs, is_first)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        for got, want in zip(exported.state, reference.state, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_runner_carries_memory_and_export_errors_are_clear(runs, tmp_path, capsys):
    run = runs("gru")
    runner = deploy.load_policy(run)
    runner.reset(1)
    obs = torch.ones(1, runner.step.obs_mean.numel())
    first = runner.act(obs, torch.tensor([True]))
    state_after_one = [s.clone() for s in runner.state]
    runner.act(obs)
    assert not all(torch.equal(a, b) for a, b in zip(state_after_one, runner.state, strict=True))
    assert torch.equal(runner.act(obs, torch.tensor([True])), first)  # a new episode: afresh
    assert main(["export", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x.ts")]) == 2
    assert "is not a memrl ppo run directory" in capsys.readouterr().err
    args = ["export", str(runs("lru")), "--format", "onnx", "--output", str(tmp_path / "x.onnx")]
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "has core lru, whose state is complex numbers, which ONNX cannot hold" in err
    assert not (tmp_path / "x.onnx").exists()
