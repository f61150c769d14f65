"""World model: the RSSM spec's model on the moving-dot world, its trainer and open-loop
evaluation."""

from memrl.world_model.rssm import (
    RSSM,
    CNNDecoder,
    CNNEncoder,
    DeterministicModel,
    RSSMConfig,
    kl_terms,
    rssm_loss,
)

__all__ = [
    "RSSM",
    "CNNDecoder",
    "CNNEncoder",
    "DeterministicModel",
    "RSSMConfig",
    "kl_terms",
    "rssm_loss",
]
