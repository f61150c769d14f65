"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from memrl.cli import main


@pytest.fixture(scope="session")
def push_demos(tmp_path_factory) -> Callable[[int], Path]:
    """``push_demos(n)``: an HDF5 of n expert push demonstrations (seeds 0..n-1), collected
    once per session."""
    made: dict[int, Path] = {}

    def collect(episodes: int) -> Path:
        if episodes not in made:
            path = tmp_path_factory.mktemp("demos") / f"push{episodes}.hdf5"
            args = ["push-collect", "--episodes", str(episodes), "--output", str(path)]
            assert main([*args, "--workers", "2" if episodes > 6 else "1"]) == 0
            made[episodes] = path
        return made[episodes]

    return collect
