"""The run directory every trainer writes (ARCHITECTURE.md, "Run directories").

``runs/<command>-<YYYYmmdd-HHMMSS>/`` (or ``--output-dir``) holds ``config.yaml``,
``metrics.jsonl``, TensorBoard events, ``checkpoints/last.pt`` (plus periodic ones) and
``plots/``. ``--resume RUN_DIR`` reopens it and hands the trainer its last checkpoint.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from memrl.runs import distributed
from memrl.runs.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from memrl.runs.config import ConfigError, RunOptions, save_config
from memrl.runs.metrics import MetricsLogger, plot_metrics
from memrl.runs.seeding import resolve_device, seed_everything


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


class Run:
    """Directory, config, device, seeding, metrics, progress and checkpoints of one run.

    A trainer builds its state, then calls :meth:`restore` to get the last checkpoint when
    resuming; it logs with :meth:`log`, saves with :meth:`save` and ends with :meth:`finish`.
    """

    def __init__(self, command: str, config: RunOptions) -> None:
        self.command = command
        self.config = config
        # Under torchrun: join the process group; rank 0 owns the directory (runs.distributed).
        self.device = distributed.init(resolve_device(config.device))
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        self.dir: Path | None = None
        error = self._open_dir() if self.is_main else None
        self.dir, error = distributed.broadcast_object((self.dir, error))
        if error:
            raise ConfigError(error)
        # Denormal floats (tiny gradients, Adam's second moments late in training) run up to
        # 50x slower on x86 CPUs; measured: a PPO update went from 0.14 s to 10 s. Flush them.
        torch.set_flush_denormal(True)
        seed_everything(config.seed + self.rank, config.deterministic)
        self._checkpoint = None
        if config.resume:
            self._checkpoint = distributed.broadcast_object(
                load_checkpoint(self.last_checkpoint_path) if self.is_main else None
            )
        self.start_step = int(self._checkpoint["step"]) if self._checkpoint else 0
        self.metrics = (
            MetricsLogger(self.dir, self.start_step if self._checkpoint else None)
            if self.is_main
            else None
        )

    def _open_dir(self) -> str | None:
        """Rank 0: choose, check and create the run directory (``self.dir``); an error or None."""
        config = self.config
        if config.resume is not None:
            self.dir = Path(config.resume)
            if not self.last_checkpoint_path.is_file():
                return f"--resume {self.dir}: no checkpoint at {self.last_checkpoint_path}"
        else:
            self.dir = Path(config.output_dir or _fresh_run_dir(self.command))
            if self.last_checkpoint_path.exists():
                return (
                    f"{self.dir} already holds a run; pass --resume {self.dir} to continue it "
                    "or choose another --output-dir"
                )
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.plot_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, self.dir / "config.yaml")
        return None

    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def plot_dir(self) -> Path:
        return self.dir / "plots"

    @property
    def last_checkpoint_path(self) -> Path:
        return self.checkpoint_dir / "last.pt"

    def restore(self) -> dict[str, Any] | None:
        """The last checkpoint's payload when resuming (global RNG states already restored:
        each rank's own when the world size is unchanged), else None."""
        if self._checkpoint is None:
            return None
        states = self._checkpoint.get("rng_ranks") or [self._checkpoint["rng"]]
        if len(states) == self.world_size:
            set_rng_state(states[self.rank])
        else:  # resumed with another number of processes: fresh, distinct streams
            seed_everything(self.config.seed + self.rank + 7919 * self.start_step)
        return self._checkpoint

    def save(self, step: int, payload: dict[str, Any], keep: bool = False) -> Path:
        """Atomically write ``checkpoints/last.pt`` (and ``step_<step>.pt`` if ``keep``); every
        rank calls it, rank 0 writes (with every rank's RNG state)."""
        states = distributed.gather_objects(rng_state())
        path = self.last_checkpoint_path
        if not self.is_main:
            return path
        payload = {**payload, "step": int(step), "rng": states[0], "command": self.command}
        if len(states) > 1:
            payload["rng_ranks"] = states
        save_checkpoint(path, payload)
        if keep:
            save_checkpoint(self.checkpoint_dir / f"step_{step:09d}.pt", payload)
        return path

    def log(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Average ``metrics`` over ranks, write them (rank 0) and return the averages; every
        rank calls it at the same steps."""
        metrics = distributed.mean_over_ranks(metrics)
        if self.metrics is not None:
            self.metrics.log(step, metrics)
        return metrics

    def check_finite(self, step: int, **losses: torch.Tensor | float) -> None:
        """Stop with a clear message on a NaN/inf loss, before anything is saved."""
        for name, value in losses.items():
            value = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"{name} became {value} at step {step}; training stopped. The last good "
                    f"checkpoint is {self.last_checkpoint_path} (resume with --resume {self.dir}, "
                    "perhaps with a lower learning rate)"
                )

    def progress(self, total: int, desc: str | None = None) -> tqdm:
        """A tqdm bar from the resumed step to ``total``; show key figures with set_postfix."""
        return tqdm(
            total=total,
            initial=self.start_step,
            desc=desc or self.command,
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 10.0,
            **({} if self.is_main else {"disable": True}),  # a passed value beats TQDM_DISABLE
        )

    def finish(self) -> None:
        """Close the logs and draw ``plots/metrics.png`` (rank 0)."""
        if self.metrics is None:
            return
        self.metrics.close()
        plot_metrics(self.dir / "metrics.jsonl", self.plot_dir / "metrics.png")


def _fresh_run_dir(command: str) -> Path:
    """``runs/<command>-<YYYYmmdd-HHMMSS>``, with a suffix if two runs start in one second."""
    base = Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path
