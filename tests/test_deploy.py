"""``memrl export`` and ``memrl.deploy``: the exported step equals the PyTorch policy over a
stream with episode resets, for every vector core; the runner keeps the memory."""

from __future__ import annotations

from typing import get_args

import pytest
import torch

from memrl import deploy
from memrl.cli import main
from memrl.cores import VectorCoreName
from memrl.imitation.evaluate import RecurrentController
from memrl.imitation.evaluate import load_policy as load_imitation_policy
from memrl.spatial.evaluate import load_spatial_model

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
    assert "is not a memrl ppo or bc run directory" in capsys.readouterr().err
    args = ["export", str(runs("lru")), "--format", "onnx", "--output", str(tmp_path / "x.onnx")]
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "has core lru, whose state is complex numbers, which ONNX cannot hold" in err
    assert not (tmp_path / "x.onnx").exists()


def raw_push_stream(steps: int = 200, streams: int = 3):
    """Random raw push observations (HWC uint8 images, gripper states) for ``streams`` streams,
    episodes starting at random steps (all at the first)."""
    gen = torch.Generator().manual_seed(0)
    for t in range(steps):
        obs = {
            "image": torch.randint(0, 256, (streams, 84, 84, 3), dtype=torch.uint8, generator=gen),
            "state": torch.rand(streams, 3, generator=gen) * 2 - 1,
        }
        yield obs, (torch.rand(streams, generator=gen) < 0.05) | (t == 0)


BC_CASES = {
    "plain": [],
    "gru-state-spherical": ["--use-gru", "--use-state", "--use-spherical"],
    "stack": ["--frame-stack", "2"],
}


@pytest.fixture(scope="module")
def bc_runs(push_demos, tmp_path_factory):
    made = {}

    def run(name: str):
        if name not in made:
            out = tmp_path_factory.mktemp("bc") / name
            args = ["bc", "--dataset", str(push_demos(12)), "--epochs", "1", "--batch-size", "32"]
            assert main([*args, *BC_CASES[name], "--device", "cpu", "--output-dir", str(out)]) == 0
            made[name] = out
        return made[name]

    run.demos = push_demos(12)
    return run


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("name", list(BC_CASES))
def test_an_exported_bc_step_equals_the_policy_on_raw_images(name, fmt, bc_runs, tmp_path):
    """200 steps of 3 streams of raw env observations (HWC uint8 images, gripper state) with
    episodes starting at random steps: the exported file and the PyTorch policy give the same
    decoded actions and the same memory (frame-stack window, GRU state)."""
    run = bc_runs(name)
    out = tmp_path / ("policy.onnx" if fmt == "onnx" else "policy.ts")
    assert main(["export", str(run), "--output", str(out), "--format", fmt]) == 0
    exported, reference = deploy.load(out), deploy.load_policy(run)
    assert exported.inputs == ["image", "state"] and exported.outputs == ["action"]
    # what imitation-eval runs in the env, stream 0 only
    controller = RecurrentController(load_imitation_policy(run, torch.device("cpu"))[0])
    for runner in (exported, reference):
        runner.reset(3)
    for obs, is_first in raw_push_stream():
        a, b = exported.act(obs, is_first), reference.act(obs, is_first)
        assert a.shape == (3, 3) and a.abs().max() <= 1
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        for got, want in zip(exported.state, reference.state, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if is_first[0]:
            controller.reset()
        image = obs["image"][0].permute(2, 0, 1)
        torch.testing.assert_close(b[0], controller(image, obs["state"][0]), rtol=0, atol=1e-5)
    assert len(reference.state) == {"plain": 0, "gru-state-spherical": 1, "stack": 1}[name]


def test_bc_runner_needs_both_inputs_and_act_runs_are_refused(bc_runs, tmp_path, capsys):
    runner = deploy.load_policy(bc_runs("plain"))
    with pytest.raises(ValueError, match=r"obs lacks \['state'\]; this policy takes"):
        runner.act({"image": torch.zeros(1, 84, 84, 3, dtype=torch.uint8)})
    act = tmp_path / "act"
    size = ["--d-model", "32", "--heads", "2", "--feedforward", "64", "--chunk-size", "5"]
    args = ["act", "--dataset", str(bc_runs.demos), "--epochs", "1", "--output-dir", str(act)]
    assert main([*args, *size, "--batch-size", "32", "--device", "cpu"]) == 0
    assert main(["export", str(act), "--output", str(tmp_path / "act.ts")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "holds an act policy; export takes ppo and bc runs" in err
    assert not (tmp_path / "act.ts").exists()


@pytest.fixture(scope="module")
def spatial_runs(push_demos, tmp_path_factory):
    """Phase A (random encoder) and B of a tiny conv_gru spatial stack."""
    root = tmp_path_factory.mktemp("spatial")
    common = ["--dataset", str(push_demos(5)), "--device", "cpu", "--val-fraction", "0.2"]
    common += ["--channels", "8", "--hidden-channels", "8", "--epochs", "1"]
    args = ["spatial", "--phase", "A", *common, "--random-encoder", "--batch-size", "2"]
    assert main([*args, "--output-dir", str(root / "A")]) == 0
    args = ["spatial", "--phase", "B", *common, "--init-from", str(root / "A")]
    assert main([*args, "--output-dir", str(root / "B")]) == 0
    return root


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_an_exported_spatial_stack_equals_the_model_and_spatial_eval(fmt, spatial_runs, tmp_path):
    """The whole stack (encoder, memory, policy) on raw env observations: the file equals the
    PyTorch model over 200 steps of 3 streams with random episode starts, and the runner's
    stream 0 equals what spatial-eval's episode loop computes."""
    run = spatial_runs / "B"
    out = tmp_path / ("policy.onnx" if fmt == "onnx" else "policy.ts")
    assert main(["export", str(run), "--output", str(out), "--format", fmt]) == 0
    exported, reference = deploy.load(out), deploy.load_policy(run)
    model = load_spatial_model(run, torch.device("cpu"))[0]
    for runner in (exported, reference):
        runner.reset(3)
    state = model.initial_state(1)
    for obs, is_first in raw_push_stream():
        a, b = exported.act(obs, is_first), reference.act(obs, is_first)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        for got, want in zip(exported.state, reference.state, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        with torch.no_grad():  # the model's own calls, written out
            z = model.encode(obs["image"][:1].permute(0, 3, 1, 2))
            h, state = model.memory.step(z, model.condition(obs["state"][:1]), state, is_first[:1])
            action = model.to_action(model.act(h, z))
        torch.testing.assert_close(b[:1], action, rtol=0, atol=1e-5)


def test_spatial_phase_a_and_world_model_runs_are_refused(spatial_runs, tmp_path, capsys):
    assert main(["export", str(spatial_runs / "A"), "--output", str(tmp_path / "a.ts")]) == 2
    assert "spatial phase A run, whose policy head is untrained" in capsys.readouterr().err
    rssm = tmp_path / "rssm"
    args = ["rssm", "--device", "cpu", "--grid_size", "16", "--channels", "8", "--epochs", "1"]
    args += ["--steps_per_epoch", "1", "--batch_size", "2", "--seq_len", "10", "--K", "4"]
    assert main([*args, "--deter_size", "8", "--hidden_size", "8", "--output_dir", str(rssm)]) == 0
    assert main(["export", str(rssm), "--output", str(tmp_path / "w.ts")]) == 2
    assert "is not a spatial-memory model (an rssm world model?)" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_a_masked_policy_takes_the_action_mask_and_never_picks_a_masked_action(fmt, tmp_path):
    """memrl/SeedLifecycle reports action masks: the exported step takes them as its second
    input and equals the policy with random masks (one allowed option per head at least), and
    its greedy action is always allowed; a mask-less call is a clear error."""
    run = tmp_path / "run"
    args = ["ppo", "--env", "memrl/SeedLifecycle", "--env-kwargs", "max_epochs=5"]
    args += ["--num-envs", "2", "--rollout-steps", "5", "--total-steps", "10", "--hidden-size", "8"]
    assert main([*args, "--eval-episodes", "1", "--device", "cpu", "--output-dir", str(run)]) == 0
    out = tmp_path / ("policy.onnx" if fmt == "onnx" else "policy.ts")
    assert main(["export", str(run), "--output", str(out), "--format", fmt]) == 0
    exported, reference = deploy.load(out), deploy.load_policy(run)
    assert exported.inputs == ["obs", "action_mask"]
    sizes = reference.step.head.sizes
    gen = torch.Generator().manual_seed(0)
    for runner in (exported, reference):
        runner.reset(3)
    for t in range(50):
        obs = torch.randn(3, reference.step.obs_mean.numel(), generator=gen)
        mask = torch.rand(3, sum(sizes), generator=gen) < 0.5
        starts = torch.tensor([0, *sizes[:-1]]).cumsum(0)
        mask[:, starts] |= ~torch.stack([m.any(1) for m in mask.split(sizes, 1)], 1)
        is_first = (torch.rand(3, generator=gen) < 0.1) | (t == 0)
        named = {"obs": obs, "action_mask": mask}
        a, b = exported.act(named, is_first), reference.act(named, is_first)
        assert torch.equal(a, b)
        for head, (allowed, start) in enumerate(zip(mask.split(sizes, 1), starts, strict=True)):
            assert allowed.gather(1, a[:, head : head + 1]).all(), (t, head, int(start))
    with pytest.raises(ValueError, match=r"obs lacks \['action_mask'\]"):
        reference.act(obs)
