"""lstm_lab: LSTM-family recurrent cells as Flax NNX modules, correct to the equation.

>>> import lstm_lab
>>> sorted(lstm_lab.VARIANTS)[:4]
['cifg', 'fgr', 'gru', 'ln_lstm']

The submodules are attributes too, imported when first used (``import lstm_lab`` stays light:
no optax, orbax, optuna or pandas)::

    lstm_lab.tasks.get("copy", T=20)
    lstm_lab.sweep.trials("studies/quick")
"""

import importlib as _importlib

from lstm_lab.cells import (
    ACTIVATIONS,
    FAMILIES,
    VARIANTS,
    CellSpec,
    FGRState,
    HiddenState,
    LSTMState,
    resolve_cell,
)
from lstm_lab.recurrent import RNN, RecurrentCell, gate_trace

__version__ = "0.1.0"

# submodules reachable as attributes, imported on first use (PEP 562)
_LAZY = ("cells", "recurrent", "config", "models", "tasks", "data", "training", "interop", "sweep",
         "analysis", "distributed", "kernels", "cli")


def __getattr__(name: str):
    if name in _LAZY:
        return _importlib.import_module(f"lstm_lab.{name}")
    raise AttributeError(f"module 'lstm_lab' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "ACTIVATIONS",
    "FAMILIES",
    "VARIANTS",
    "CellSpec",
    "FGRState",
    "HiddenState",
    "LSTMState",
    "RNN",
    "RecurrentCell",
    "gate_trace",
    "resolve_cell",
]
