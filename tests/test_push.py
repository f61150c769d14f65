"""The push task (the visuomotor imitation spec): environment, scripted expert, HDF5
demonstrations, push-collect."""

from __future__ import annotations

import re

import h5py
import numpy as np
import pytest

from memrl.cli import main
from memrl.data import DatasetError, read_demos, write_demos
from memrl.envs.expert import PushExpert, rollout_expert
from memrl.envs.push import (
    APPROACH,
    DONE,
    PHASES,
    PUSH,
    PushConfig,
    PushEnv,
    _build_panda,
    saved_task,
)
from memrl.imitation.collect import PushCollectConfig, collect_push
from memrl.runs.config import to_dict

CONFIG = PushConfig()
BLUE = np.array([26, 77, 242])  # the default target_rgba, as 0-255


def colour_pixels(image: np.ndarray, rgb: np.ndarray, tolerance: int = 60) -> np.ndarray:
    """Mask of pixels within ``tolerance`` of ``rgb`` in every channel (shading varies)."""
    return np.abs(image.astype(int) - rgb).max(-1) <= tolerance


def green_pixels(image: np.ndarray) -> np.ndarray:
    r, g, b = (image[..., i].astype(int) for i in range(3))
    return (g > 100) & (g > r + 60) & (g > b + 60)


@pytest.fixture(scope="module")
def episode():
    return rollout_expert(CONFIG, seed=0)


# -- the environment ----------------------------------------------------------------------------
def test_observations_are_an_84px_image_and_the_gripper_position():
    env = PushEnv()
    obs, info = env.reset(seed=0)
    for _ in range(3):
        assert env.observation_space.contains(obs)
        assert obs["image"].shape == (84, 84, 3) and obs["image"].dtype == np.uint8
        assert obs["state"].shape == (3,) and obs["state"].dtype == np.float32
        gripper = np.asarray(env.panda.robot.get_ee_position())
        np.testing.assert_allclose(obs["state"], gripper, atol=1e-6)
        assert set(info) >= {"is_success", "phase", "privileged"}
        assert info["privileged"]["observation"].shape == (18,)
        obs, reward, terminated, truncated, info = env.step(np.array([0.5, -0.5, -0.2]))
        assert reward == -1.0 and not terminated and not truncated
    assert obs["image"].std() > 10  # a scene, not a blank frame
    env.close()


def test_episodes_are_truncated_after_max_steps():
    env = PushEnv(PushConfig(max_steps=2))
    env.reset(seed=1)
    assert env.step(np.zeros(3))[3] is False
    assert env.step(np.zeros(3))[3] is True
    env.close()


def test_the_target_is_recoloured_and_distinct_from_the_block():
    env = PushEnv()
    obs, info = env.reset(seed=0)
    target, block = colour_pixels(obs["image"], BLUE), green_pixels(obs["image"])
    assert target.sum() >= 10 and block.sum() >= 10
    assert not (target & block).any()
    # seed 0: block at x = -0.145, target at x = 0.041; the camera's image x runs along +x
    assert np.argwhere(target)[:, 1].mean() > np.argwhere(block)[:, 1].mean() + 10
    red = PushEnv(PushConfig(target_rgba=(0.9, 0.1, 0.1, 1.0)))
    red_image = red.reset(seed=0)[0]["image"]
    assert colour_pixels(red_image, BLUE).sum() == 0
    assert colour_pixels(red_image, np.array([230, 26, 26])).sum() >= 10
    env.close()
    red.close()


def test_starts_solved_in_panda_gym_are_regenerated():
    raw = _build_panda()
    _, info = raw.reset(seed=41)  # one of the ~6% of seeds solved at reset
    raw.close()
    assert info["is_success"]
    env = PushEnv()
    _, info = env.reset(seed=41)
    privileged = info["privileged"]
    distance = np.linalg.norm(privileged["achieved_goal"] - privileged["desired_goal"])
    assert distance >= 0.05 and not info["is_success"] and info["phase"] == APPROACH
    env.close()


def test_reset_with_a_seed_reproduces_the_episode_on_a_reused_env():
    env = PushEnv()

    def states(seed: int) -> np.ndarray:
        obs, info = env.reset(seed=seed)
        expert, visited = PushExpert(), [obs["state"]]
        for _ in range(6):
            obs, *_, info = env.step(expert(info["privileged"]))
            visited.append(obs["state"])
        return np.stack(visited)

    first = states(5)
    env.step(np.array([1.0, 1.0, -1.0]))  # leave the simulator somewhere else
    np.testing.assert_array_equal(states(5), first)
    assert not np.array_equal(states(6), first)
    env.close()


# -- the expert -----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 58])  # 58: solved at reset in panda-gym
def test_the_expert_succeeds_with_monotone_phases(seed):
    ep = rollout_expert(CONFIG, seed)
    n = ep["attrs"]["num_samples"]
    assert ep["attrs"]["success"] and n == len(ep["actions"]) < CONFIG.max_steps
    phase = ep["phase"]
    assert set(phase.tolist()) <= set(range(len(PHASES)))
    assert (np.diff(phase) >= 0).all()
    assert phase[0] == APPROACH and phase[-1] == DONE and (phase[:-1] < DONE).all()
    assert (phase == PUSH).any()
    assert ep["dones"].tolist() == [False] * (n - 1) + [True]
    assert ep["rewards"].tolist() == [-1.0] * (n - 1) + [0.0]
    assert np.abs(ep["actions"]).max() <= 1.0


def test_rollouts_are_reproducible_and_noise_changes_actions(episode):
    again = rollout_expert(CONFIG, seed=0)
    for key in ("actions", "rewards", "phase"):
        np.testing.assert_array_equal(episode[key], again[key])
    np.testing.assert_array_equal(episode["obs"]["image"], again["obs"]["image"])
    np.testing.assert_array_equal(episode["obs"]["state"], again["obs"]["state"])
    assert not np.array_equal(rollout_expert(CONFIG, seed=1)["actions"][:3], episode["actions"][:3])
    noisy = rollout_expert(CONFIG, seed=0, noise=0.3)
    noisy_again = rollout_expert(CONFIG, seed=0, noise=0.3)
    np.testing.assert_array_equal(noisy["actions"], noisy_again["actions"])
    assert np.abs(noisy["actions"]).max() <= 1.0
    steps = min(len(noisy["actions"]), len(episode["actions"]))
    assert np.abs(noisy["actions"][:steps] - episode["actions"][:steps]).mean() > 0.05


def test_expert_noise_is_gaussian_from_its_own_seeded_generator():
    privileged = {
        "observation": np.r_[0.0, 0.0, 0.2, np.zeros(3), 0.05, 0.0, 0.02, np.zeros(9)],
        "desired_goal": np.array([0.1, 0.0, 0.02]),
    }
    clean = PushExpert()(privileged)
    draws = np.stack([PushExpert(noise=0.05, seed=s)(privileged) for s in range(300)])
    inside = np.abs(clean) < 0.8  # components the clipping cannot touch
    assert inside.any()
    assert np.abs(draws.mean(0) - clean)[inside].max() < 0.02
    assert np.abs(draws.std(0)[inside] - 0.05).max() < 0.01
    np.testing.assert_array_equal(PushExpert(noise=0.05, seed=3)(privileged), draws[3])
    with pytest.raises(ValueError, match="noise=-0.1"):
        PushExpert(noise=-0.1)


# -- HDF5 ---------------------------------------------------------------------------------------
def synthetic_episode(length: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "obs": {
            "image": rng.integers(0, 256, (length, 8, 8, 3), dtype=np.uint8),
            "state": rng.normal(size=(length, 3)).astype(np.float32),
        },
        "actions": rng.uniform(-1, 1, (length, 3)).astype(np.float32),
        "rewards": rng.normal(size=length).astype(np.float32),
        "dones": np.arange(length) == length - 1,
        "phase": np.sort(rng.integers(0, 4, length)).astype(np.int8),
        "attrs": {"seed": seed, "success": bool(seed % 2)},
    }


def test_hdf5_round_trip(tmp_path):
    episodes = [synthetic_episode(3 + i, i) for i in range(12)]  # demo_10, demo_11 sort last
    attrs = {
        "expert_success_rate": 0.75,
        "env_args": {"env_name": "x", "env_kwargs": {"size": [1, 2]}},
        "phases": ["approach", "done"],
        "seeds": np.arange(12),
        "keep_failures": False,
    }
    path = write_demos(tmp_path / "sub" / "demos.hdf5", episodes, attrs)
    loaded, loaded_attrs = read_demos(path)
    assert len(loaded) == 12
    for original, back in zip(episodes, loaded, strict=True):
        for key in ("actions", "rewards", "dones", "phase"):
            assert back[key].dtype == original[key].dtype
            np.testing.assert_array_equal(back[key], original[key])
        for key in ("image", "state"):
            assert back["obs"][key].dtype == original["obs"][key].dtype
            np.testing.assert_array_equal(back["obs"][key], original["obs"][key])
        assert back["attrs"] == original["attrs"] | {"num_samples": len(original["actions"])}
    assert loaded_attrs["expert_success_rate"] == 0.75
    assert loaded_attrs["env_args"] == attrs["env_args"]
    assert loaded_attrs["phases"] == attrs["phases"]
    np.testing.assert_array_equal(loaded_attrs["seeds"], np.arange(12))
    assert loaded_attrs["keep_failures"] is False
    assert loaded_attrs["num_demos"] == 12 and loaded_attrs["total"] == sum(range(3, 15))
    with h5py.File(path) as f:  # robomimic's layout, as other tools read it
        assert f["data/demo_11/obs/image"].shape == (14, 8, 8, 3)
        assert f["data/demo_0"].attrs["num_samples"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["demos.hdf5"]  # no temporary left


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = write_demos(tmp_path / "demos.hdf5", [synthetic_episode(3, 0)])
    bad = synthetic_episode(4, 1)
    bad["actions"] = bad["actions"][:2]
    with pytest.raises(ValueError, match="different lengths"):
        write_demos(path, [synthetic_episode(5, 2), bad])
    assert len(read_demos(path)[0]) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["demos.hdf5"]


def write_raw(path, build) -> str:
    with h5py.File(path, "w") as f:
        build(f)
    return str(path)


def demo(f, name, length=3, skip=(), obs_length=None):
    group = f.create_group(f"data/{name}")
    for key in ("actions", "rewards", "dones"):
        if key not in skip:
            group[key] = np.zeros((length, 3) if key == "actions" else length)
    if "obs" not in skip:
        group["obs/state"] = np.zeros((obs_length or length, 3))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (None, "does not exist"),
        ("text", "is not a readable HDF5 file"),
        (lambda f: f.create_group("demos"), "has no 'data' group (found: demos)"),
        (lambda f: demo(f, "demo_0", skip=("actions",)), "data/demo_0 lacks 'actions'"),
        (lambda f: demo(f, "demo_0", skip=("obs",)), "data/demo_0 lacks 'obs'"),
        (
            lambda f: (demo(f, "demo_0"), demo(f, "demo_1", skip=("rewards",))),
            "data/demo_1 lacks 'rewards'",
        ),
        (lambda f: demo(f, "demo_0", obs_length=5), "different lengths"),
    ],
)
def test_clear_errors_on_a_missing_or_malformed_file(tmp_path, build, message):
    path = tmp_path / "demos.hdf5"
    if build == "text":
        path.write_text("not a dataset\n")
    elif build is not None:
        write_raw(path, build)
    with pytest.raises(DatasetError, match=re.escape(message)) as info:
        read_demos(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


# -- push-collect -------------------------------------------------------------------------------
def test_push_collect_end_to_end(tmp_path, capsys, episode):
    output = tmp_path / "push.hdf5"
    args = ["push-collect", "--episodes", "3", "--workers", "2", "--seed", "0"]
    assert main([*args, "--output", str(output)]) == 0
    assert "wrote 3 demos" in capsys.readouterr().out
    episodes, attrs = read_demos(output)
    assert len(episodes) == 3
    for i, ep in enumerate(episodes):
        n = ep["attrs"]["num_samples"]
        assert ep["attrs"]["seed"] == i and ep["attrs"]["success"] is True
        assert ep["obs"]["image"].shape == (n, 84, 84, 3) and ep["obs"]["image"].dtype == np.uint8
        assert ep["obs"]["state"].shape == (n, 3) and ep["obs"]["state"].dtype == np.float32
        assert ep["actions"].shape == (n, 3) and ep["actions"].dtype == np.float32
        assert ep["rewards"].shape == ep["dones"].shape == ep["phase"].shape == (n,)
    assert isinstance(attrs["expert_success_rate"], float) and attrs["expert_success_rate"] == 1.0
    assert attrs["num_demos"] == 3 and attrs["num_episodes"] == 3
    np.testing.assert_array_equal(attrs["seeds"], [0, 1, 2])
    assert attrs["env_args"]["env_kwargs"] == to_dict(CONFIG)
    assert attrs["phases"] == list(PHASES)
    # a worker process records exactly what this process does for the same seed
    np.testing.assert_array_equal(episodes[0]["actions"], episode["actions"])
    np.testing.assert_array_equal(episodes[0]["obs"]["image"], episode["obs"]["image"])


def test_push_collect_keeps_failures_only_when_asked(tmp_path):
    short = PushConfig(max_steps=2)  # too short for the expert: every episode fails
    for keep, demos in ((False, 0), (True, 2)):
        cfg = PushCollectConfig(
            episodes=2, workers=1, output=tmp_path / f"{keep}.hdf5", env=short, keep_failures=keep
        )
        summary = collect_push(cfg)
        episodes, attrs = read_demos(cfg.output)
        assert summary["num_demos"] == len(episodes) == attrs["num_demos"] == demos
        assert attrs["expert_success_rate"] == 0.0
        assert all(ep["attrs"]["success"] is False and len(ep["actions"]) == 2 for ep in episodes)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--episodes", "0", "episodes=0; expected at least 1"),
        ("--workers", "0", "workers=0; expected at least 1"),
        ("--noise", "-0.5", "noise=-0.5"),
        ("--env.max-steps", "0", "max_steps=0"),
        ("--goal-frames", "0", "--goal-frames 0; expected 1 <= K < the"),
        ("--goal-frames", "50", "--goal-frames 50; expected 1 <= K < the"),
        ("--env.goal-frames", "3", "env.goal_frames=3; set it with --task"),
    ],
)
def test_push_collect_rejects_bad_values(tmp_path, capsys, flag, value, message):
    task = ["--task", "push-hidden-goal"] if flag == "--goal-frames" else []
    try:  # tyro reports a config's ValueError itself and exits with status 2
        args = ["push-collect", "--output", str(tmp_path / "x.hdf5"), *task, flag, value]
        status = main(args)
    except SystemExit as exit:
        status = exit.code
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.hdf5").exists()


@pytest.mark.parametrize("where", ["dir", "/proc/memrl-push.hdf5", "file/x.hdf5"])
def test_push_collect_checks_its_output_before_collecting(tmp_path, capsys, monkeypatch, where):
    """An output that cannot be written is refused before any episode runs, not after."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("")
    output = where if where.startswith("/") else str(tmp_path / where)

    def never(*args, **kwargs):
        raise AssertionError("an episode ran before the output path was checked")

    monkeypatch.setattr("memrl.imitation.collect.rollout_expert", never)
    assert main(["push-collect", "--workers", "1", "--output", output]) == 2
    err = capsys.readouterr().err
    assert f"--output {output}" in err and "Traceback" not in err


def test_push_collect_runs_with_progress_bars_disabled(tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")  # a disabled bar counts nothing: n stays 0
    output = tmp_path / "push.hdf5"
    assert main(["push-collect", "--episodes", "1", "--workers", "1", "--output", str(output)]) == 0
    assert read_demos(output)[1]["num_episodes"] == 1


def test_push_collect_help_says_output_is_a_file(capsys):
    with pytest.raises(SystemExit):
        main(["push-collect", "--help"])
    assert "HDF5 file to write" in capsys.readouterr().out


# -- push-hidden-goal ---------------------------------------------------------------------------
def test_hidden_goal_marker_shows_in_the_first_k_frames_only():
    """goal_frames=3: the blue marker is in frames 0, 1, 2 and absent from frame 3 on; the
    block stays in view, and the scene is the push task's pixel for pixel until then."""
    hidden, plain = PushEnv(PushConfig(goal_frames=3)), PushEnv()
    frames, plain_frames = [hidden.reset(seed=0)[0]["image"]], [plain.reset(seed=0)[0]["image"]]
    for _ in range(5):
        frames.append(hidden.step(np.array([0.2, 0.0, 0.0]))[0]["image"])
        plain_frames.append(plain.step(np.array([0.2, 0.0, 0.0]))[0]["image"])
    markers = [int(colour_pixels(f, BLUE).sum()) for f in frames]
    assert min(markers[:3]) >= 10 and max(markers[3:]) == 0, markers
    assert all(green_pixels(f).sum() >= 10 for f in frames)
    for k in range(3):
        np.testing.assert_array_equal(frames[k], plain_frames[k])
    assert all(colour_pixels(f, BLUE).sum() >= 10 for f in plain_frames)
    hidden.close()
    plain.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_expert_solves_the_hidden_goal_task(seed):
    """The expert reads the goal from the simulator: the same actions as on push."""
    hidden = rollout_expert(PushConfig(goal_frames=3), seed=seed)
    assert hidden["attrs"]["success"] is True
    np.testing.assert_array_equal(hidden["actions"], rollout_expert(CONFIG, seed=seed)["actions"])


def test_the_task_round_trips_through_the_dataset_attributes(tmp_path):
    cfg = PushCollectConfig(
        episodes=1, workers=1, output=tmp_path / "h.hdf5", task="push-hidden-goal", goal_frames=4
    )
    collect_push(cfg)
    _, attrs = read_demos(cfg.output)
    assert attrs["task"] == "push-hidden-goal"
    assert attrs["env_args"]["env_kwargs"]["goal_frames"] == 4
    task, config = saved_task(attrs["task"], attrs["env_args"]["env_kwargs"])
    assert task == "push-hidden-goal" and config == PushConfig(goal_frames=4)
    assert saved_task(None, to_dict(CONFIG))[0] == "push"  # data from before the task attribute
    with pytest.raises(ValueError, match="task='push' but its env settings"):
        saved_task("push", attrs["env_args"]["env_kwargs"])
    with pytest.raises(ValueError, match="goal_frames=50; expected 1 <= goal_frames < max_steps"):
        PushConfig(goal_frames=50)
