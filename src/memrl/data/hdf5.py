"""Episodes in HDF5, in robomimic's layout.

::

    data/                      attrs: total (steps over all demos), num_demos, and the caller's
      demo_0/                  attrs: num_samples (N), and the episode's own attrs
        obs/image              (N, ...) one dataset per observation key
        obs/state
        actions                (N, action_dim)
        rewards, dones, ...    (N, ...) any other per-step arrays
      demo_1/ ...

An episode is a dict of per-step arrays sharing their first dimension N, where a nested dict
(``obs``) becomes a group, plus an optional ``"attrs"`` dict stored as the demo's attributes.
Attribute values are numbers, strings, bools or arrays; dicts and lists of strings are stored as
JSON strings and read back as such.

:func:`write_demos` writes atomically (a temporary file in the same directory, then a rename),
so a killed writer never leaves a half-written dataset at ``path``. :func:`read_demos` checks
the layout and raises :class:`DatasetError` naming the file and what is wrong.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from memrl.runs.config import ConfigError

REQUIRED_KEYS = ("obs", "actions")
_DEMO_NAME = re.compile(r"demo_(\d+)")


class DatasetError(ConfigError):
    """A dataset file is missing, not HDF5, or not in the expected layout. (A ConfigError, so
    that ``memrl`` commands report it as one line, not a traceback.)"""


def write_demos(
    path: str | os.PathLike,
    episodes: Iterable[Mapping[str, Any]],
    attrs: Mapping[str, Any] | None = None,
    compression: str | None = "gzip",
) -> Path:
    """Write ``episodes`` as ``data/demo_<i>`` (i = 0, 1, ...) and ``attrs`` on ``data``.

    Arrays of rank >= 3 (images) are compressed with ``compression`` (None: not at all).
    Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique name beside the target (same file system, so the rename is atomic); created by
    # h5py with the usual permissions
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            data = f.create_group("data")
            total = 0
            for index, episode in enumerate(episodes):
                name = f"demo_{index}"
                length = _episode_length(episode, name)
                demo = data.create_group(name)
                _write_arrays(demo, episode, compression)
                _write_attrs(demo, dict(episode.get("attrs", {})) | {"num_samples": length})
                total += length
            num_demos = len(data)
            _write_attrs(data, dict(attrs or {}) | {"total": total, "num_demos": num_demos})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_demos(
    path: str | os.PathLike, required: Sequence[str] = REQUIRED_KEYS
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """All episodes of ``path`` in demo order (demo_0, demo_1, ..., demo_10, ...) as dicts of
    numpy arrays (``obs`` a dict) with their ``attrs``, and the attributes of ``data``.

    Raises :class:`DatasetError` for a missing file, a file that is not HDF5, a file without
    the ``data`` group, a demo lacking one of ``required`` or a key that ``demo_0`` has, and
    arrays of unequal lengths within a demo.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset {path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DatasetError(f"dataset {path} is not a readable HDF5 file ({err})") from None
    try:
        with f:
            return _read_data(f, path, required)
    except (OSError, KeyError, RuntimeError) as err:  # h5py on a damaged file
        raise DatasetError(f"dataset {path} could not be read: {err}") from None


def _read_data(
    f: h5py.File, path: Path, required: Sequence[str]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    if not isinstance(f.get("data"), h5py.Group):
        raise DatasetError(
            f"dataset {path} has no 'data' group (found: {_names(f) or 'nothing'}); "
            "expected robomimic's layout data/demo_<i>/{obs,actions,...}"
        )
    data = f["data"]
    names = sorted(
        (name for name in data if _DEMO_NAME.fullmatch(name)),
        key=lambda name: int(name.split("_")[1]),
    )
    episodes: list[dict[str, Any]] = []
    first_keys: set[str] = set()
    for name in names:
        where = f"dataset {path}: data/{name}"
        group = data[name]
        if not isinstance(group, h5py.Group):
            raise DatasetError(f"{where} is not a group")
        episode = _read_arrays(group)
        keys = {key for key, _ in _flatten(episode)}
        missing = [key for key in required if key not in episode and key not in keys]
        missing += sorted(first_keys - keys - set(missing))
        if missing:
            raise DatasetError(
                f"{where} lacks {', '.join(map(repr, missing))} (it has: {', '.join(sorted(keys))})"
            )
        first_keys = first_keys or keys
        length = _episode_length(episode, where, DatasetError)
        episode["attrs"] = _read_attrs(group)
        if episode["attrs"].get("num_samples", length) != length:
            raise DatasetError(
                f"{where} has num_samples={episode['attrs']['num_samples']} but {length} steps"
            )
        episodes.append(episode)
    return episodes, _read_attrs(data)


# -- helpers ------------------------------------------------------------------------------------
def _episode_length(
    episode: Mapping[str, Any], where: str, error: type[Exception] = ValueError
) -> int:
    """The common first dimension of all arrays of ``episode``; raises ``error`` otherwise."""
    lengths = {key: np.shape(value)[:1] for key, value in _flatten(episode)}
    if not lengths:
        raise error(f"{where}: an episode needs at least one array")
    if any(not shape for shape in lengths.values()):
        scalars = [key for key, shape in lengths.items() if not shape]
        raise error(f"{where}: {', '.join(scalars)} must be arrays of one row per step")
    if len({shape[0] for shape in lengths.values()}) > 1:
        listed = ", ".join(f"{key} {shape[0]}" for key, shape in lengths.items())
        raise error(f"{where}: arrays of different lengths ({listed}); expected one per step")
    return next(iter(lengths.values()))[0]


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in tree.items():
        if key == "attrs" and not prefix:
            continue
        if isinstance(value, Mapping):
            items += _flatten(value, f"{prefix}{key}/")
        else:
            items.append((prefix + key, value))
    return items


def _write_arrays(group: h5py.Group, episode: Mapping[str, Any], compression: str | None) -> None:
    for key, value in _flatten(episode):
        array = np.asarray(value)
        options = {"compression": compression} if compression and array.ndim >= 3 else {}
        group.create_dataset(key, data=array, **options)


def _read_arrays(group: h5py.Group) -> dict[str, Any]:
    return {
        key: _read_arrays(item) if isinstance(item, h5py.Group) else item[()]
        for key, item in group.items()
    }


def _write_attrs(obj: h5py.Group, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        if isinstance(value, Mapping) or (
            isinstance(value, (list, tuple)) and any(isinstance(v, str) for v in value)
        ):
            value = json.dumps(value)
        elif isinstance(value, Path):
            value = str(value)
        obj.attrs[key] = value


def _read_attrs(obj: h5py.Group) -> dict[str, Any]:
    attrs = {}
    for key, value in obj.attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, str) and value[:1] in ("{", "["):
            with contextlib.suppress(ValueError):  # written by _write_attrs as JSON
                value = json.loads(value)
        elif isinstance(value, np.generic):
            value = value.item()
        attrs[key] = value
    return attrs


def _names(group: h5py.Group) -> str:
    return ", ".join(sorted(group))
