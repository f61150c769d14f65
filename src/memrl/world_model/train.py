"""``memrl rssm``: train the RSSM spec's world model on the moving-dot world (and the
deterministic baseline).

Flags, spellings and defaults are the spec's (``--batch_size 32 --seq_len 64 --grid_size 32
--epochs 100 --lr 1e-3 --use_occlusion/--no_occlusion --output_dir outputs --viz_interval 10
--K 8``; hyphenated spellings work too). ``--output_dir`` receives the spec's outputs —
``model.pt``, ``recon_epoch*.png``, ``rollout_epoch*.png``, ``loss_curves.png``,
``eval_rollout.png`` — and the run-directory files (config.yaml, metrics.jsonl, TensorBoard
events, checkpoints/), so ``--resume outputs`` continues a killed run.

Every epoch draws fresh sequences from a generator seeded by (seed, epoch): infinite data, and a
resumed run sees exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Annotated

import torch
import tyro

from memrl.envs.moving_dot import MovingDotConfig, generate_moving_dot_sequences
from memrl.runs import (
    Run,
    RunOptions,
    distributed,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
)
from memrl.runs.metrics import plt
from memrl.world_model.rssm import RSSM, DeterministicModel, RSSMConfig, rssm_loss

DOT_DRAWN = 0.5
"""A model draws the dot once its frames' squared error is below this share of the empty
frame's (``vs_blank`` < 0.5); ``time_to_dot`` is the first logged step where it does."""


@dataclasses.dataclass
class RSSMTrainConfig(RunOptions):
    """Train an RSSM world model on the moving-dot world with occlusion (the RSSM spec). Flags may
    be spelled as in the spec (--batch_size, --no_occlusion) or with hyphens."""

    seed: int = 42
    """Random seed (model init, data, sampling)."""
    output_dir: Path | None = Path("outputs")
    """Where model.pt, the plots and the run files go."""
    model: Annotated[RSSMConfig, tyro.conf.OmitArgPrefixes] = dataclasses.field(
        default_factory=RSSMConfig
    )
    """The world model: every RSSMConfig field is a flag (--grid_size, --channels, --groups)."""
    batch_size: int = 32
    """Sequences per gradient step."""
    seq_len: int = 64
    """Frames per training sequence."""
    epochs: int = 100
    """Training epochs."""
    steps_per_epoch: int = 16
    """Gradient steps per epoch, each on freshly generated sequences."""
    lr: float = 1e-3
    """Adam learning rate (both models)."""
    use_occlusion: bool = True
    """Occluding rectangles hide the dot (partial observability); --no_occlusion turns it off."""
    viz_interval: int = 10
    """Write recon_epoch*.png and rollout_epoch*.png every this many epochs."""
    K: int = 8
    """Context frames before open-loop prediction (plots and rssm-eval)."""
    dot_sigma: float = 2.0
    """Dot radius (Gaussian sigma, pixels). A small dot carries so little image energy that the
    RSSM predicts empty frames for hundreds of steps before it draws the dot (measured: sigma 1.5
    still empty after 320 steps at lr 1e-3; sigma 2 drawn from ~150 steps at lr 3e-3)."""
    beta: float = 1.0
    """Weight of the KL term."""
    kl_balance: float = 0.8
    """Share of the KL gradient that trains the prior (dynamics) vs the posterior."""
    free_bits: float = 1.0
    """Each step's KL (summed over latent dims) is clamped below at this many nats."""
    grad_clip: float = 100.0
    """Clip the global gradient norm."""
    baseline: bool = True
    """Also train the deterministic-only baseline on the same batches (used by rssm-eval)."""
    log_interval: int = 4
    """Log metrics every this many gradient steps."""

    RESUME_FLAGS = (*RunOptions.RESUME_FLAGS, "epochs", "viz_interval", "log_interval")
    # The spec spells `--no_occlusion`; tyro would call it `--no-use-occlusion`.
    FLAG_ALIASES = {"--no-occlusion": "--no-use-occlusion"}

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "epochs", "steps_per_epoch", "viz_interval", "K"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; expected a positive integer")
        if self.seq_len <= self.K:
            raise ValueError(
                f"K={self.K}; expected fewer context frames than seq_len={self.seq_len}"
            )
        if not self.lr > 0 or not self.beta >= 0 or not 0 <= self.kl_balance <= 1:
            raise ValueError("lr must be positive, beta >= 0 and kl_balance in [0, 1]")
        self.data_config()

    def data_config(self, seq_len: int | None = None) -> MovingDotConfig:
        return MovingDotConfig(
            grid_size=self.model.grid_size,
            seq_len=seq_len or self.seq_len,
            dot_sigma=self.dot_sigma,
            use_occlusion=self.use_occlusion,
        )


def data_generator(seed: int, split: str, index: int | str = 0) -> torch.Generator:
    """A generator for one slice of data: training epoch ``index``, or a held-out split."""
    digest = hashlib.sha256(f"moving-dot/{seed}/{split}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def load_world_model(output_dir: str | Path) -> tuple[RSSM, DeterministicModel | None]:
    """``output_dir/model.pt`` -> (RSSM, deterministic baseline or None)."""
    payload = load_checkpoint(Path(output_dir) / "model.pt")
    config = RSSMConfig(**payload["model_config"])
    rssm = RSSM(config)
    rssm.load_state_dict(payload["rssm"])
    deterministic = None
    if payload.get("deterministic") is not None:
        deterministic = DeterministicModel(config)
        deterministic.load_state_dict(payload["deterministic"])
    return rssm.eval(), deterministic.eval() if deterministic else None


def train_rssm(cfg: RSSMTrainConfig) -> dict[str, float]:
    """Train, log, plot, checkpoint; writes model.pt and the spec's plots to the run directory."""
    run = Run("rssm", cfg)
    run.check_budget(cfg.epochs * cfg.steps_per_epoch, "--epochs")
    device = run.device
    model = RSSM(cfg.model).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    baseline = DeterministicModel(cfg.model).to(device) if cfg.baseline else None
    baseline_opt = torch.optim.Adam(baseline.parameters(), lr=cfg.lr) if baseline else None
    if (ckpt := run.restore()) is not None:
        model.load_state_dict(ckpt["rssm"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if baseline:
            baseline.load_state_dict(ckpt["deterministic"])
            baseline_opt.load_state_dict(ckpt["baseline_optimizer"])
    distributed.broadcast_parameters(model, *([baseline] if baseline else []))
    data_cfg = cfg.data_config()
    view = generate_moving_dot_sequences(
        data_cfg, 4, data_generator(cfg.seed, "viz")
    )  # fixed sequences for the plots
    view = {k: v.to(device) for k, v in view.items()}
    total = cfg.epochs * cfg.steps_per_epoch
    bar = run.progress(total)
    step = run.start_step
    figures: dict[str, float] = {}
    for epoch in range(step // cfg.steps_per_epoch + 1, cfg.epochs + 1):
        # under torchrun each process draws its own batch_size sequences per step
        index = epoch if run.rank == 0 else f"{epoch}/rank{run.rank}"
        data = generate_moving_dot_sequences(
            data_cfg, cfg.batch_size * cfg.steps_per_epoch, data_generator(cfg.seed, "train", index)
        )
        for i in range(cfg.steps_per_epoch):
            batch = {
                k: v[i * cfg.batch_size : (i + 1) * cfg.batch_size].to(device)
                for k, v in data.items()
            }
            step += 1
            figures = _train_step(cfg, model, optimizer, batch)
            if baseline:
                figures |= _baseline_step(cfg, baseline, baseline_opt, batch)
            run.check_finite(step, **figures)
            if step % cfg.log_interval == 0 or step == total:
                figures = run.log(step, figures | {"epoch": epoch})
                bar.set_postfix(
                    recon=f"{figures['recon']:.2f}",
                    kl=f"{figures['kl']:.2f}",
                    vs_blank=f"{figures['vs_blank']:.2f}",
                )
            bar.update(1)
        if run.is_main and (epoch % cfg.viz_interval == 0 or epoch == cfg.epochs):
            plot_reconstruction(model, view, run.dir / f"recon_epoch{epoch}.png", epoch)
            plot_rollout(model, view, cfg.K, run.dir / f"rollout_epoch{epoch}.png", epoch)
        run.save(
            step,
            {
                "rssm": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "deterministic": baseline.state_dict() if baseline else None,
                "baseline_optimizer": baseline_opt.state_dict() if baseline else None,
            },
        )
    bar.close()
    summary = figures | {"steps": step, "epochs": cfg.epochs}
    if run.is_main:
        summary |= time_to_dot(run.dir / "metrics.jsonl")
    if not run.finish(summary):
        return summary
    save_checkpoint(
        run.dir / "model.pt",
        {
            "model_config": dataclasses.asdict(model.config),
            "rssm": model.state_dict(),
            "deterministic": baseline.state_dict() if baseline else None,
        },
    )
    plot_loss_curves(run.dir / "metrics.jsonl", run.dir / "loss_curves.png")
    plot_rollout(model, view, cfg.K, run.dir / "eval_rollout.png", cfg.epochs, rows=4)
    print(f"rssm: recon {figures.get('recon', float('nan')):.3f}; outputs in {run.dir}")
    return summary


def vs_blank(recon: float, obs: torch.Tensor) -> float:
    """A reconstruction loss as a share of the empty frame's on the same frames ``obs``."""
    return recon / max(float(obs.square().sum((-3, -2, -1)).mean()), 1e-12)


def time_to_dot(metrics_path: Path) -> dict[str, int | None]:
    """The first logged step at which each model's ``vs_blank`` fell below :data:`DOT_DRAWN`
    (None: never), read from ``metrics.jsonl`` (so a resumed run counts from its start)."""
    records = read_metrics(metrics_path)
    result: dict[str, int | None] = {}
    for prefix in ("", "deterministic_"):
        key = f"{prefix}vs_blank"
        drawn = [r["step"] for r in records if r.get(key) is not None and r[key] < DOT_DRAWN]
        result[f"{prefix}time_to_dot"] = min(drawn, default=None)
    return result


def _train_step(cfg: RSSMTrainConfig, model: RSSM, optimizer, batch) -> dict[str, float]:
    out = model(batch["obs"], batch["actions"], is_first=batch["is_first"])
    losses = rssm_loss(model, batch["obs"], out, cfg.beta, cfg.kl_balance, cfg.free_bits)
    grad_norm = distributed.optimizer_step(
        optimizer, losses["loss"], list(model.parameters()), cfg.grad_clip
    )
    figures = {k: float(v.detach()) for k, v in losses.items()} | {"grad_norm": grad_norm}
    return figures | {"vs_blank": vs_blank(figures["recon"], batch["obs"])}


def _baseline_step(cfg: RSSMTrainConfig, model: DeterministicModel, optimizer, batch):
    recon = model(batch["obs"], batch["actions"])["recon"]
    loss = (recon - batch["obs"]).square().sum((-3, -2, -1)).mean()
    distributed.optimizer_step(optimizer, loss, list(model.parameters()), cfg.grad_clip)
    loss = float(loss.detach())
    return {"deterministic_recon": loss, "deterministic_vs_blank": vs_blank(loss, batch["obs"])}


# -- plots ---------------------------------------------------------------------------------------
def _frames_figure(rows: list[tuple[str, torch.Tensor]], title: str, path: Path, labels=None):
    """One row of grayscale frames per (name, (N, 1, H, W)) entry."""
    cols = rows[0][1].shape[0]
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.1 * cols, 1.2 * len(rows)), squeeze=False)
    for r, (name, frames) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(frames[c, 0].clamp(0, 1).cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            if r == 0 and labels is not None:
                ax.set_title(labels[c], fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


@torch.no_grad()
def plot_reconstruction(model: RSSM, view: dict, path: Path, epoch: int, frames: int = 12) -> None:
    """Input frames against their posterior reconstructions (first sequence of ``view``)."""
    model.eval()
    out = model(view["obs"][:1], view["actions"][:1])
    model.train()
    rows = [("input", view["obs"][0, :frames]), ("recon", out["recon"][0, :frames])]
    _frames_figure(rows, f"reconstruction, epoch {epoch}", path, [f"t={t}" for t in range(frames)])


@torch.no_grad()
def plot_rollout(model: RSSM, view: dict, K: int, path: Path, epoch: int, rows: int = 1) -> None:
    """True frames against the open-loop prediction after K context frames."""
    model.eval()
    horizon = min(12, view["obs"].shape[1] - K)
    pred = model.open_loop_rollout(
        view["obs"], view["actions"], view["actions"][:, K : K + horizon], K
    )
    model.train()
    pairs = []
    for i in range(min(rows, pred.shape[0])):
        pairs += [(f"true {i}", view["obs"][i, K : K + horizon]), (f"open loop {i}", pred[i])]
    labels = [f"+{h + 1}" for h in range(horizon)]
    _frames_figure(pairs, f"open-loop rollout after K={K} frames, epoch {epoch}", path, labels)


def plot_loss_curves(metrics_path: Path, path: Path) -> None:
    """Reconstruction, KL, the baseline's reconstruction and both models' image error as a share
    of the empty frame's against step."""
    records = read_metrics(metrics_path)
    keys = [
        k
        for k in ("loss", "recon", "kl", "deterministic_recon", "vs_blank")
        if any(k in r for r in records)
    ]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        lines = [key, "deterministic_vs_blank"] if key == "vs_blank" else [key]
        for line in lines:
            points = [(r["step"], r[line]) for r in records if r.get(line) is not None]
            if points:
                label = "rssm" if line == key else "deterministic"
                ax.plot(*zip(*points, strict=True), label=label)
        if key == "vs_blank":
            ax.axhline(DOT_DRAWN, color="grey", linestyle="--", linewidth=0.8)
            ax.legend(fontsize=7)
            key = "image error / empty frame's"
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.set_yscale("log" if key != "kl" else "linear")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
