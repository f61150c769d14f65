"""The run directory every trainer writes.

``runs/<command>-<YYYYmmdd-HHMMSS>/`` (or ``--output-dir``) holds ``config.yaml`` (written once,
when the run starts), ``metrics.jsonl``, TensorBoard events, ``checkpoints/last.pt`` with the
one before it as ``checkpoints/previous.pt`` (plus periodic ones), ``plots/`` and, at the end,
``summary.json``. ``--resume RUN_DIR`` reopens it and hands the trainer its last checkpoint.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from memrl.runs import distributed
from memrl.runs.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from memrl.runs.config import ConfigError, RunOptions, save_config
from memrl.runs.metrics import MetricsLogger, plot_metrics, write_json
from memrl.runs.seeding import rank_seed, resolve_device, seed_everything


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
        seed_everything(rank_seed(config.seed, self.rank), config.deterministic)
        self._checkpoint = None
        if config.resume:
            self._checkpoint = distributed.broadcast_object(
                self._load_latest() if self.is_main else None
            )
        self.start_step = int(self._checkpoint["step"]) if self._checkpoint else 0
        self.metrics = (
            MetricsLogger(self.dir, self.start_step if self._checkpoint else None)
            if self.is_main
            else None
        )

    def _open_dir(self) -> str | None:
        """Rank 0: choose, check and create the run directory (``self.dir``); an error or None.
        A directory belongs to the run that created it: a new run never writes into one that
        holds another run's files, and a resume never rewrites the run's ``config.yaml``."""
        config = self.config
        if config.resume is not None:
            self.dir = Path(config.resume)
            if (
                not self.last_checkpoint_path.is_file()
                and not self.previous_checkpoint_path.is_file()
            ):
                return f"--resume {self.dir}: no checkpoint at {self.last_checkpoint_path}"
            for torn in self.checkpoint_dir.glob(".*.tmp"):  # a write a kill interrupted
                torn.unlink()
            return None
        self.dir = Path(config.output_dir or _fresh_run_dir(self.command))
        if self.dir.exists() and not self.dir.is_dir():
            return f"--output-dir {self.dir} is a file; expected a directory (new or empty)"
        if self.last_checkpoint_path.exists() or self.previous_checkpoint_path.exists():
            return (
                f"{self.dir} already holds a run; pass --resume {self.dir} to continue it "
                "or choose another --output-dir"
            )
        if (self.dir / "config.yaml").exists() or (self.dir / "metrics.jsonl").exists():
            return (
                f"{self.dir} holds a run that stopped before its first checkpoint; delete it or "
                "choose another --output-dir"
            )
        try:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            self.plot_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.dir / "config.yaml")
        except OSError as err:
            return f"--output-dir {self.dir}: cannot write there ({err.strerror or err})"
        return None

    def _load_latest(self) -> dict[str, Any]:
        """The newest readable checkpoint: ``last.pt``, or with a warning ``previous.pt`` when
        ``last.pt`` is missing or corrupt (a kill between the two renames of :meth:`save`)."""
        try:
            return load_checkpoint(self.last_checkpoint_path)
        except CheckpointError as err:
            if not self.previous_checkpoint_path.is_file():
                raise
            warnings.warn(f"{err}; resuming from {self.previous_checkpoint_path}", stacklevel=2)
            return load_checkpoint(self.previous_checkpoint_path)

    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def plot_dir(self) -> Path:
        return self.dir / "plots"

    @property
    def last_checkpoint_path(self) -> Path:
        return self.checkpoint_dir / "last.pt"

    @property
    def previous_checkpoint_path(self) -> Path:
        return self.checkpoint_dir / "previous.pt"

    def check_budget(self, total: int, flag: str) -> None:
        """Refuse (:class:`ConfigError`) a resume whose budget ``total`` (in this run's steps,
        set by ``flag``) is already spent, before any work starts."""
        if self._checkpoint is not None and total <= self.start_step:
            raise ConfigError(
                f"--resume {self.dir}: the run is already at step {self.start_step} and "
                f"{flag} gives {total} in all, so there is nothing to do; pass a larger {flag}"
            )

    def restore(self) -> dict[str, Any] | None:
        """The last checkpoint's payload when resuming (global RNG states already restored:
        each rank's own when the world size is unchanged), else None."""
        if self._checkpoint is None:
            return None
        states = self._checkpoint.get("rng_ranks") or [self._checkpoint["rng"]]
        if len(states) == self.world_size:
            set_rng_state(states[self.rank])
        else:  # resumed with another number of processes: fresh, distinct streams
            seed_everything(rank_seed(self.config.seed, self.rank, self.start_step))
        return self._checkpoint

    def save(self, step: int, payload: dict[str, Any], keep: bool = False) -> Path:
        """Atomically write ``checkpoints/last.pt`` (and ``step_<step>.pt`` if ``keep``), the
        one it replaces kept as ``previous.pt``; every rank calls it, rank 0 writes (with every
        rank's RNG state)."""
        states = distributed.gather_objects(rng_state())
        path = self.last_checkpoint_path
        if not self.is_main:
            return path
        payload = {**payload, "step": int(step), "rng": states[0], "command": self.command}
        if len(states) > 1:
            payload["rng_ranks"] = states
        save_checkpoint(path, payload, previous=self.previous_checkpoint_path)
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

    def generator(self, step: int = 0) -> torch.Generator:
        """A CPU generator for this rank's own draws (minibatch order, data), seeded by
        :func:`~memrl.runs.seeding.rank_seed` at ``step``: at 0 for a fresh run, at the resumed
        step on a rank whose generator the checkpoint does not hold."""
        return torch.Generator().manual_seed(rank_seed(self.config.seed, self.rank, step))

    def finish(self, summary: dict[str, Any]) -> bool:
        """End the run: close the logs, draw ``plots/metrics.png`` and write ``summary.json``
        (rank 0). Returns whether this is rank 0, the process that writes the run's other
        outputs: ``if not run.finish(summary): return summary``."""
        if self.metrics is None:
            return False
        self.metrics.close()
        plot_metrics(self.dir / "metrics.jsonl", self.plot_dir / "metrics.png")
        write_json(self.dir / "summary.json", summary)
        return True


def _fresh_run_dir(command: str) -> Path:
    """``runs/<command>-<YYYYmmdd-HHMMSS>``, with a suffix if two runs start in one second."""
    base = Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


def check_writable_file(path: Path, flag: str) -> None:
    """Make sure a file can be written at ``path`` (its folder created if needed) before any
    work starts; a :class:`ConfigError` naming ``flag`` and the reason otherwise."""
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; expected a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"):
            pass
    except OSError as err:
        raise ConfigError(f"{flag} {path}: cannot write there ({err.strerror or err})") from None
