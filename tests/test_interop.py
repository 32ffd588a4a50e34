"""PyTorch interop: a stored fixture (no torch needed) and, when torch is importable, live checks."""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lstm_lab
from lstm_lab import interop

FIXTURE = pathlib.Path(__file__).parent / "data" / "torch_reference.npz"


def _load(key):
    data = np.load(FIXTURE)
    prefix = f"{key}/state/"
    state = {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}
    d_in, H, L, bidir, bf = (int(v) for v in data[f"{key}/config"])
    out = {k.split("/")[1]: data[k] for k in data.files if k.startswith(key + "/") and "/state/" not in k}
    return state, dict(input_size=d_in, hidden_size=H, num_layers=L, bidirectional=bool(bidir),
                       batch_first=bool(bf)), out


def _stack_finals(carry, field):
    return np.stack([np.asarray(getattr(d, field)) for layer in carry for d in layer])


@pytest.mark.parametrize("key,kind", [("lstm", "LSTM"), ("gru", "GRU"), ("lstm_tm", "LSTM")])
def test_from_torch_state_reproduces_stored_torch_outputs(key, kind):
    state, cfg, out = _load(key)
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.float64, 1e-12)):
        layer = interop.from_torch_state(kind, state, param_dtype=dtype, **cfg)
        y, carry = layer(jnp.asarray(out["x"], dtype))
        np.testing.assert_allclose(y, out["y"], rtol=tol, atol=tol)
        np.testing.assert_allclose(_stack_finals(carry, "h"), out["h_n"], rtol=tol, atol=tol)
        if kind == "LSTM":
            np.testing.assert_allclose(_stack_finals(carry, "c"), out["c_n"], rtol=tol, atol=tol)


def test_from_torch_state_rejects_bad_state():
    state, cfg, _ = _load("lstm")
    with pytest.raises(KeyError, match="weight_hh_l1_reverse"):
        interop.from_torch_state("LSTM", {k: v for k, v in state.items() if k != "weight_hh_l1_reverse"}, **cfg)
    with pytest.raises(ValueError, match=r"weight_ih_l0 has shape \(20, 3\); expected \(20, 4\)"):
        interop.from_torch_state("LSTM", state, **(cfg | {"input_size": 4}))
    with pytest.raises(ValueError, match="kind must be 'LSTM' or 'GRU'"):
        interop.from_torch_state("RNN", state, **cfg)


def test_to_torch_rejects_variants_torch_lacks():
    with pytest.raises(ValueError, match="cell 'vanilla' has no PyTorch module"):
        interop.to_torch(lstm_lab.RNN(2, 3, "vanilla", rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="reset_after=True"):
        interop.to_torch(lstm_lab.RNN(2, 3, "gru", rngs=nnx.Rngs(0)))


def test_to_torch_without_torch_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(ImportError, match=r"pip install -e '\.\[bench\]'"):
        interop.to_torch(lstm_lab.RNN(2, 3, "lstm", rngs=nnx.Rngs(0)))


# --- live, when torch is importable ---------------------------------------
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_from_torch_live_two_layer_bidirectional(kind, batch_first):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = getattr(torch.nn, kind)(4, 6, num_layers=2, bidirectional=True, batch_first=batch_first)
    x = torch.randn(3, 7, 4)
    y, state = module(x)
    h_n = state[0] if kind == "LSTM" else state
    layer = interop.from_torch(module)
    assert layer.time_major == (not batch_first)
    y_j, carry = layer(jnp.asarray(x.numpy()))
    np.testing.assert_allclose(y_j, y.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_stack_finals(carry, "h"), h_n.detach().numpy(), rtol=1e-5, atol=1e-5)
    if kind == "LSTM":
        np.testing.assert_allclose(_stack_finals(carry, "c"), state[1].detach().numpy(), rtol=1e-5, atol=1e-5)
    back = interop.to_torch(layer)
    np.testing.assert_allclose(back(x)[0].detach().numpy(), y.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_to_torch_live_roundtrip_of_lstm_lab_layers():
    torch = pytest.importorskip("torch")
    from conftest import randomize

    for cell in ("lstm", interop.TORCH_GRU):
        layer = randomize(lstm_lab.RNN(3, 4, cell, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0)), 1)
        x = np.random.default_rng(0).normal(size=(2, 5, 3)).astype(np.float32)
        y_t, _ = interop.to_torch(layer)(torch.from_numpy(x))
        np.testing.assert_allclose(layer(jnp.asarray(x))[0], y_t.detach().numpy(), rtol=1e-5, atol=1e-5)
