"""Memory cores behind one protocol (see ``memrl.cores.base``).

>>> core = make_core("lstm", input_size=8, hidden_size=32)
>>> state = core.initial_state(batch_size=4)
>>> y, state = core(x, state, is_first)        # x (T, 4, 8), is_first (T, 4) bool
"""

from __future__ import annotations

from typing import Any, Literal

from memrl.cores.attention import GTrXLCore, LinearAttentionCore
from memrl.cores.base import Core, State, VectorCore
from memrl.cores.conv import ConvGRUCore, ConvLSTMCore
from memrl.cores.rnn import GRUCore, LSTMCore, NoMemoryCore, unroll_together
from memrl.cores.s4d import S4DCore
from memrl.cores.scan import (
    FFMCore,
    LRUCore,
    MambaCore,
    MinGRUCore,
    MinLSTMCore,
    linear_scan,
)
from memrl.cores.state import cat_states, detach_state, select_state, state_to, zero_state_where

CORES: dict[str, type[Core]] = {
    "none": NoMemoryCore,
    "gru": GRUCore,
    "lstm": LSTMCore,
    "s4d": S4DCore,
    "mingru": MinGRUCore,
    "minlstm": MinLSTMCore,
    "linear_attention": LinearAttentionCore,
    "lru": LRUCore,
    "ffm": FFMCore,
    "mamba": MambaCore,
    "gtrxl": GTrXLCore,
    "conv_gru": ConvGRUCore,
    "conv_lstm": ConvLSTMCore,
}
CONV_CORES = ("conv_gru", "conv_lstm")
VectorCoreName = Literal[
    "none",
    "gru",
    "lstm",
    "s4d",
    "mingru",
    "minlstm",
    "linear_attention",
    "lru",
    "ffm",
    "mamba",
    "gtrxl",
]
"""The cores over feature vectors, as a type for a config's ``core`` option."""


def make_core(name: str, **kwargs: Any) -> Core:
    """Build a core by name (``CORES``): a vector core (``VectorCoreName``: ``input_size``,
    ``hidden_size``, ``num_layers``) or ``conv_gru``, ``conv_lstm`` (``input_channels``,
    ``hidden_channels``, ``spatial_size``, ``kernel_size``, ``num_layers``). Extra options
    (e.g. ``layer_norm`` for gru/lstm, ``state_size``/``init`` for s4d, ``memory`` for gtrxl)
    go to the core's constructor; an unknown one is a TypeError naming it."""
    if name not in CORES:
        raise ValueError(f"unknown core {name!r}; expected one of {', '.join(CORES)}")
    try:
        return CORES[name](**kwargs)
    except TypeError as err:
        raise TypeError(f"make_core({name!r}, ...): {err}") from None


__all__ = [
    "CORES",
    "CONV_CORES",
    "VectorCoreName",
    "Core",
    "State",
    "VectorCore",
    "ConvGRUCore",
    "ConvLSTMCore",
    "FFMCore",
    "GTrXLCore",
    "GRUCore",
    "LRUCore",
    "LSTMCore",
    "MambaCore",
    "LinearAttentionCore",
    "MinGRUCore",
    "MinLSTMCore",
    "NoMemoryCore",
    "S4DCore",
    "cat_states",
    "detach_state",
    "linear_scan",
    "make_core",
    "select_state",
    "state_to",
    "unroll_together",
    "zero_state_where",
]
