"""impl="scan_vjp" (custom VJP: reverse recurrence for the states, weight gradients as one matmul after the
loop) computes the same function and the same gradients as jax.grad of the plain scan."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lstm_lab
from conftest import DISTINCT_PRESETS, randomize

LSTM_PRESETS = [n for n in DISTINCT_PRESETS if lstm_lab.cells.VARIANTS[n].family == "lstm"]


def _grads(impl, name, dtype, seed, *, bidirectional, lengths, B=3, T=7, F=3, H=4, layers=1, remat=False):
    m = lstm_lab.RNN(F, H, name, rngs=nnx.Rngs(0), impl=impl, bidirectional=bidirectional, num_layers=layers,
                     remat=remat,
                     dtype=dtype, param_dtype=dtype)
    randomize(m, seed)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, T, F)), dtype)
    g = jnp.asarray(rng.normal(size=(B, T, H * (2 if bidirectional else 1))), dtype)
    c0 = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), dtype), m.initialize_carry((B,)))
    sl = None if lengths is None else jnp.asarray(lengths)

    def loss(m, x, c0):
        y, c = m(x, seq_lengths=sl, initial_carry=c0)
        return jnp.sum(y * g) + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(c))

    value, grads = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1, 2)))(m, x, c0)
    return value, jax.tree.leaves(grads)


def _check(name, dtype, tol, seed, **kw):
    va, ga = _grads("scan", name, dtype, seed, **{**kw, "remat": False})
    vb, gb = _grads("scan_vjp", name, dtype, seed, **kw)
    assert abs(float(va - vb)) <= tol * abs(float(va))
    assert len(ga) == len(gb)
    for a, b in zip(ga, gb):
        assert a.dtype == b.dtype and a.shape == b.shape
        scale = float(jnp.max(jnp.abs(a)))
        assert float(jnp.max(jnp.abs(a - b))) <= tol * max(scale, 1e-30), (name, a.shape)


@pytest.mark.parametrize("name", LSTM_PRESETS)
def test_scan_vjp_gradients_equal_plain_scan_float32(name):
    # bidirectional, per-sequence lengths (masking and per-sequence reversal), a random carry in
    _check(name, jnp.float32, 1e-5, seed=hash(name) % 1000, bidirectional=True, lengths=[7, 2, 5])


@pytest.mark.parametrize("name, remat", [("vanilla", False), ("fgr", True)])
def test_scan_vjp_gradients_equal_plain_scan_float64(name, remat):
    # remat=True recomputes h_prev @ R in the backward instead of saving the pre-activations
    _check(name, jnp.float64, 1e-10, seed=7, bidirectional=False, lengths=None, B=2, T=9, F=5, H=3, layers=2,
           remat=remat)


def test_scan_vjp_remat_float32():
    _check("cifg", jnp.float32, 1e-5, seed=3, bidirectional=True, lengths=[3, 7, 1], remat=True)


def test_scan_vjp_rejects_other_families():
    with pytest.raises(ValueError, match="scan_vjp.*LSTM family"):
        lstm_lab.RNN(3, 4, "gru", rngs=nnx.Rngs(0), impl="scan_vjp")
