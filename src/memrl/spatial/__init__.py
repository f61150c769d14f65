"""Spatial memory (the spatial-memory spec): a ConvGRU / ConvLSTM / S4D memory over frozen
feature maps (``memrl.nn.fpn``), gated by a conditioning vector, trained as a forward-dynamics
model (phase A), then read by policy and phase-boundary heads (phase B), then fine-tuned end to
end (C).

``memrl spatial`` (:mod:`memrl.spatial.train`) and ``memrl spatial-eval``
(:mod:`memrl.spatial.evaluate`).
"""

from memrl.spatial.memory import SPATIAL_CORES, SpatialMemory
from memrl.spatial.model import SpatialModel

__all__ = ["SPATIAL_CORES", "SpatialMemory", "SpatialModel"]
