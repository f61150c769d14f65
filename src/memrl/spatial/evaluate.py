"""``memrl spatial-eval RUN_DIR``: the figures of the spatial-memory spec's claims for a
`memrl spatial` run.

Writes ``RUN_DIR/eval.json`` with, on the held-out demonstrations (the run's own split):

- ``dynamics``: L_dyn of the predictor beside the copy baseline (predict z_{t+1} = z_t), their
  ratio and the relative improvement ``1 - ratio`` (the target: at least 0.2);
- ``segmenter`` (phases B and C): boundary F1 within one step of the segmenter on h_t and of the
  same head on z_t alone, with precision and recall;
- ``push`` (phases B and C, unless ``--episodes 0``): success of the policy on held-out seeds
  ``seed, seed + 1, ...`` (default 1000 on, apart from the demonstrations' 0 on), each in a fresh
  environment built as the demonstrations' were; the memory is reset at each episode start and
  carried from step to step, and ``frames_per_s`` times the whole stack (encoder, memory, policy).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import tyro
from tqdm.auto import tqdm

from memrl.data import load_episodes
from memrl.envs.push import PushConfig, PushEnv, run_episode
from memrl.runs import ConfigError, load_checkpoint, load_config, resolve_device, write_json
from memrl.spatial.data import REQUIRED, SpatialDemos
from memrl.spatial.model import SpatialModel, SpatialStep
from memrl.spatial.train import SpatialConfig, build_model, held_out


@dataclasses.dataclass
class SpatialEvalConfig:
    """Evaluate a `memrl spatial` run: dynamics vs copy, boundary F1, push success."""

    run_dir: Annotated[Path, tyro.conf.Positional]
    """Run directory written by `memrl spatial`."""
    dataset: Path | None = None
    """Demonstrations whose held-out split is evaluated; default: the run's own dataset."""
    episodes: int = 50
    """Push episodes on held-out seeds after phase B or C (0: skip)."""
    seed: int = 1000
    """Seed of the first push episode (the next ones count up)."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Where to run the model: auto picks cuda, then mps, then cpu."""

    def __post_init__(self) -> None:
        if self.episodes < 0:
            raise ValueError(f"episodes={self.episodes}; expected >= 0")


def load_spatial_model(run_dir: Path, device) -> tuple[SpatialModel, SpatialConfig, dict]:
    """The trained model of a run directory, its config and its ``model.pt`` payload."""
    if not (run_dir / "model.pt").is_file():
        raise ConfigError(f"{run_dir} holds no model.pt; train with `memrl spatial` first")
    cfg = load_config(SpatialConfig, run_dir / "config.yaml")
    payload = load_checkpoint(run_dir / "model.pt")
    model = build_model(cfg, from_checkpoint=True)
    model.load_state_dict(payload["model"])
    return model.to(device).eval(), cfg, payload


@torch.no_grad()
def run_push_episode(model: SpatialModel, env: PushEnv, seed: int, device) -> dict:
    """One greedy episode: image -> encoder -> memory step -> policy (:class:`SpatialStep`),
    memory carried."""
    step, state = SpatialStep(model), model.initial_state(1, device)
    is_first = torch.ones(1, dtype=torch.bool, device=device)

    def act(obs: dict) -> np.ndarray:
        nonlocal state, is_first
        image = torch.from_numpy(obs["image"])[None].to(device)
        gripper = torch.from_numpy(obs["state"])[None].to(device)
        action, *state = step(image, gripper, is_first, *state)
        is_first = torch.zeros_like(is_first)
        return action[0].cpu().numpy()

    return run_episode(env, act, seed)


def evaluate_spatial(cfg: SpatialEvalConfig) -> dict:
    """Compute the figures (module docstring) and write ``eval.json``."""
    device = resolve_device(cfg.device)
    model, run_cfg, payload = load_spatial_model(cfg.run_dir, device)
    split = load_episodes(cfg.dataset or run_cfg.dataset, run_cfg.val_fraction, REQUIRED)
    val = SpatialDemos.encode(split.val, model.encoder, device)
    figures = held_out(model, val, run_cfg, device)
    result: dict = {
        "phase": run_cfg.phase,
        "core": run_cfg.core,
        "held_out_demos": len(val),
        "held_out_steps": val.store.num_steps,
        "dynamics": {
            "kind": run_cfg.dyn_loss,
            "loss": figures["dyn_loss"],
            "copy_baseline": figures["copy_loss"],
            "ratio": figures["dyn_vs_copy"],
            "improvement": 1 - figures["dyn_vs_copy"],
        },
    }
    if run_cfg.phase != "A":
        result["segmenter"] = {
            "tolerance_steps": 1,
            "f1_memory": figures["f1_memory"],
            "f1_z_only": figures["f1_z_only"],
            "precision_memory": figures["precision_memory"],
            "recall_memory": figures["recall_memory"],
            "precision_z_only": figures["precision_z_only"],
            "recall_z_only": figures["recall_z_only"],
        }
        result["policy_loss"] = figures["policy_loss"]
        if cfg.episodes:
            result["push"] = _push_success(model, payload, cfg, device)
    write_json(cfg.run_dir / "eval.json", result)
    line = (
        f"spatial-eval[{run_cfg.phase}]: dynamics {figures['dyn_loss']:.4f} vs copy "
        f"{figures['copy_loss']:.4f} ({1 - figures['dyn_vs_copy']:+.1%})"
    )
    if "segmenter" in result:
        line += f"; F1 {figures['f1_memory']:.3f} (z only {figures['f1_z_only']:.3f})"
    if "push" in result:
        line += f"; push success {result['push']['success_rate']:.1%}"
    print(f"{line}; {cfg.run_dir / 'eval.json'}")
    return result


def _push_success(model: SpatialModel, payload: dict, cfg: SpatialEvalConfig, device) -> dict:
    env = PushEnv(PushConfig.from_saved(payload["env_kwargs"]))
    results = []
    try:
        for i in tqdm(range(cfg.episodes), desc="spatial-eval", unit="ep"):
            results.append(run_push_episode(model, env, cfg.seed + i, device))
    finally:
        env.close()
    steps = sum(r["steps"] for r in results)
    return {
        "success_rate": float(np.mean([r["success"] for r in results])),
        "mean_return": float(np.mean([r["return"] for r in results])),
        "episodes": cfg.episodes,
        "seeds": [cfg.seed, cfg.seed + cfg.episodes - 1],
        "frames_per_s": steps / max(sum(r["act_seconds"] for r in results), 1e-9),
        "results": results,
    }
