"""``memrl push-collect``: record scripted-expert demonstrations of the push task in HDF5.

>>> memrl push-collect --episodes 200 --output data/push.hdf5 --seed 0 --workers 2

Episode ``i`` (0-based) runs with seed ``seed + i``: the environment is reset with it and the
expert's noise generator is seeded with it, so an episode depends on its seed alone -- not on
the number of workers or on the other episodes. Evaluate on seeds outside
``[seed, seed + episodes)``, e.g. 1000 and up for the default collection.

The file has robomimic's layout (:mod:`memrl.data.hdf5`): ``data/demo_<i>/obs/image``
(N, 84, 84, 3) uint8, ``obs/state`` (N, 3) float32, ``actions`` (N, 3) float32, ``rewards``
(N,) float32, ``dones`` (N,) bool, ``phase`` (N,) int8 (an index into ``phases``); row t holds
the observation before action t and the reward, done flag and phase after it. Each demo's
attributes: ``seed``, ``success``, ``num_samples``. Attributes of ``data``: ``env_args`` (JSON:
env name and its :class:`PushConfig`), ``expert`` (JSON: the expert's settings), ``phases``
(JSON list), ``expert_success_rate`` (over all recorded episodes, kept or not),
``num_episodes``, ``seeds`` (of the demos written, in order), ``noise``, ``keep_failures``,
``num_demos`` and ``total`` (steps), ``task`` (push or push-hidden-goal, whose goal_frames is in
``env_args``). Only successful episodes are written unless ``--keep-failures``.

``--task push-hidden-goal`` records the variant whose target marker shows in the first
``--goal-frames`` frames only (:class:`PushConfig`'s ``goal_frames``); the expert, which reads
the goal from the simulator, is unaffected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import multiprocessing as mp
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from memrl.data import write_demos
from memrl.envs.expert import PushExpert, rollout_expert
from memrl.envs.push import PHASES, PushConfig
from memrl.runs import check_writable_file
from memrl.runs.config import to_dict


@dataclasses.dataclass
class PushCollectConfig:
    """Record scripted-expert demonstrations of the push task (PandaPush-v3, 84x84 camera)."""

    episodes: int = 200
    """Episodes to run; episode i uses seed + i."""
    output: Path = Path("data/push.hdf5")
    """HDF5 file to write (robomimic layout); replaced atomically when done."""
    seed: int = 0
    """Seed of the first episode."""
    workers: int = 2
    """Parallel worker processes (1: run in this process)."""
    noise: float = 0.0
    """Standard deviation of Gaussian noise on the expert's actions (clipped to [-1, 1])."""
    keep_failures: bool = False
    """Also write the episodes in which the expert failed."""
    start_method: Literal["spawn", "fork", "forkserver"] = "spawn"
    """How worker processes start (pybullet works with each)."""
    task: Literal["push", "push-hidden-goal"] = "push"
    """push: the target is always drawn; push-hidden-goal: only in the first --goal-frames
    frames of an episode."""
    goal_frames: int = 3
    """push-hidden-goal: frames (reset's included) that show the target."""
    env: PushConfig = dataclasses.field(default_factory=PushConfig)
    """Environment settings (camera, image size, episode length, target marker)."""

    def __post_init__(self) -> None:
        if self.episodes < 1:
            raise ValueError(f"episodes={self.episodes}; expected at least 1")
        if self.workers < 1:
            raise ValueError(f"workers={self.workers}; expected at least 1")
        if not self.noise >= 0:
            raise ValueError(f"noise={self.noise}; expected a standard deviation >= 0")
        if self.seed < 0:
            raise ValueError(f"seed={self.seed}; expected a non-negative integer")
        if self.env.goal_frames is not None:
            raise ValueError(
                f"env.goal_frames={self.env.goal_frames}; set it with --task push-hidden-goal "
                "--goal-frames K"
            )
        if self.task == "push-hidden-goal":
            if not 1 <= self.goal_frames < self.env.max_steps:
                raise ValueError(
                    f"--goal-frames {self.goal_frames}; expected 1 <= K < the episode length "
                    f"({self.env.max_steps} steps)"
                )
            self.env = dataclasses.replace(self.env, goal_frames=self.goal_frames)


def collect_push(cfg: PushCollectConfig) -> dict[str, Any]:
    """Run the episodes, write the dataset, print a one-line summary; returns its figures."""
    check_writable_file(cfg.output, "--output")  # before minutes of collection, not after
    start = time.perf_counter()
    seeds = [cfg.seed + i for i in range(cfg.episodes)]
    episode_fn = functools.partial(rollout_expert, cfg.env, noise=cfg.noise)
    bar = tqdm(
        total=cfg.episodes,
        desc="push-collect",
        unit="ep",
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
    )
    kept, successes = [], 0
    with _episode_map(cfg) as episode_map:
        for done, episode in enumerate(episode_map(episode_fn, seeds), 1):
            successes += episode["attrs"]["success"]
            if episode["attrs"]["success"] or cfg.keep_failures:
                kept.append(episode)
            bar.update(1)
            bar.set_postfix(success=f"{successes / done:.0%}", refresh=False)
    bar.close()
    success_rate = successes / cfg.episodes
    attrs = {
        "env_args": {"env_name": "memrl.envs.push:PushEnv", "env_kwargs": to_dict(cfg.env)},
        "expert": {
            k: v for k, v in dataclasses.asdict(PushExpert(noise=cfg.noise)).items() if k != "seed"
        },
        "task": cfg.env.task,
        "phases": list(PHASES),
        "expert_success_rate": float(success_rate),
        "num_episodes": cfg.episodes,
        "seeds": np.asarray([ep["attrs"]["seed"] for ep in kept], dtype=np.int64),
        "noise": float(cfg.noise),
        "keep_failures": bool(cfg.keep_failures),
    }
    write_demos(cfg.output, kept, attrs)
    steps = sum(len(ep["actions"]) for ep in kept)
    seconds = time.perf_counter() - start
    print(
        f"push-collect: {cfg.episodes} episodes (seeds {seeds[0]}..{seeds[-1]}), expert success "
        f"{success_rate:.1%}; wrote {len(kept)} demos ({steps} steps) to {cfg.output} "
        f"in {seconds:.1f} s"
    )
    return {
        "episodes": cfg.episodes,
        "expert_success_rate": success_rate,
        "num_demos": len(kept),
        "steps": steps,
        "seconds": seconds,
    }


@contextlib.contextmanager
def _episode_map(cfg: PushCollectConfig) -> Iterator[Callable]:
    """``map(fn, seeds)`` yielding results in order: in this process for one worker, else
    lazily over a pool of ``cfg.workers`` processes."""
    if cfg.workers == 1:
        yield map
        return
    context = mp.get_context(cfg.start_method)
    with context.Pool(cfg.workers, initializer=_init_worker) as pool:
        yield functools.partial(pool.imap, chunksize=1)


def _init_worker() -> None:
    """One torch thread per worker (if torch is loaded): the workers are the parallelism."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
