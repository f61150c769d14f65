"""Episode storage: HDF5 datasets of demonstrations in robomimic's layout
(``data/demo_<i>/{obs/<key>, actions, rewards, dones, ...}``), shared by the imitation and
spatial-memory pipelines.

>>> write_demos("demos.hdf5", episodes, attrs={"env": "push"})
>>> episodes, attrs = read_demos("demos.hdf5")
"""

from memrl.data.hdf5 import REQUIRED_KEYS, DatasetError, read_demos, write_demos

__all__ = ["REQUIRED_KEYS", "DatasetError", "read_demos", "write_demos"]
