"""Checkpoints that survive a kill: atomic writes, a checksum, and a clear error on a bad file.

File layout: one header line ``memrl-checkpoint v1 <sha256 of the payload>`` followed by a
``torch.save`` payload. The file is written to a temporary name in the same directory, flushed
and fsynced, then renamed into place, so a process killed mid-write leaves the previous file
intact; the checksum catches truncation and bit rot.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

_MAGIC = b"memrl-checkpoint v1 "


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or not a memrl checkpoint."""


def save_checkpoint(
    path: str | os.PathLike, payload: dict[str, Any], previous: str | os.PathLike | None = None
) -> Path:
    """Write ``payload`` (state dicts, counters, RNG states, ...) to ``path`` atomically. With
    ``previous``, the file ``path`` held is kept there: renamed only once the new one is fully
    written, so at every moment one of the two names holds a complete checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest().encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + digest + b"\n")
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; raise :class:`CheckpointError`
    naming the file if it is missing, truncated or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    raw = path.read_bytes()
    header, _, data = raw.partition(b"\n")
    if not header.startswith(_MAGIC) or len(header) != len(_MAGIC) + 64:
        raise CheckpointError(f"checkpoint {path} is not a memrl checkpoint (bad header)")
    if hashlib.sha256(data).hexdigest().encode() != header[len(_MAGIC) :]:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({len(raw)} bytes; checksum mismatch)"
        )
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
    except Exception as err:  # a payload that passed the checksum but does not unpickle
        raise CheckpointError(f"checkpoint {path} could not be read: {err}") from err


def rng_state() -> dict[str, Any]:
    """The global RNG states of python, numpy and torch (CPU and CUDA)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
