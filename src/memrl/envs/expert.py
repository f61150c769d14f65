"""A scripted expert for the push task, and one recorded expert episode.

The expert reads the privileged state (``info["privileged"]`` of :class:`~memrl.envs.push.
PushEnv`: gripper position and velocity, block position, target) and follows a recipe measured
on this task. With ``u`` the unit vector from the block to the target (in the
table plane) and the *pre-push point* ``pre_push`` metres behind the block on that line:

1. **push** while the gripper is low, behind the block and within ``off_line`` of the line:
   aim at a point just behind the block's centre (``push_lead`` along ``u``). Recomputed
   every step, so the push corrects itself as the block turns or drifts.
2. **lift** when the gripper is low and near the block but not in position to push.
3. **descend** onto the pre-push point once above it, with the downward speed capped.
4. **approach** the pre-push point from above otherwise, on a cone: the higher, the farther
   from it (``approach_slope``), so that the arm never sweeps low over the block.

Each step's action is ``clip((goal - ee - damping * ee_velocity) / scale, -1, 1)`` plus, with
``noise > 0``, Gaussian noise of that standard deviation from the expert's own seeded
generator (then clipped again).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from memrl.envs.push import BLOCK_SIZE, PushConfig, PushEnv


@dataclasses.dataclass
class PushExpert:
    """The scripted push expert (module docstring). Lengths in metres."""

    noise: float = 0.0
    """Standard deviation of Gaussian noise added to each action (0: none)."""
    seed: int | None = None
    """Seed of the noise generator."""
    pre_push: float = 0.045
    """Distance of the pre-push point behind the block's centre."""
    push_height: float = 0.02
    """Gripper height while pushing (the block's centre)."""
    travel_height: float = 0.08
    """Gripper height when travelling over the table (clears the block)."""
    approach_slope: float = 0.5
    """While approaching, the gripper heads this many metres above travel_height per metre
    from the pre-push point (in the plane): it comes down on a cone, from above."""
    off_line: float = 0.03
    """Farther than this from the block-target line, stop pushing and approach again."""
    push_lead: float = -0.005
    """While pushing, aim this far past the block's centre along the line (negative: just
    behind it, which pushes at about half speed; faster pushes lose the block more often)."""
    descend_radius: float = 0.015
    """Start descending when this close (in the plane) to the pre-push point."""
    max_descent: float = 0.3
    """Largest downward action below slow_height (the arm overshoots a fast descent and
    knocks the block)."""
    slow_height: float = 0.1
    """Below this gripper height, downward actions are capped at max_descent."""
    scale: float = 0.05
    """Distance to the goal that gives a full action."""
    damping: float = 0.02
    """Gripper velocity (m/s) times this is subtracted from the distance to the goal."""

    def __post_init__(self) -> None:
        if not self.noise >= 0:
            raise ValueError(f"noise={self.noise}; expected >= 0")
        if not self.scale > 0:
            raise ValueError(f"scale={self.scale}; expected > 0")
        self.rng = np.random.default_rng(self.seed)

    def __call__(self, privileged: dict[str, np.ndarray]) -> np.ndarray:
        """The action (3,) float32 for panda-gym's observation dict ``privileged``."""
        action = self.clean_action(privileged["observation"], privileged["desired_goal"])
        if self.noise > 0:
            action = np.clip(action + self.rng.normal(0.0, self.noise, 3), -1.0, 1.0)
        return action.astype(np.float32)

    def clean_action(self, observation: np.ndarray, target: np.ndarray) -> np.ndarray:
        """The noiseless action from panda-gym's observation (18,) and the target (3,)."""
        ee, ee_velocity, block = observation[0:3], observation[3:6], observation[6:9]
        goal = self.goal(ee, block[:2], target[:2])
        action = np.clip((goal - ee - self.damping * ee_velocity) / self.scale, -1.0, 1.0)
        if ee[2] < self.slow_height:
            action[2] = max(action[2], -self.max_descent)
        return action

    def goal(self, ee: np.ndarray, block: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Where the gripper should head now, (x, y, z)."""
        to_target = target - block
        u = to_target / max(float(np.linalg.norm(to_target)), 1e-6)  # (2,) block -> target
        relative = ee[:2] - block
        along = float(relative @ u)  # < 0: behind the block
        off = float(np.linalg.norm(relative - along * u))
        low = ee[2] < (self.push_height + self.travel_height) / 2
        if low and along < -BLOCK_SIZE / 2 and off < self.off_line:
            return np.append(block + self.push_lead * u, self.push_height)  # push
        pre_push = block - self.pre_push * u
        near_block = float(np.linalg.norm(relative)) < self.pre_push + BLOCK_SIZE
        if low and near_block:
            return np.append(ee[:2], self.travel_height)  # lift
        if float(np.linalg.norm(ee[:2] - pre_push)) < self.descend_radius:
            return np.append(pre_push, self.push_height)  # descend
        height = self.travel_height + self.approach_slope * float(np.linalg.norm(ee[:2] - pre_push))
        return np.append(pre_push, height)  # approach from above


def rollout_expert(
    config: PushConfig, seed: int, noise: float = 0.0, expert: PushExpert | None = None
) -> dict[str, Any]:
    """One episode of the expert in a fresh :class:`PushEnv`, both seeded with ``seed``.

    Returns robomimic-style arrays, one row per step t: ``obs`` {``image`` (N, S, S, 3) uint8,
    ``state`` (N, 3) float32} observed before ``actions`` (N, 3) float32; ``rewards`` (N,)
    float32, ``dones`` (N,) bool and ``phase`` (N,) int8 of the step's outcome; and ``attrs``
    {seed, success, num_samples}.
    """
    expert = expert or PushExpert(noise=noise, seed=seed)
    env = PushEnv(config)
    try:
        obs, info = env.reset(seed=seed)
        images, states, actions, rewards, dones, phases = [], [], [], [], [], []
        success = False
        while True:
            action = expert(info["privileged"])
            images.append(obs["image"])
            states.append(obs["state"])
            actions.append(action)
            obs, reward, terminated, truncated, info = env.step(action)
            rewards.append(reward)
            dones.append(terminated or truncated)
            phases.append(info["phase"])
            success = bool(info["is_success"])
            if terminated or truncated:
                break
    finally:
        env.close()
    return {
        "obs": {"image": np.stack(images), "state": np.stack(states)},
        "actions": np.stack(actions).astype(np.float32),
        "rewards": np.asarray(rewards, dtype=np.float32),
        "dones": np.asarray(dones, dtype=bool),
        "phase": np.asarray(phases, dtype=np.int8),
        "attrs": {"seed": int(seed), "success": success, "num_samples": len(actions)},
    }
