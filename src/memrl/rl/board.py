"""``memrl board``: rank memory cores on POPGym, the way the POPGym paper ranks its baselines.

Every (env, core, seed) cell is an ordinary ``memrl ppo`` run directory,
``OUTPUT_DIR/<env>/<core>-seed<k>``. A finished cell (its ``summary.json``) is read, not rerun;
a killed one resumes from its last checkpoint; so a board that takes several sittings is the
same command run again. The figure of merit is POPGym's MMER: the maximum over training of the
mean episode return (POPGym scales every env's return to [-1, 1]).

Writes ``board.csv`` (one row per finished cell), ``board.md`` (MMER mean ± std per env and
core, each core's mean over envs and its rank), ``board.json`` (ranks and means) and
``board.png`` (a heatmap of the means).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import statistics
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from memrl.cores import VectorCoreName
from memrl.rl.config import PPOConfig
from memrl.rl.ppo import train_ppo
from memrl.runs import ConfigError, load_config, write_json
from memrl.runs.metrics import plt

DEFAULT_ENVS = (
    "popgym/RepeatPreviousEasy",  # recall
    "popgym/RepeatFirstEasy",  # recall
    "popgym/CountRecallEasy",  # counting
    "popgym/PositionOnlyCartPoleEasy",  # control
    "popgym/NoisyPositionOnlyPendulumEasy",  # control, noisy
    "popgym/HigherLowerEasy",  # game
    "popgym/MineSweeperEasy",  # game
)
VECTOR_CORES: tuple[str, ...] = get_args(VectorCoreName)


@dataclasses.dataclass
class BoardConfig:
    """Rank memory cores on POPGym: one `memrl ppo` run per (env, core, seed); a rerun skips
    the finished cells and resumes a killed one."""

    envs: tuple[str, ...] = DEFAULT_ENVS
    """Environments (any id `memrl ppo --env` takes)."""
    cores: tuple[VectorCoreName, ...] = VECTOR_CORES
    """Memory cores to rank."""
    seeds: int = 3
    """Training seeds per cell (0, 1, ...)."""
    total_steps: int = 500_000
    """Environment steps per run."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "cpu"
    """Where each run trains (small policies run fastest on the CPU)."""
    output_dir: Path = Path("runs/board")
    """Where the run directories and the board go."""

    def __post_init__(self) -> None:
        if not self.envs or not self.cores:
            raise ValueError(f"envs={self.envs}, cores={self.cores}; expected at least one of each")
        if self.seeds < 1 or self.total_steps < 1:
            raise ValueError(
                f"seeds={self.seeds}, total_steps={self.total_steps}; expected positive integers"
            )


def cell_dir(cfg: BoardConfig, env: str, core: str, seed: int) -> Path:
    return cfg.output_dir / env.replace("/", "_") / f"{core}-seed{seed}"


def run_cell(cfg: BoardConfig, env: str, core: str, seed: int) -> dict:
    """The cell's summary: read when finished, else trained (resumed from its checkpoint when a
    run was killed). A finished run of other settings is an error, not silently reused."""
    run_dir = cell_dir(cfg, env, core, seed)
    wanted = PPOConfig(
        env=env, core=core, seed=seed, total_steps=cfg.total_steps, device=cfg.device,
        output_dir=run_dir,
    )  # fmt: skip
    if (run_dir / "config.yaml").exists():
        saved = load_config(PPOConfig, run_dir / "config.yaml")
        if (saved.env, saved.core, saved.seed, saved.total_steps) != (
            env, core, seed, cfg.total_steps,
        ):  # fmt: skip
            raise ConfigError(
                f"{run_dir} holds a run of env={saved.env}, core={saved.core}, seed="
                f"{saved.seed}, total_steps={saved.total_steps}; expected {env}, {core}, "
                f"{seed}, {cfg.total_steps} (another --output-dir, or remove it)"
            )
    if (run_dir / "summary.json").exists():
        return load_summary(run_dir)
    if (run_dir / "checkpoints" / "last.pt").exists():
        train_ppo(dataclasses.replace(wanted, output_dir=None, resume=run_dir))
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # killed before its first checkpoint
        train_ppo(wanted)
    return load_summary(run_dir)


def load_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def run_board(cfg: BoardConfig) -> list[dict]:
    """Run (or read) every cell, then write board.csv, board.md and board.png."""
    rows = []
    for env in cfg.envs:  # env by env: each env's column of the board fills in turn
        for seed in range(cfg.seeds):
            for core in cfg.cores:
                summary = run_cell(cfg, env, core, seed)
                rows.append({
                    "env": env, "core": core, "seed": seed, "mmer": summary["mmer"],
                    "final_eval_return": summary.get("final_eval_return"),
                    "sps": summary["sps"], "wall_seconds": summary["wall_seconds"],
                })  # fmt: skip
    write_board(cfg, rows)
    return rows


def write_board(cfg: BoardConfig, rows: list[dict]) -> None:
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    with (cfg.output_dir / "board.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    envs, cores = list(cfg.envs), list(cfg.cores)
    cell = {
        (e, c): [r["mmer"] for r in rows if r["env"] == e and r["core"] == c]
        for e in envs
        for c in cores
    }
    means = np.array([[statistics.mean(cell[e, c]) for e in envs] for c in cores])  # (C, E)
    overall = means.mean(1)
    rank = {c: 1 + int((overall > overall[i]).sum()) for i, c in enumerate(cores)}
    short = [e.removeprefix("popgym/") for e in envs]
    lines = [
        f"MMER (max over training of the mean episode return), mean ± std over {cfg.seeds} "
        f"seeds, {cfg.total_steps:,} steps per run",
        "",
        "| rank | core | mean MMER | " + " | ".join(short) + " |",
        "|---|---|---|" + "---|" * len(envs),
    ]
    for i in np.argsort(-overall, kind="stable"):
        c = cores[i]
        spread = [
            f"{statistics.mean(cell[e, c]):.3f} ± "
            f"{statistics.stdev(cell[e, c]) if len(cell[e, c]) > 1 else 0.0:.3f}"
            for e in envs
        ]
        lines.append(f"| {rank[c]} | {c} | {overall[i]:.3f} | " + " | ".join(spread) + " |")
    (cfg.output_dir / "board.md").write_text("\n".join(lines) + "\n")
    write_json(
        cfg.output_dir / "board.json",
        {"rank": rank, "mean_mmer": dict(zip(cores, overall.tolist(), strict=True))},
    )
    fig, ax = plt.subplots(figsize=(1.2 * len(envs) + 2.5, 0.45 * len(cores) + 1.5))
    image = ax.imshow(means, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(envs)), short, rotation=30, ha="right")
    ax.set_yticks(range(len(cores)), cores)
    for (i, j), value in np.ndenumerate(means):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(image, ax=ax, label="mean MMER")
    ax.set_title("memrl board: POPGym MMER by core")
    fig.tight_layout()
    fig.savefig(cfg.output_dir / "board.png", dpi=110)
    plt.close(fig)
    print("\n".join(lines))
