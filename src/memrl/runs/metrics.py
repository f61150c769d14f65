"""One metrics logger for every trainer: ``metrics.jsonl`` and TensorBoard events, plus plots."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class MetricsLogger:
    """Appends one JSON object per log step to ``metrics.jsonl`` and the same scalars to
    TensorBoard. ``resume_step`` drops records written after that step by a killed run, so a
    resumed run's logs read as if it had never stopped."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")
        purge = None if resume_step is None else resume_step + 1
        self._writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge)
        self._start = time.time()

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        record = {"step": int(step), "time": round(time.time() - self._start, 3)}
        for key, value in metrics.items():
            value = float(value)
            record[key] = value
            self._writer.add_scalar(key, value, int(step))
        self._file.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        self._writer.close()


def strict_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON's ``null``): the
    ``NaN`` / ``Infinity`` that Python's json writes by default are not JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_json(path: str | Path, value: Any) -> Path:
    """Write ``value`` as indented strict JSON (see :func:`strict_json`), atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(strict_json(value), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (a torn last line from a kill is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_metrics(
    metrics_path: str | Path, out_path: str | Path, keys: Iterable[str] | None = None
) -> Path | None:
    """One panel per metric against step, saved as a PNG; returns None if nothing to plot."""
    records = read_metrics(metrics_path)
    if keys is None:
        keys = sorted({k for r in records for k, v in r.items() if isinstance(v, float)} - {"time"})
    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
        return None
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, lw=1.5)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
