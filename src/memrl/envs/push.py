"""The push task: panda-gym's ``PandaPush-v3`` seen through an 84 x 84 camera
(the visuomotor imitation spec's task).

A Franka Panda with a blocked gripper pushes a 4 cm block on a table to a target. The policy
sees ``{"image": (S, S, 3) uint8, "state": (3,) float32}`` -- a fixed camera framing table,
block, target and gripper, rendered headless by PyBullet's TinyRenderer on the CPU, and the
gripper position (x, y, z) in metres -- and acts with an end-effector displacement
``[dx, dy, dz]`` in [-1, 1] (one unit = 5 cm). An episode ends on success (block within 5 cm
of the target: panda-gym's ``is_success``) or is truncated after ``max_steps`` steps.

What differs from ``gymnasium.make("PandaPush-v3")`` and why (each one measured):

* **A fresh simulator per episode.** ``reset(seed=s)`` on a reused panda-gym env does not
  reproduce a trajectory (simulator state carries over), so every ``reset`` builds a new one
  (~0.06 s): the same seed always gives the same episode, whatever ran before.
* **No episode starts solved.** About 6% of seeds place the block within 5 cm of the target at
  reset. Those are *regenerated*, not skipped: block and target are drawn again from the same
  seeded generator until they are apart, so every seed gives one real, reproducible episode.
* **A visible target.** The TinyRenderer ignores transparency and draws panda-gym's target as
  an opaque green cube, just like the block. The target is recoloured (``target_rgba``, blue by
  default, with ``pybullet.changeVisualShape``) and sunk into the table so that only a thin
  square marker shows (``target_marker_height``). It is a ghost body (no collisions) and is
  not re-created, so the physics is the stock env's.
* **push-hidden-goal** (``goal_frames=K``): the target marker is drawn in the first K frames
  of an episode and then sunk out of sight; block and gripper stay visible and the goal (and
  so success) is unchanged, so a policy must remember where the target was.
* **The camera** of the notes (the stock one shows the block as 1-2 pixels at 84 x 84), and
  shadows off by default (a frame takes ~15 ms instead of ~30 ms).

Each ``info`` carries ``is_success``, ``phase`` (an index into :data:`PHASES`) and
``privileged``: panda-gym's own observation dict (``observation`` (18,), ``achieved_goal``,
``desired_goal``) for scripted experts and evaluation, never for the policy.

Phases (for the spatial-memory segmenter). ``info["phase"]`` is the phase of the state the
env is in after the step (the convention of rewards and dones), and phases only advance:
``phase_t = max(phase_{t-1}, rule(state_t))`` where ``rule`` is the first that holds of

  3 done      the step succeeded;
  2 push      the block is at least ``push_progress`` (1 cm) closer to the target than at reset;
  1 contact   some part of the robot is within ``contact_distance`` (1 cm) of the block
              (PyBullet closest points);
  0 approach  otherwise.

>>> env = PushEnv()
>>> obs, info = env.reset(seed=0)  # obs["image"] (84, 84, 3) uint8, obs["state"] (3,) float32
>>> obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

PHASES = ("approach", "contact", "push", "done")
APPROACH, CONTACT, PUSH, DONE = range(len(PHASES))

BLOCK_SIZE = 0.04  # panda-gym's block edge, metres
SUCCESS_DISTANCE = 0.05  # panda-gym's success threshold, metres


@dataclasses.dataclass
class PushConfig:
    """Settings of the push environment (camera, episode length, target marker, phases)."""

    image_size: int = 84
    """Height and width of the camera image, in pixels."""
    camera_target: tuple[float, float, float] = (0.0, 0.10, 0.0)
    """Point the camera looks at, (x, y, z) in metres (the table top is z = 0)."""
    camera_distance: float = 0.54
    """Distance of the camera from camera_target, in metres."""
    camera_yaw: float = 0.0
    """Camera yaw in degrees (0: looking along +y, the robot's base on the left)."""
    camera_pitch: float = -40.0
    """Camera pitch in degrees (negative looks down)."""
    camera_fov: float = 60.0
    """Vertical field of view in degrees."""
    shadows: bool = False
    """Render shadows (panda-gym's default; about twice as slow)."""
    max_steps: int = 50
    """Steps before an episode is truncated (panda-gym's limit)."""
    target_rgba: tuple[float, float, float, float] = (0.1, 0.3, 0.95, 1.0)
    """Colour of the target marker (the block is green, (0.1, 0.9, 0.1))."""
    target_marker_height: float = 0.002
    """How far the target shows above the table, in metres; the block's size (0.04) shows the
    stock cube."""
    contact_distance: float = 0.01
    """Phase 'contact' starts when the robot comes this close to the block, in metres."""
    push_progress: float = 0.01
    """Phase 'push' starts when the block is this much closer to the target than at reset."""
    goal_frames: int | None = None
    """None: the target marker is always drawn (the push task); K: drawn in the first K frames
    of an episode only (frames 0..K-1, frame 0 being reset's), then hidden: the
    push-hidden-goal task, which a policy can only solve by remembering where the target was."""

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size={self.image_size}; expected at least 8 pixels")
        if self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps}; expected a positive integer")
        if not self.camera_distance > 0 or not 0 < self.camera_fov < 180:
            raise ValueError(
                f"camera_distance={self.camera_distance}, camera_fov={self.camera_fov}; "
                "expected a positive distance and a field of view in (0, 180) degrees"
            )
        if len(self.camera_target) != 3 or len(self.target_rgba) != 4:
            raise ValueError(
                f"camera_target={self.camera_target}, target_rgba={self.target_rgba}; "
                "expected 3 coordinates and 4 colour channels"
            )
        if not 0 < self.target_marker_height <= BLOCK_SIZE:
            raise ValueError(
                f"target_marker_height={self.target_marker_height}; expected in (0, {BLOCK_SIZE}]"
            )
        if self.goal_frames is not None and not 1 <= self.goal_frames < self.max_steps:
            raise ValueError(
                f"goal_frames={self.goal_frames}; expected 1 <= goal_frames < max_steps "
                f"({self.max_steps}), or None to always draw the target"
            )
        if not self.contact_distance >= 0 or not self.push_progress > 0:
            raise ValueError(
                f"contact_distance={self.contact_distance}, push_progress={self.push_progress}; "
                "expected contact_distance >= 0 and push_progress > 0"
            )

    @property
    def task(self) -> str:
        """``"push"``, or ``"push-hidden-goal"`` when the target is shown for ``goal_frames``
        frames only."""
        return "push" if self.goal_frames is None else "push-hidden-goal"

    @classmethod
    def from_saved(cls, settings: dict[str, Any]) -> PushConfig:
        """The config from settings saved as JSON or YAML (lists back to tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})


class PushEnv(gym.Env):
    """PandaPush-v3 observed as ``{"image", "state"}`` with phase labels (module docstring)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 25}  # one step: 0.04 s of physics

    def __init__(self, config: PushConfig | None = None) -> None:
        self.config = config or PushConfig()
        size = self.config.image_size
        self.observation_space = spaces.Dict(
            {
                "image": spaces.Box(0, 255, (size, size, 3), np.uint8),
                "state": spaces.Box(-10.0, 10.0, (3,), np.float32),
            }
        )
        self.action_space = spaces.Box(-1.0, 1.0, (3,), np.float32)
        self.render_mode = "rgb_array"
        self.panda: Any = None  # the panda_gym PandaPushEnv of the current episode
        self.steps = 0
        self.phase = APPROACH
        self._image: np.ndarray | None = None
        self._privileged: dict[str, np.ndarray] = {}
        self._start_distance = 0.0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """A new episode in a fresh simulator. ``seed`` fixes it; without one, the next seed
        comes from the generator of the last seeded reset."""
        super().reset(seed=seed)
        episode_seed = seed if seed is not None else int(self.np_random.integers(2**31 - 1))
        self.close()
        self.panda = _build_panda()
        self.panda.sim.physics_client.changeVisualShape(
            self.panda.sim._bodies_idx["target"], -1, rgbaColor=list(self.config.target_rgba)
        )
        panda_obs, info = self.panda.reset(seed=episode_seed)
        for _ in range(1000):  # regenerate a solved start from the same seeded generator
            if not info["is_success"]:
                break
            with self.panda.sim.no_rendering():
                self.panda.task.reset()
            panda_obs = self.panda._get_obs()
            info = {"is_success": self.panda.task.is_success(*_goals(panda_obs))}
        else:
            raise RuntimeError(f"seed {episode_seed}: every regenerated start was solved")
        self._place_target_marker()
        self.steps, self.phase = 0, APPROACH
        self._start_distance = _distance(panda_obs)
        return self._observe(panda_obs), self._info(panda_obs, success=False)

    def step(
        self, action: np.ndarray
    ) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        if self.panda is None:
            raise RuntimeError("call reset() before step()")
        action = np.clip(np.asarray(action, dtype=np.float32).reshape(3), -1.0, 1.0)
        panda_obs, reward, terminated, _, _ = self.panda.step(action)
        self.steps += 1
        truncated = not terminated and self.steps >= self.config.max_steps
        return (
            self._observe(panda_obs),
            float(reward),
            bool(terminated),
            truncated,
            self._info(panda_obs, success=bool(terminated)),
        )

    def render(self) -> np.ndarray | None:
        """The last observed camera image (S, S, 3) uint8."""
        return None if self._image is None else self._image.copy()

    def close(self) -> None:
        if self.panda is not None:
            self.panda.close()
            self.panda = None

    # -- helpers --------------------------------------------------------------------------------
    def _observe(self, panda_obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._privileged = {key: value.copy() for key, value in panda_obs.items()}
        if self.steps == self.config.goal_frames:  # frame K: the marker goes under the table
            self._place_target_marker(hidden=True)
        self._image = self._render_camera()
        state = panda_obs["observation"][:3].astype(np.float32)  # gripper position (3,)
        return {"image": self._image.copy(), "state": state}

    def _info(self, panda_obs: dict[str, np.ndarray], success: bool) -> dict[str, Any]:
        if success:
            phase = DONE
        elif self._start_distance - _distance(panda_obs) >= self.config.push_progress:
            phase = PUSH
        elif self._touching():
            phase = CONTACT
        else:
            phase = APPROACH
        self.phase = max(self.phase, phase)
        return {"is_success": success, "phase": self.phase, "privileged": self._privileged}

    def _touching(self) -> bool:
        sim = self.panda.sim
        points = sim.physics_client.getClosestPoints(
            bodyA=sim._bodies_idx["panda"],
            bodyB=sim._bodies_idx["object"],
            distance=self.config.contact_distance,
        )
        return len(points) > 0

    def _place_target_marker(self, hidden: bool = False) -> None:
        """Sink the target cube so that only ``target_marker_height`` shows above the table, or
        with ``hidden`` all of it (a ghost body: the task's goal and the physics stay)."""
        position = self.panda.task.get_goal()
        position[2] = (-BLOCK_SIZE if hidden else self.config.target_marker_height) - BLOCK_SIZE / 2
        self.panda.sim.set_base_pose("target", position, np.array([0.0, 0.0, 0.0, 1.0]))

    def _render_camera(self) -> np.ndarray:
        cfg, client = self.config, self.panda.sim.physics_client
        view = client.computeViewMatrixFromYawPitchRoll(
            cameraTargetPosition=list(cfg.camera_target),
            distance=cfg.camera_distance,
            yaw=cfg.camera_yaw,
            pitch=cfg.camera_pitch,
            roll=0.0,
            upAxisIndex=2,
        )
        projection = client.computeProjectionMatrixFOV(
            fov=cfg.camera_fov, aspect=1.0, nearVal=0.01, farVal=10.0
        )
        size = cfg.image_size
        _, _, rgba, _, _ = client.getCameraImage(
            width=size,
            height=size,
            viewMatrix=view,
            projectionMatrix=projection,
            shadow=cfg.shadows,
            renderer=client.ER_TINY_RENDERER,
        )
        rgba = np.asarray(rgba, dtype=np.uint8).reshape(size, size, 4)  # (S, S, 4)
        return np.ascontiguousarray(rgba[..., :3])


TASKS = ("push", "push-hidden-goal")


def saved_task(task: str | None, env_kwargs: dict[str, Any]) -> tuple[str, PushConfig]:
    """The task and env settings that a push dataset's attributes (``task``,
    ``env_args["env_kwargs"]``) or a trained policy record. Data written before
    push-hidden-goal existed has no task: push. A task that contradicts the settings is an
    error."""
    config = PushConfig.from_saved(env_kwargs)
    if task is not None and task != config.task:
        raise ValueError(
            f"task={task!r} but its env settings (goal_frames={config.goal_frames}) are those "
            f"of {config.task!r}; expected them to agree"
        )
    return config.task, config


def make_push_env(config: PushConfig | None = None) -> PushEnv:
    """The push environment (a gymnasium env; see :class:`PushEnv`)."""
    return PushEnv(config)


def run_episode(
    env: PushEnv, act: Callable[[dict], np.ndarray], seed: int, record: bool = False
) -> dict[str, Any]:
    """One episode from ``env.reset(seed=seed)`` with ``act(observation) -> action`` at every
    step: seed, success (``is_success`` at any step), return, steps, the seconds spent in
    ``act`` and, with ``record``, the camera frames."""
    obs, _ = env.reset(seed=seed)
    frames, total, success, steps, act_seconds = [obs["image"]], 0.0, False, 0, 0.0
    while True:
        start = time.perf_counter()
        action = act(obs)
        act_seconds += time.perf_counter() - start
        obs, reward, terminated, truncated, info = env.step(action)
        total, steps = total + reward, steps + 1
        success = success or bool(info["is_success"])
        if record:
            frames.append(obs["image"])
        if terminated or truncated:
            break
    episode = {"seed": seed, "success": success, "return": total, "steps": steps}
    return episode | {"act_seconds": act_seconds} | ({"frames": frames} if record else {})


def _goals(panda_obs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return panda_obs["achieved_goal"], panda_obs["desired_goal"]


def _distance(panda_obs: dict[str, np.ndarray]) -> float:
    achieved, desired = _goals(panda_obs)
    return float(np.linalg.norm(achieved - desired))


def _build_panda() -> Any:
    """A fresh panda-gym PandaPushEnv (DIRECT connection, TinyRenderer), without the banner
    pybullet prints on stderr at import and the lines it prints on stdout at connection."""
    with _silenced(1, 2):
        import panda_gym.envs  # noqa: F401  (the first import prints the build time)
    with _silenced(1):
        from panda_gym.envs import PandaPushEnv

        return PandaPushEnv(render_mode="rgb_array", renderer="Tiny")


@contextlib.contextmanager
def _silenced(*fds: int) -> Iterator[None]:
    """Send file descriptors ``fds`` (1 stdout, 2 stderr) to /dev/null, C-level writes
    included, for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        saved = [os.dup(fd) for fd in fds]
    except OSError:  # no such descriptor (e.g. an embedded interpreter): leave them alone
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in fds:
            os.dup2(devnull, fd)
        yield
    finally:
        _flush_c_stdio()
        for fd, copy in zip(fds, saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


def _flush_c_stdio() -> None:
    """Flush C stdio buffers, so that what was written while silenced goes to /dev/null."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).fflush(None)
