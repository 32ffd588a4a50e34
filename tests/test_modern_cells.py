"""The modern families: sLSTM (Beck et al. 2024), minLSTM and minGRU (Feng et al. 2024), and ``impl="parallel"``.

What the shared suites already hold for every preset (these three included): the float32 reference at three layer
configurations (tests/test_reference.py), the float64 reference and finite-difference gradients per kernel with
lengths, both directions and a random initial carry (tests/test_kernels.py, ``scan`` and ``parallel``), gate traces
that satisfy the equations and bf16 close to float32 (tests/test_layer.py). Here: what is particular to them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import lstm_lab
from lstm_lab import CellSpec, VARIANTS, kernels
from lstm_lab.cells import param_shapes

from conftest import layer_params, random_carry, randomize
import reference


def _layer(spec, F, H, *, impl="scan", dtype=jnp.float32, seed=0, scale=0.5, **kw):
    return randomize(lstm_lab.RNN(F, H, spec, impl=impl, param_dtype=dtype, rngs=nnx.Rngs(seed), **kw), seed,
                     scale=scale)


# ---------------------------------------------------------------------------
# sLSTM
# ---------------------------------------------------------------------------
def test_slstm_stays_finite_at_t2000_with_large_preactivations_and_equals_the_reference():
    """Input-gate pre-activations of +-100 (exp overflows float32 past 88): the stabilizer keeps every state
    finite over 2000 steps, and the float32 layer equals the float64 reference."""
    F, H, T = 3, 4, 2000
    layer = _layer(VARIANTS["slstm"], F, H, seed=1)
    cell = layer.cells[0][0]
    rng = np.random.default_rng(2)
    W = np.asarray(cell.W[...]).copy()
    W[:, :H] = rng.normal(0.0, 60.0, (F, H))  # i~: |.| up to ~100-300
    cell.W[...] = jnp.asarray(W)
    x = rng.normal(0.0, 1.0, (2, T, F))
    y, final = layer(jnp.asarray(x, jnp.float32))
    assert np.isfinite(np.asarray(y)).all()
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(final))
    y_ref, fin_ref, _ = reference.run_layer(VARIANTS["slstm"], layer_params(layer), x)
    assert np.abs(y_ref).max() > 0.1 and np.abs(fin_ref[0][0]["m"]).max() > 88  # the case is the hard one
    np.testing.assert_allclose(np.asarray(y, np.float64), y_ref, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(final[0][0].m, np.float64), fin_ref[0][0]["m"], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("heads,exp_forget", [(2, False), (3, True), (1, True)])
def test_slstm_heads_and_exponential_forget_match_the_reference(heads, exp_forget):
    spec = CellSpec(family="slstm", num_heads=heads, exp_forget=exp_forget)
    F, H, T = 3, 6, 9
    layer = _layer(spec, F, H, dtype=jnp.float64, seed=heads, bidirectional=True)
    assert layer.cells[0][0].R[...].shape == ((H, 4 * H) if heads == 1 else (heads, H // heads, 4 * H // heads))
    rng = np.random.default_rng(heads)
    x = rng.normal(size=(3, T, F))
    lengths = np.array([T, 4, 1])
    carry = random_carry(layer, (3,), 5, jnp.float64)
    y, final = layer(jnp.asarray(x), seq_lengths=jnp.asarray(lengths), initial_carry=carry)
    init = [[{k: np.asarray(v) for k, v in s._asdict().items()} for s in lc] for lc in carry]
    y_ref, fin_ref, _ = reference.run_layer(spec, layer_params(layer), x, lengths=lengths, initial=init)
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-12, atol=1e-13)
    for d in range(2):
        for k, v in final[0][d]._asdict().items():
            np.testing.assert_allclose(np.asarray(v), fin_ref[0][d][k], rtol=1e-12, atol=1e-13)


def test_slstm_heads_make_r_block_diagonal():
    """Head j's units of y_(t-1) reach only head j's units of every gate."""
    spec = CellSpec(family="slstm", num_heads=2)
    layer = _layer(spec, 2, 4, dtype=jnp.float64)
    traced = lstm_lab.cells.slstm_recurrent
    R = layer.cells[0][0].R[...]
    h = jnp.zeros((1, 4)).at[0, 0].set(1.0)  # a unit of head 0
    rec = np.asarray(traced(spec, h, R, jnp.float64)).reshape(4, 2, 2)  # [gate, head, unit]
    assert np.abs(rec[:, 1]).max() == 0 and np.abs(rec[:, 0]).max() > 0


@pytest.mark.parametrize("preset", ["slstm", "minlstm", "mingru"])
def test_gradients_check_grads_float64(preset):
    impl = "parallel" if preset != "slstm" else "scan"
    layer = _layer(VARIANTS[preset], 2, 3, impl=impl, dtype=jnp.float64, seed=4)
    graphdef, params = nnx.split(layer)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 2)))
    lengths = jnp.asarray([5, 3])

    def f(params, x):
        y, final = nnx.merge(graphdef, params)(x, seq_lengths=lengths)
        return jnp.sum(jnp.sin(y)) + sum(jnp.sum(v) for v in jax.tree.leaves(final))

    check_grads(f, (params, x), order=1, modes=["rev"] if impl == "parallel" else ["fwd", "rev"], atol=1e-6,
                rtol=1e-6)


# ---------------------------------------------------------------------------
# minLSTM / minGRU and impl="parallel"
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["minlstm", "mingru"])
@pytest.mark.parametrize("T,B,H", [(1, 1, 1), (7, 3, 5), (257, 2, 16)])
def test_parallel_equals_the_scan(preset, T, B, H):
    """Outputs, final carries and gradients of every parameter, the input and the initial carry (of both
    signs), bidirectional, with lengths: float32 to 1e-5."""
    F = 3
    spec = VARIANTS[preset]
    rng = np.random.default_rng(T * 100 + H)
    x = jnp.asarray(rng.normal(size=(B, T, F)), jnp.float32)
    lengths = jnp.asarray(np.r_[T, rng.integers(1, T + 1, B - 1)])  # one full-length sequence
    g = jnp.asarray(rng.normal(size=(B, T, 2 * H)), jnp.float32)
    out = {}
    for impl in ("scan", "parallel"):
        layer = _layer(spec, F, H, impl=impl, seed=T + H, bidirectional=True, scale=1.0)
        graphdef, params = nnx.split(layer)
        carry = random_carry(layer, (B,), 3)

        def loss(params, x, carry):
            y, final = nnx.merge(graphdef, params)(x, seq_lengths=lengths, initial_carry=carry)
            return jnp.sum(y * g) + sum(jnp.sum(jnp.cos(v)) for v in jax.tree.leaves(final)), (y, final)

        (_, aux), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, x, carry)
        out[impl] = (aux, grads)
    for a, b in zip(jax.tree.leaves(out["parallel"]), jax.tree.leaves(out["scan"])):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(b).max()))


def test_parallel_keeps_the_carry_past_each_end_and_outputs_zeros():
    spec = VARIANTS["minlstm"]
    layer = _layer(spec, 2, 4, impl="parallel")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 6, 2)), jnp.float32)
    lengths = np.array([6, 2, 1])
    y, final = layer(x, seq_lengths=jnp.asarray(lengths))
    assert np.all(np.asarray(y)[np.arange(6)[None, :] >= lengths[:, None]] == 0)
    for b, L in enumerate(lengths):  # the final carry is the output at the last valid step
        np.testing.assert_array_equal(np.asarray(final[0][0].h)[b], np.asarray(y)[b, L - 1])


def test_parallel_is_stable_at_long_sequences():
    """T = 4096 with saturated gates: a product of thousands of gates underflows to 0 in linear space; in log
    space the result stays finite and equals the sequential scan."""
    spec = VARIANTS["mingru"]
    x = jnp.asarray(np.random.default_rng(1).normal(0.0, 3.0, (2, 4096, 2)), jnp.float32)
    ys = {}
    for impl in ("scan", "parallel"):
        ys[impl] = np.asarray(_layer(spec, 2, 4, impl=impl, seed=2, scale=2.0)(x)[0], np.float64)
    assert np.isfinite(ys["parallel"]).all()
    np.testing.assert_allclose(ys["parallel"], ys["scan"], rtol=1e-5, atol=1e-5)


def test_min_cells_have_no_recurrent_matrix_and_the_candidate_is_positive():
    assert "R" not in param_shapes(VARIANTS["minlstm"], 3, 4) and "R" not in param_shapes(VARIANTS["mingru"], 3, 4)
    a = jnp.linspace(-30.0, 30.0, 601)
    g = lstm_lab.cells.min_g(a)
    assert float(g.min()) > 0 and bool(jnp.all(jnp.diff(g) > 0))  # positive, increasing
    np.testing.assert_allclose(np.asarray(lstm_lab.cells.log_g(a)), np.log(np.asarray(g, np.float64)), rtol=1e-5,
                               atol=1e-6)
    # minLSTM's normalized gates sum to one: h is a convex combination of h_prev and g(n~)
    tr = lstm_lab.gate_trace(_layer(VARIANTS["minlstm"], 2, 3), jnp.ones((1, 4, 2)))
    np.testing.assert_allclose(np.asarray(tr["f"] + tr["i"]), 1.0, rtol=1e-6)


def test_auto_and_the_registry_say_what_runs_the_new_families():
    for preset in ("slstm", "minlstm", "mingru"):
        spec = VARIANTS[preset]
        for impl in ("scan_vjp", "native", "pallas"):
            why = kernels.impl_unsupported(impl, spec, 8)
            assert why and spec.family in why, (impl, why)
        assert kernels.impl_unsupported("scan", spec, 8) is None
    assert "whose gates read h_(t-1)" in kernels.impl_unsupported("parallel", VARIANTS["slstm"], 8)
    assert kernels.impl_unsupported("parallel", VARIANTS["mingru"], 8) is None


@pytest.mark.parametrize("fields,pattern", [
    (dict(family="lstm", num_heads=2), "num_heads=2 applies to the sLSTM only"),
    (dict(family="gru", exp_forget=True), "exp_forget=True applies to the sLSTM only"),
    (dict(family="slstm", num_heads=0), "num_heads must be an int >= 1"),
    (dict(family="slstm", exp_forget=1), "exp_forget must be a bool"),
    (dict(family="minlstm", peepholes=True), "applies to the LSTM family only"),
])
def test_bad_fields_are_one_clear_line(fields, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        CellSpec(**fields)


def test_heads_that_do_not_divide_the_hidden_size_are_refused():
    with pytest.raises(ValueError, match="num_heads=4 must divide the hidden size; got hidden_size=6"):
        lstm_lab.RNN(3, 6, CellSpec(family="slstm", num_heads=4), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("preset,impl", [("slstm", "scan"), ("minlstm", "parallel"), ("mingru", "parallel")])
def test_a_vmapped_population_equals_its_members(preset, impl):
    layers = [_layer(VARIANTS[preset], 2, 4, impl=impl, seed=i) for i in range(3)]
    graphdef = nnx.split(layers[0])[0]
    params = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.split(layer)[1] for layer in layers])
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 2)), jnp.float32)
    lengths = jnp.asarray([9, 4])

    def run(p):
        return nnx.merge(graphdef, p)(x, seq_lengths=lengths)[0]

    pop, pop_grads = jax.vmap(lambda p: (run(p), jax.grad(lambda q: jnp.sum(run(q) ** 2))(p)))(params)
    for i, layer in enumerate(layers):
        p_i = nnx.split(layer)[1]
        np.testing.assert_allclose(np.asarray(pop[i]), np.asarray(run(p_i)), rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(jax.tree.map(lambda v: v[i], pop_grads)),
                        jax.tree.leaves(jax.grad(lambda q: jnp.sum(run(q) ** 2))(p_i))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", ["minlstm", "mingru"])
def test_parallel_in_bfloat16_is_close_to_float32(preset):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 33, 3)), jnp.float32)
    layer32 = _layer(VARIANTS[preset], 3, 8, impl="parallel", seed=1)
    y32 = layer32(x)[0]
    layer16 = lstm_lab.RNN(3, 8, preset, impl="parallel", dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    nnx.update(layer16, nnx.state(layer32))  # the same float32 parameters, bf16 matmuls
    out = layer16(x)[0]
    assert out.dtype == jnp.bfloat16
    assert float(jnp.abs(out.astype(jnp.float32) - y32).max()) < 0.05 * max(1.0, float(jnp.abs(y32).max()))
