"""Seeding and device selection shared by every trainer."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from memrl.runs.config import ConfigError


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices); with ``deterministic`` also ask torch for
    deterministic kernels, so a rerun or a resume on CPU is bit-identical."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)  # off again for a run that did not ask
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of one rank's random streams from ``step`` on: ``seed + rank + 7919 * step``.
    Ranks get distinct streams, and a run resumed at ``step`` (with another number of processes,
    or on a rank whose generator was not saved) draws fresh ones rather than replaying step 0's;
    7919 is a prime larger than any rank count, so no two (rank, step) pairs collide early."""
    return seed + rank + 7919 * step


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda, else mps, else cpu; an explicit device that is missing is a
    :class:`~memrl.runs.ConfigError` naming it (the CLI reports it with exit status 2)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {name}; expected one of auto, cpu, cuda, mps")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: this machine has no CUDA device torch can use")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: this machine has no MPS device torch can use")
    return torch.device(name)
