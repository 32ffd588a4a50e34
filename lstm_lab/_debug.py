"""Test hooks for the processes a test starts but cannot hand a Python object to (``lstm-lab train``, sweep
workers): environment variables that become :func:`lstm_lab.training.train` callbacks. In-process code passes
``callbacks=[lstm_lab.training.signal_at(step, signal.SIGKILL)]`` instead."""

from __future__ import annotations

import os
import signal

SIGKILL_AT_STEP = "LSTM_LAB_DEBUG_SIGKILL_AT_STEP"  # SIGKILL the training process after that step
SIGINT_AT_STEP = "LSTM_LAB_DEBUG_SIGINT_AT_STEP"  # SIGINT it (as a Ctrl-C would) after that step


def callbacks_from_env() -> list:
    from lstm_lab.training import signal_at

    out = []
    for name, sig in ((SIGKILL_AT_STEP, signal.SIGKILL), (SIGINT_AT_STEP, signal.SIGINT)):
        if os.environ.get(name):
            out.append(signal_at(int(os.environ[name]), sig))
    return out
