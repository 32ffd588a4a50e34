"""Fast paths behind the cells' one definition of the math.

:mod:`lstm_lab.kernels.pallas_rnn`: the whole time loop of one layer direction in one
Pallas kernel launch (Triton backend on GPU, interpret mode elsewhere), forward and
backward, for every cell (LSTM family, GRU, MGU, tanh RNN). The layer runs it with
``impl="pallas"``. (``impl="scan_vjp"``, the custom-VJP scan, lives in
:mod:`lstm_lab.recurrent`.)
"""

from lstm_lab.kernels.pallas_rnn import fused_recurrence, pallas_unsupported

__all__ = ["fused_recurrence", "pallas_unsupported"]
