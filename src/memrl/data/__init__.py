"""Episode storage: HDF5 datasets of demonstrations in robomimic's layout
(``data/demo_<i>/{obs/<key>, actions, rewards, dones, ...}``), and the same episodes in memory,
cut into time-major batches; shared by the imitation and spatial-memory pipelines.

>>> write_demos("demos.hdf5", episodes, attrs={"env": "push"})
>>> episodes, attrs = read_demos("demos.hdf5")
>>> split = load_episodes("demos.hdf5", val_fraction=0.1)  # EpisodeStore train and val
"""

from memrl.data.episodes import (
    STORE_KEYS,
    Batch,
    EpisodeSplit,
    EpisodeStore,
    Statistics,
    load_episodes,
)
from memrl.data.hdf5 import REQUIRED_KEYS, DatasetError, read_demos, write_demos

__all__ = [
    "REQUIRED_KEYS",
    "STORE_KEYS",
    "Batch",
    "DatasetError",
    "EpisodeSplit",
    "EpisodeStore",
    "Statistics",
    "load_episodes",
    "read_demos",
    "write_demos",
]
