"""``memrl rssm-eval OUTPUT_DIR``: open-loop prediction against three baselines, and a probe.

On held-out sequences (a split the trainer never draws from), every model sees the first K
frames and then predicts ``horizons`` frames open loop from the actions alone:

- ``rssm``: the trained RSSM's predictive mean: the average frame of ``--samples`` open-loop
  rollouts sampled from the prior (the point prediction that minimises expected squared error;
  a single sharp guess pays for a dot in the wrong place twice). ``--samples 0`` follows the
  posterior's and the prior's modes instead;
- ``copy_last``: the last context frame, repeated;
- ``blank``: an all-background frame;
- ``deterministic``: the no-latent model trained beside the RSSM on the same batches, fed its own
  predictions.

Per horizon: image MSE (squared error summed over pixels, averaged over sequences) and the error
in pixels of the dot position read from each predicted frame against the true state. A frame's
dot position is its intensity centroid over pixels above half the frame's peak; a frame whose
peak is below ``MIN_PEAK`` holds no dot and reads as the image centre (so ``blank`` measures the
distance to the centre).

Probe: a ridge regression from the RSSM's filtered features (h, z) to the true (x, y), fitted on
the occluded steps of half of the sequences and scored (R^2) on the occluded steps of the other
half, beside the R^2 of "the last position seen" on the same steps.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro

from memrl.envs.moving_dot import generate_moving_dot_sequences
from memrl.runs import ConfigError, load_config, resolve_device, write_json
from memrl.runs.metrics import plt
from memrl.world_model.train import RSSMTrainConfig, data_generator, load_world_model

MIN_PEAK = 0.2
"""A predicted frame whose brightest pixel is below this holds no dot (the dot's peak is 1)."""


@dataclasses.dataclass
class RSSMEvalConfig:
    """Evaluate a `memrl rssm` run: open-loop error vs baselines, and a linear probe."""

    output_dir: Annotated[Path, tyro.conf.Positional]
    """Directory written by `memrl rssm` (holds model.pt)."""
    sequences: int = 512
    """Held-out sequences."""
    horizons: int = 20
    """Open-loop steps predicted after the K context frames."""
    samples: int = 8
    """Open-loop rollouts averaged into the RSSM's prediction (0: follow the modes)."""
    seed: int = 0
    """Seed of the sampling (the held-out data depend only on the training seed)."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Where to evaluate: auto picks cuda, then mps, then cpu."""

    def __post_init__(self) -> None:
        if self.sequences < 4 or self.horizons < 1 or self.samples < 0:
            raise ValueError(
                f"sequences={self.sequences}, horizons={self.horizons}, samples={self.samples}; "
                "expected >= 4, >= 1 and >= 0"
            )


def dot_positions(frames: torch.Tensor) -> torch.Tensor:
    """Intensity centroid of each frame (..., 1, H, W) -> (..., 2) = (x, y) in pixels."""
    frames = frames.squeeze(-3).clamp(min=0)
    H, W = frames.shape[-2:]
    peak = frames.amax((-2, -1), keepdim=True)
    weights = (frames - 0.5 * peak).clamp(min=0)
    mass = weights.sum((-2, -1)).clamp(min=1e-12)
    ys = torch.arange(H, dtype=frames.dtype, device=frames.device)
    xs = torch.arange(W, dtype=frames.dtype, device=frames.device)
    x = (weights.sum(-2) * xs).sum(-1) / mass
    y = (weights.sum(-1) * ys).sum(-1) / mass
    centre = torch.tensor([(W - 1) / 2, (H - 1) / 2], dtype=frames.dtype, device=frames.device)
    empty = peak[..., 0, 0] < MIN_PEAK
    return torch.where(empty[..., None], centre, torch.stack([x, y], -1))


def prediction_errors(pred: torch.Tensor, true_obs: torch.Tensor, true_xy: torch.Tensor):
    """(B, N, 1, H, W) predictions -> per-horizon image MSE and position error, lists of N."""
    mse = (pred - true_obs).square().sum((-3, -2, -1)).mean(0)
    position = (dot_positions(pred) - true_xy).norm(dim=-1).mean(0)
    return mse.tolist(), position.tolist()


def r2_score(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Coefficient of determination over all output dimensions together."""
    residual = (target - pred).square().sum()
    total = (target - target.mean(0)).square().sum()
    return float(1 - residual / total)


def last_seen_positions(states: torch.Tensor, visible: torch.Tensor):
    """The dot's position at the last visible step up to each step (B, T, 2), and whether any
    step so far was visible (B, T)."""
    B, T = visible.shape
    index = torch.where(visible, torch.arange(T).expand(B, T), torch.full((B, T), -1))
    last = torch.cummax(index, 1).values  # (B, T)
    seen = last >= 0
    gathered = torch.gather(states[..., :2], 1, last.clamp(min=0)[..., None].expand(B, T, 2))
    return gathered, seen


def probe_scores(features: torch.Tensor, states: torch.Tensor, visible: torch.Tensor):
    """Ridge probe (h, z) -> (x, y) on occluded steps: R^2 on held-out sequences, and the R^2 of
    the last position seen on the same steps."""
    last, seen = last_seen_positions(states, visible)
    occluded = ~visible & seen
    half = features.shape[0] // 2
    train, test = occluded.clone(), occluded.clone()
    train[half:], test[:half] = False, False
    if int(train.sum()) < 10 or int(test.sum()) < 10:
        raise ConfigError(
            f"only {int(occluded.sum())} occluded steps in the held-out sequences, too few for a "
            "probe; evaluate more --sequences (or train with occlusion on)"
        )
    x_train = torch.cat([features[train], torch.ones(int(train.sum()), 1)], 1).double()
    y_train = states[..., :2][train].double()
    ridge = 1e-3 * torch.eye(x_train.shape[1], dtype=torch.float64)
    weights = torch.linalg.solve(x_train.T @ x_train + ridge, x_train.T @ y_train)
    x_test = torch.cat([features[test], torch.ones(int(test.sum()), 1)], 1).double()
    y_test = states[..., :2][test].double()
    return r2_score(x_test @ weights, y_test), r2_score(last[test].double(), y_test)


@torch.no_grad()
def run_rssm_eval(cfg: RSSMEvalConfig) -> dict:
    """Evaluate and write ``eval.json`` and ``eval_curves.png`` into the output directory."""
    if not (cfg.output_dir / "model.pt").is_file():
        raise ConfigError(f"{cfg.output_dir} holds no model.pt; train with `memrl rssm` first")
    device = resolve_device(cfg.device)
    train_cfg = load_config(RSSMTrainConfig, cfg.output_dir / "config.yaml")
    rssm, deterministic = load_world_model(cfg.output_dir)
    rssm.to(device)
    K, N = train_cfg.K, cfg.horizons
    data_cfg = train_cfg.data_config(seq_len=max(train_cfg.seq_len, K + N))
    data = generate_moving_dot_sequences(
        data_cfg, cfg.sequences, data_generator(train_cfg.seed, "eval")
    )
    data = {k: v.to(device) for k, v in data.items()}
    obs, actions, states = data["obs"], data["actions"], data["states"]
    true_obs, true_xy = obs[:, K : K + N], states[:, K : K + N, :2]
    future = actions[:, K : K + N]
    torch.manual_seed(cfg.seed)
    if cfg.samples == 0:
        rssm_pred = rssm.open_loop_rollout(obs, actions, future, K)
    else:
        rssm_pred = (
            sum(
                rssm.open_loop_rollout(obs, actions, future, K, sample=True)
                for _ in range(cfg.samples)
            )
            / cfg.samples
        )
    predictions = {
        "rssm": rssm_pred,
        "copy_last": obs[:, K - 1 : K].expand(-1, N, -1, -1, -1),
        "blank": torch.zeros_like(true_obs),
    }
    if deterministic is not None:
        predictions["deterministic"] = deterministic.to(device).open_loop_rollout(
            obs, actions, future, K
        )
    mse, position = {}, {}
    for name, pred in predictions.items():
        mse[name], position[name] = prediction_errors(pred, true_obs, true_xy)

    probe = last_seen = None  # without occlusion there is nothing to track through
    if train_cfg.use_occlusion:
        filtered = rssm(obs, actions)
        features = torch.cat([filtered["h"], rssm.mode(filtered["post"])], -1).cpu()
        probe, last_seen = probe_scores(features, states.cpu(), data["visible"].cpu())
    results = {
        "horizons": list(range(1, N + 1)),
        "K": K,
        "sequences": cfg.sequences,
        "samples": cfg.samples,
        "mse": mse,
        "position_error": position,
        "probe_r2_occluded": probe,
        "probe_r2_last_seen": last_seen,
        "occluded_fraction": float((~data["visible"]).float().mean()),
    }
    write_json(cfg.output_dir / "eval.json", results)
    plot_eval_curves(results, cfg.output_dir / "eval_curves.png")
    for h in (1, 5, 10, 20):
        if h <= N:
            row = ", ".join(f"{k} {v[h - 1]:.2f}" for k, v in position.items())
            print(f"horizon {h:2d} position error (px): {row}")
    if probe is not None:
        print(f"probe R^2 on occluded steps: {probe:.3f} (last seen position: {last_seen:.3f})")
    return results


def plot_eval_curves(results: dict, path: Path) -> None:
    """Image MSE and dot-position error against horizon, one line per model."""
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for ax, key, label in (
        (axes[0], "mse", "image squared error (sum over pixels)"),
        (axes[1], "position_error", "dot position error (pixels)"),
    ):
        for name, values in results[key].items():
            ax.plot(results["horizons"], values, "o-" if name == "rssm" else ".-", label=name, ms=3)
        ax.set_xlabel(f"open-loop horizon (after K={results['K']} frames)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend()
    if results["probe_r2_occluded"] is not None:
        fig.suptitle(
            f"probe R² on occluded steps {results['probe_r2_occluded']:.2f} "
            f"(last seen position {results['probe_r2_last_seen']:.2f})",
            fontsize=10,
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
