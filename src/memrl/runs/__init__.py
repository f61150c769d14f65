"""What every trainer shares: run directory, config save/load, metrics, progress, checkpoints,
and data-parallel training under torchrun (``distributed``)."""

from memrl.runs import distributed
from memrl.runs.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from memrl.runs.config import ConfigError, RunOptions, load_config, save_config
from memrl.runs.metrics import MetricsLogger, plot_metrics, read_metrics
from memrl.runs.rundir import NonFiniteLossError, Run
from memrl.runs.seeding import resolve_device, seed_everything

__all__ = [
    "CheckpointError",
    "ConfigError",
    "MetricsLogger",
    "NonFiniteLossError",
    "Run",
    "RunOptions",
    "load_checkpoint",
    "load_config",
    "plot_metrics",
    "read_metrics",
    "resolve_device",
    "rng_state",
    "save_checkpoint",
    "save_config",
    "seed_everything",
    "distributed",
    "set_rng_state",
]
