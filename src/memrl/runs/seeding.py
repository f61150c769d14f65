"""Seeding and device selection shared by every trainer."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


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


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda, else mps, else cpu; an explicit device that is missing is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch.cuda.is_available() is False")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError(
            "device 'mps' was requested but torch.backends.mps.is_available() is False"
        )
    if name not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r}; expected one of auto, cpu, cuda, mps")
    return torch.device(name)
