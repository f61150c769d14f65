"""Imitation learning on the push task (the visuomotor imitation spec): scripted-expert
demonstrations (``memrl push-collect``, :mod:`memrl.imitation.collect`), recorded in robomimic's
HDF5 layout for the behaviour-cloning pipelines."""

from memrl.imitation.collect import PushCollectConfig, collect_push

__all__ = ["PushCollectConfig", "collect_push"]
