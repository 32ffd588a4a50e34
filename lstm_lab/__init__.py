"""lstm_lab: LSTM-family recurrent cells as Flax NNX modules, correct to the equation.

>>> import lstm_lab
>>> sorted(lstm_lab.VARIANTS)[:4]
['cifg', 'fgr', 'gru', 'lstm']
"""

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
