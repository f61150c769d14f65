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
from memrl.runs.config import ConfigError, RunOptions, changed_flags, load_config, save_config
from memrl.runs.metrics import MetricsLogger, plot_metrics, read_metrics, write_json
from memrl.runs.rundir import NonFiniteLossError, Run, check_writable_file
from memrl.runs.seeding import rank_seed, resolve_device, seed_everything

__all__ = [
    "CheckpointError",
    "ConfigError",
    "MetricsLogger",
    "NonFiniteLossError",
    "Run",
    "RunOptions",
    "changed_flags",
    "check_writable_file",
    "load_checkpoint",
    "load_config",
    "plot_metrics",
    "rank_seed",
    "read_metrics",
    "resolve_device",
    "rng_state",
    "save_checkpoint",
    "save_config",
    "seed_everything",
    "distributed",
    "set_rng_state",
    "write_json",
]
