"""Weights to and from PyTorch's ``nn.LSTM`` and ``nn.GRU``.

torch is imported lazily; it is not a dependency of lstm_lab.

Mapping (per layer ``l`` and direction, ``_reverse`` for the backward one):

* LSTM: PyTorch's rows ``i, f, g, o`` are lstm_lab's columns ``i, f, z, o``:
  ``W = weight_ih.T``, ``R = weight_hh.T``, ``b = bias_ih + bias_hh``
  (lstm_lab has one bias). Preset ``lstm``.
* GRU: PyTorch's ``r, z, n`` are ``r, u, n``; PyTorch computes the candidate
  with the reset gate after the recurrent matmul, so the cell is
  ``CellSpec(family="gru", reset_after=True)``; ``b`` holds
  ``bias_ih + bias_hh`` for ``r`` and ``u`` and ``bias_ih`` for ``n``, and
  ``b_hn = bias_hh`` of ``n``.

Carries: PyTorch's ``h_n[l * num_directions + d]`` is lstm_lab's
``carry[l][d].h`` (and ``c_n`` is ``.c``).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lstm_lab.cells import CellSpec, VARIANTS
from lstm_lab.recurrent import RNN

__all__ = ["from_torch", "from_torch_state", "to_torch", "TORCH_GRU"]

#: The GRU that PyTorch and cuDNN compute.
TORCH_GRU = CellSpec(family="gru", reset_after=True)


def _suffix(layer: int, direction: int) -> str:
    return f"_l{layer}" + ("_reverse" if direction else "")


def from_torch_state(kind: str, state: Mapping[str, Any], *, input_size: int, hidden_size: int,
                     num_layers: int = 1, bidirectional: bool = False, batch_first: bool = False,
                     dropout: float = 0.0, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None) -> RNN:
    """An :class:`~lstm_lab.RNN` from the ``state_dict`` of a PyTorch ``LSTM``/``GRU``.

    ``state`` maps PyTorch's parameter names (``weight_ih_l0``, ...,
    ``bias_hh_l1_reverse``) to arrays (numpy or torch); the biases may be
    absent (``bias=False``). No torch needed: this is what :func:`from_torch`
    and the stored test fixture use.
    """
    kind = kind.upper()
    if kind not in ("LSTM", "GRU"):
        raise ValueError(f"from_torch_state: kind must be 'LSTM' or 'GRU'; got {kind!r}.")
    spec = VARIANTS["lstm"] if kind == "LSTM" else TORCH_GRU
    layer = RNN(input_size, hidden_size, spec, num_layers=num_layers, bidirectional=bidirectional,
                dropout=dropout, time_major=not batch_first, param_dtype=param_dtype, rngs=rngs or nnx.Rngs(0))
    H = hidden_size
    for li, layer_cells in enumerate(layer.cells):
        for d, cell in enumerate(layer_cells):
            s = _suffix(li, d)

            def get(name, shape, required=True):
                key = name + s
                if key not in state:
                    if required:
                        raise KeyError(f"from_torch_state: {key!r} missing from the state dict.")
                    return np.zeros(shape, np.float64)
                value = state[key]
                value = value.detach().cpu().double().numpy() if hasattr(value, "detach") else np.asarray(
                    value, np.float64)
                if value.shape != shape:
                    raise ValueError(f"from_torch_state: {key} has shape {value.shape}; expected {shape}.")
                return value

            d_in = cell.in_features
            gates = 4 if kind == "LSTM" else 3
            w_ih = get("weight_ih", (gates * H, d_in))
            w_hh = get("weight_hh", (gates * H, H))
            b_ih = get("bias_ih", (gates * H,), required=False)
            b_hh = get("bias_hh", (gates * H,), required=False)
            values = {"W": w_ih.T, "R": w_hh.T}
            if kind == "LSTM":
                values["b"] = b_ih + b_hh
            else:
                values["b"] = np.concatenate([b_ih[:2 * H] + b_hh[:2 * H], b_ih[2 * H:]])
                values["b_hn"] = b_hh[2 * H:]
            for name, value in values.items():
                var = getattr(cell, name)
                var[...] = jnp.asarray(value, var[...].dtype)
    return layer


def from_torch(module, *, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None) -> RNN:
    """An :class:`~lstm_lab.RNN` computing what ``module`` (``torch.nn.LSTM`` or ``torch.nn.GRU``) does.

    Any ``num_layers``, ``bidirectional``, ``batch_first`` (-> ``time_major``),
    ``bias`` and ``dropout``; ``proj_size`` is not supported. Example (the
    suite runs it in ``tests/test_interop.py``)::

        m = torch.nn.LSTM(3, 8, num_layers=2, batch_first=True, bidirectional=True)
        layer = lstm_lab.interop.from_torch(m)
        y, carry = layer(jnp.asarray(x.numpy()))    # == m(x) to float32 precision
    """
    mode = getattr(module, "mode", None)
    if mode not in ("LSTM", "GRU"):
        raise TypeError(f"from_torch: expected a torch.nn.LSTM or torch.nn.GRU; got {type(module).__name__} "
                        f"(mode={mode!r}).")
    if getattr(module, "proj_size", 0):
        raise ValueError(f"from_torch: LSTM with proj_size={module.proj_size} is not supported.")
    state = {k: v for k, v in module.state_dict().items()}
    return from_torch_state(mode, state, input_size=module.input_size, hidden_size=module.hidden_size,
                            num_layers=module.num_layers, bidirectional=module.bidirectional,
                            batch_first=module.batch_first, dropout=float(module.dropout),
                            param_dtype=param_dtype, rngs=rngs)


def to_torch(layer: RNN):
    """A ``torch.nn.LSTM`` (cell ``lstm``) or ``torch.nn.GRU`` (``gru`` with ``reset_after=True``)
    computing what ``layer`` does, in float32 (``batch_first = not layer.time_major``).

    Other variants have no PyTorch module and raise ``ValueError``.
    """
    spec = layer.spec  # the variant first: a refusal needs no torch
    if spec == VARIANTS["lstm"]:
        kind, gates = "LSTM", 4
    elif spec == TORCH_GRU:
        kind, gates = "GRU", 3
    else:
        hint = (" PyTorch's GRU applies the reset gate after the recurrent matmul: build the layer with "
                "CellSpec(family='gru', reset_after=True)." if spec.family == "gru" else "")
        raise ValueError(f"to_torch: cell {spec.name!r} has no PyTorch module; only 'lstm' and "
                         f"CellSpec(family='gru', reset_after=True) do.{hint}")
    try:
        import torch
    except ImportError:
        raise ImportError("to_torch needs PyTorch, which is not a dependency of lstm_lab: pip install -e '.[bench]' "
                          "-c benchmarks/constraints.txt (the CPU build) or any torch.") from None
    module = getattr(torch.nn, kind)(layer.in_features, layer.hidden_size, num_layers=layer.num_layers,
                 bidirectional=layer.bidirectional, batch_first=not layer.time_major,
                 dropout=layer.dropout_rate)
    H = layer.hidden_size
    state = {}
    for li, layer_cells in enumerate(layer.cells):
        for d, cell in enumerate(layer_cells):
            s = _suffix(li, d)
            p = {k: np.asarray(v, np.float32) for k, v in cell.params().items()}
            state["weight_ih" + s] = p["W"].T
            state["weight_hh" + s] = p["R"].T
            state["bias_ih" + s] = p["b"]
            state["bias_hh" + s] = np.zeros(gates * H, np.float32)
            if gates == 3:
                state["bias_hh" + s][2 * H:] = p["b_hn"]
    module.load_state_dict({k: torch.tensor(np.array(v, np.float32)) for k, v in state.items()})
    return module
