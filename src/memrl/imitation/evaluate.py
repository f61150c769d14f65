"""``memrl imitation-eval RUN_DIR``: run a trained policy on held-out push seeds.

Episodes use seeds ``seed, seed + 1, ...`` (default 1000 on: `memrl push-collect` records seeds
from 0 up, so keep them apart), each in a fresh environment built exactly as the demonstrations'
(the settings saved with the policy). A recurrent policy's state is carried from step to step and
reset at the start of every episode. Writes ``eval.json`` (success_rate, mean_return, episodes,
per-episode results) and GIFs of the first ``--videos`` episodes to ``RUN_DIR/videos/``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated

import imageio.v2 as imageio
import numpy as np
import torch
import tyro
from tqdm.auto import tqdm

from memrl.envs.push import PushConfig, PushEnv
from memrl.imitation.bc import BCConfig, VisuomotorBCPolicy
from memrl.runs import ConfigError, load_checkpoint, load_config, resolve_device


@dataclasses.dataclass
class ImitationEvalConfig:
    """Evaluate a `memrl bc` run on held-out push seeds."""

    run_dir: Annotated[Path, tyro.conf.Positional]
    """Run directory written by `memrl bc`."""
    episodes: int = 50
    """Evaluation episodes."""
    seed: int = 1000
    """Seed of the first episode (the next ones count up)."""
    videos: int = 2
    """Save GIFs of this many first episodes."""
    device: str = "cpu"
    """Device to run the policy on."""

    def __post_init__(self) -> None:
        if self.episodes < 1 or self.videos < 0:
            raise ValueError(
                f"episodes={self.episodes}, videos={self.videos}; expected >= 1 and >= 0"
            )


def load_policy(run_dir: Path, device: torch.device) -> tuple[VisuomotorBCPolicy, PushConfig]:
    """The trained policy of a run directory and the env settings of its demonstrations."""
    if not (run_dir / "policy.pt").is_file():
        raise ConfigError(f"{run_dir} holds no policy.pt; train with `memrl bc` first")
    payload = load_checkpoint(run_dir / "policy.pt")
    cfg = load_config(BCConfig, run_dir / "config.yaml")
    policy = VisuomotorBCPolicy(dataclasses.replace(cfg, pretrained=False))
    policy.load_state_dict(payload["policy"])
    env_kwargs = {
        k: tuple(v) if isinstance(v, list) else v for k, v in payload["env_kwargs"].items()
    }
    return policy.to(device).eval(), PushConfig(**env_kwargs)


@torch.no_grad()
def run_episode(policy, env: PushEnv, seed: int, device, record: bool = False) -> dict:
    """One greedy episode; the policy's recurrent state starts fresh and is carried through."""
    obs, _ = env.reset(seed=seed)
    state = policy.initial_state(1, device)
    is_first = torch.ones(1, 1, dtype=torch.bool, device=device)
    frames, total, success, steps = [obs["image"]], 0.0, False, 0
    while True:
        image = torch.from_numpy(obs["image"]).permute(2, 0, 1)[None, None].to(device)
        proprio = torch.from_numpy(obs["state"])[None, None].to(device)
        raw, state = policy(image, proprio, state, is_first)
        is_first = torch.zeros_like(is_first)
        action = policy.to_action(raw)[0, 0].cpu().numpy()
        obs, reward, terminated, truncated, info = env.step(action)
        total, steps = total + reward, steps + 1
        success = success or bool(info["is_success"])
        if record:
            frames.append(obs["image"])
        if terminated or truncated:
            break
    return {"seed": seed, "success": success, "return": total, "steps": steps, "frames": frames}


def run_imitation_eval(cfg: ImitationEvalConfig) -> dict:
    device = resolve_device(cfg.device)
    policy, env_config = load_policy(cfg.run_dir, device)
    env = PushEnv(env_config)
    results = []
    (cfg.run_dir / "videos").mkdir(exist_ok=True)
    try:
        for i in tqdm(range(cfg.episodes), desc="imitation-eval", unit="ep"):
            record = i < cfg.videos
            episode = run_episode(policy, env, cfg.seed + i, device, record)
            if record:
                path = cfg.run_dir / "videos" / f"episode_{cfg.seed + i}.gif"
                imageio.mimsave(path, episode["frames"], duration=0.08, loop=0)
            results.append({k: v for k, v in episode.items() if k != "frames"})
    finally:
        env.close()
    summary = {
        "success_rate": float(np.mean([r["success"] for r in results])),
        "mean_return": float(np.mean([r["return"] for r in results])),
        "episodes": cfg.episodes,
        "seeds": [cfg.seed, cfg.seed + cfg.episodes - 1],
        "results": results,
    }
    (cfg.run_dir / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"imitation-eval: success {summary['success_rate']:.1%} over {cfg.episodes} episodes "
        f"(seeds {cfg.seed}..{cfg.seed + cfg.episodes - 1}), mean return "
        f"{summary['mean_return']:.2f}; {cfg.run_dir / 'eval.json'}"
    )
    return summary
