"""``memrl imitation-eval RUN_DIR``: run a trained policy (``memrl bc`` or ``memrl act``) on
held-out push seeds.

Episodes use seeds ``seed, seed + 1, ...`` (default 1000 on: `memrl push-collect` records seeds
from 0 up, so keep them apart), each in a fresh environment built exactly as the demonstrations'
(the settings saved with the policy). A recurrent BC policy's state is carried from step to step
and reset at the start of every episode. An ACT policy executes each predicted chunk, or with
``--temporal-ensemble`` averages every prediction made for a step (:mod:`memrl.imitation.act`).
Writes ``eval.json`` (success_rate with its 95% Wilson interval ``success_ci95``, mean_return,
episodes, per-episode results) and GIFs of the first ``--videos`` episodes to
``RUN_DIR/videos/``.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from pathlib import Path
from typing import Annotated, Literal

import imageio.v2 as imageio
import numpy as np
import torch
import tyro
from tqdm.auto import tqdm

from memrl.envs.push import PushConfig, PushEnv, saved_task
from memrl.envs.push import run_episode as run_push_episode
from memrl.imitation.act import ACTConfig, ACTPolicy
from memrl.imitation.bc import BCConfig, VisuomotorBCPolicy
from memrl.runs import ConfigError, load_checkpoint, load_config, resolve_device, write_json


@dataclasses.dataclass
class ImitationEvalConfig:
    """Evaluate a `memrl bc` or `memrl act` run on held-out push seeds."""

    run_dir: Annotated[Path, tyro.conf.Positional]
    """Run directory written by `memrl bc` or `memrl act`."""
    episodes: int = 50
    """Evaluation episodes."""
    seed: int = 1000
    """Seed of the first episode (the next ones count up)."""
    videos: int = 2
    """Save GIFs of this many first episodes."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Where to run the policy: auto picks cuda, then mps, then cpu."""
    temporal_ensemble: bool = False
    """ACT: query every step and average all predictions for it (else execute whole chunks)."""
    ensemble_m: float = 0.01
    """ACT temporal ensembling: weight exp(-m * i), i = 0 the oldest prediction."""
    task: Literal["push", "push-hidden-goal"] | None = None
    """Fail unless the policy was trained on this task; None: evaluate on the policy's own task,
    recorded from its demonstrations."""

    def __post_init__(self) -> None:
        if self.episodes < 1 or self.videos < 0:
            raise ValueError(
                f"episodes={self.episodes}, videos={self.videos}; expected >= 1 and >= 0"
            )
        if self.ensemble_m < 0:
            raise ValueError(f"ensemble_m={self.ensemble_m}; expected >= 0")


class RecurrentController:
    """A BC policy acting step by step, its recurrent state carried through the episode."""

    def __init__(self, policy: VisuomotorBCPolicy) -> None:
        self.policy = policy

    def reset(self) -> None:
        self.state, self.is_first = self.policy.initial_state(1, _device(self.policy)), True

    def __call__(self, image: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        """image (3, H, W) uint8, proprio (3,) -> action (3,)."""
        is_first = torch.full((1, 1), self.is_first, device=image.device)
        raw, self.state = self.policy(image[None, None], proprio[None, None], self.state, is_first)
        self.is_first = False
        return self.policy.to_action(raw)[0, 0]


class ChunkController:
    """An ACT policy: executes each chunk, or with ``ensemble_m`` set queries every step and
    returns the exp(-m * i)-weighted mean of all predictions for the step (i = 0 the oldest)."""

    def __init__(self, policy: ACTPolicy, ensemble_m: float | None) -> None:
        self.policy, self.ensemble_m = policy, ensemble_m

    def reset(self) -> None:
        self.history: deque = deque(maxlen=self.policy.obs_horizon)
        self.plans: list[tuple[int, torch.Tensor]] = []  # (step of the query, chunk (K, 3))
        self.t = 0

    def __call__(self, image: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        if not self.history:  # an episode's first frame stands in for the frames before it
            self.history.extend([(image, proprio)] * self.policy.obs_horizon)
        self.history.append((image, proprio))
        K = self.policy.chunk_size
        self.plans = [(s, plan) for s, plan in self.plans if self.t - s < K]
        if self.ensemble_m is not None or not self.plans:
            images = torch.stack([i for i, _ in self.history])[:, None]
            states = torch.stack([p for _, p in self.history])[:, None]
            self.plans.append((self.t, self.policy.to_action(self.policy(images, states))[:, 0]))
        if self.ensemble_m is None:
            start, plan = self.plans[-1]
            action = plan[self.t - start]
        else:  # plans are oldest first
            predictions = torch.stack([plan[self.t - s] for s, plan in self.plans])
            weights = torch.exp(-self.ensemble_m * torch.arange(len(predictions)))
            action = (weights[:, None] * predictions).sum(0) / weights.sum()
        self.t += 1
        return action


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


POLICIES = {"bc": (BCConfig, VisuomotorBCPolicy), "act": (ACTConfig, ACTPolicy)}


def load_policy(
    run_dir: Path, device: torch.device, expected_task: str | None = None
) -> tuple[VisuomotorBCPolicy | ACTPolicy, PushConfig]:
    """The trained policy of a run directory and the env settings of its demonstrations (its
    task's); ``expected_task``: fail unless it is the policy's task."""
    if not (run_dir / "policy.pt").is_file():
        raise ConfigError(f"{run_dir} holds no policy.pt; train with `memrl bc` or `memrl act`")
    payload = load_checkpoint(run_dir / "policy.pt")
    if payload.get("kind") not in POLICIES:
        raise ConfigError(
            f"{run_dir / 'policy.pt'} holds a policy of kind {payload.get('kind')!r}; "
            f"expected one of {sorted(POLICIES)}"
        )
    try:
        task, env_config = saved_task(payload.get("task"), payload["env_kwargs"])
    except ValueError as err:
        raise ConfigError(f"{run_dir / 'policy.pt'}: {err}") from None
    if expected_task is not None and task != expected_task:
        raise ConfigError(
            f"--task {expected_task}: {run_dir} was trained on {task} demonstrations; a policy is "
            f"evaluated on the task it learned (omit --task, or train on {expected_task} data)"
        )
    config_class, policy_class = POLICIES[payload["kind"]]
    cfg = load_config(config_class, run_dir / "config.yaml")
    policy = policy_class(dataclasses.replace(cfg, pretrained=False))
    policy.load_state_dict(payload["policy"])
    return policy.to(device).eval(), env_config


def controller_for(
    policy: VisuomotorBCPolicy | ACTPolicy,
    temporal_ensemble: bool = False,
    ensemble_m: float = 0.01,
) -> RecurrentController | ChunkController:
    if isinstance(policy, ACTPolicy):
        return ChunkController(policy, ensemble_m if temporal_ensemble else None)
    return RecurrentController(policy)


@torch.no_grad()
def run_episode(controller, env: PushEnv, seed: int, device, record: bool = False) -> dict:
    """One greedy episode; the controller starts fresh (memory, history, plans)."""
    controller.reset()

    def act(obs: dict) -> np.ndarray:
        image = torch.from_numpy(obs["image"]).permute(2, 0, 1).to(device)
        return controller(image, torch.from_numpy(obs["state"]).to(device)).cpu().numpy()

    return run_push_episode(env, act, seed, record)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a success rate (95% for z = 1.96): ``(c - h, c + h)`` with
    ``c = (p + z²/2n) / (1 + z²/n)``, ``h = z sqrt(p(1 - p)/n + z²/4n²) / (1 + z²/n)``,
    ``p = successes / n``. Unlike p ± z·sqrt(p(1-p)/n) it stays inside [0, 1] and is not
    empty at 0 or n successes."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"successes={successes}, n={n}; expected 0 <= successes <= n, n >= 1")
    p, z2 = successes / n, z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    return max(centre - half, 0.0), min(centre + half, 1.0)


def run_imitation_eval(cfg: ImitationEvalConfig) -> dict:
    device = resolve_device(cfg.device)
    policy, env_config = load_policy(cfg.run_dir, device, cfg.task)
    controller = controller_for(policy, cfg.temporal_ensemble, cfg.ensemble_m)
    env = PushEnv(env_config)
    results = []
    (cfg.run_dir / "videos").mkdir(exist_ok=True)
    try:
        for i in tqdm(range(cfg.episodes), desc="imitation-eval", unit="ep"):
            record = i < cfg.videos
            episode = run_episode(controller, env, cfg.seed + i, device, record)
            if record:
                path = cfg.run_dir / "videos" / f"episode_{cfg.seed + i}.gif"
                imageio.mimsave(path, episode["frames"], duration=0.08, loop=0)
            results.append({k: v for k, v in episode.items() if k != "frames"})
    finally:
        env.close()
    successes = sum(bool(r["success"]) for r in results)
    summary = {
        "success_rate": successes / cfg.episodes,
        "success_ci95": wilson_interval(successes, cfg.episodes),
        "mean_return": float(np.mean([r["return"] for r in results])),
        "episodes": cfg.episodes,
        "task": env_config.task,
        "temporal_ensemble": cfg.temporal_ensemble if isinstance(policy, ACTPolicy) else None,
        "seeds": [cfg.seed, cfg.seed + cfg.episodes - 1],
        "results": results,
    }
    write_json(cfg.run_dir / "eval.json", summary)
    print(
        f"imitation-eval: success {summary['success_rate']:.1%} (95% CI "
        f"{summary['success_ci95'][0]:.1%}–{summary['success_ci95'][1]:.1%}) over "
        f"{cfg.episodes} episodes "
        f"(seeds {cfg.seed}..{cfg.seed + cfg.episodes - 1}), mean return "
        f"{summary['mean_return']:.2f}; {cfg.run_dir / 'eval.json'}"
    )
    return summary
