"""The RNN layer: identities, precision, layouts, carries, init, bad input. (Every kernel's outputs and gradients
against the reference: tests/test_kernels.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lstm_lab
from lstm_lab import VARIANTS

from conftest import DISTINCT_PRESETS, randomize

PRESETS = DISTINCT_PRESETS


def _x(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(0, 1, shape), dtype)


# ---------------------------------------------------------------------------
# Identities
# ---------------------------------------------------------------------------
def test_np_equals_vanilla_with_zero_peepholes():
    vanilla = randomize(lstm_lab.RNN(3, 5, "vanilla", num_layers=2, rngs=nnx.Rngs(0)), seed=4)
    np_layer = lstm_lab.RNN(3, 5, "np", num_layers=2, rngs=nnx.Rngs(1))
    for lc_v, lc_n in zip(vanilla.cells, np_layer.cells):
        for cv, cn in zip(lc_v, lc_n):
            for p in ("p_i", "p_f", "p_o"):
                getattr(cv, p)[...] = jnp.zeros_like(getattr(cv, p)[...])
            for p in ("W", "R", "b"):
                getattr(cn, p)[...] = getattr(cv, p)[...]
    x = _x((4, 9, 3))
    y_v, c_v = vanilla(x, seq_lengths=jnp.array([9, 3, 5, 1]))
    y_n, c_n = np_layer(x, seq_lengths=jnp.array([9, 3, 5, 1]))
    np.testing.assert_array_equal(y_v, y_n)
    jax.tree.map(np.testing.assert_array_equal, c_v, c_n)
    # and a non-zero peephole does change the output
    vanilla.cells[0][0].p_o[...] = jnp.ones(5, jnp.float32)
    assert not np.allclose(vanilla(x)[0], np_layer(x)[0])


@pytest.mark.parametrize("preset", PRESETS)
def test_traced_values_satisfy_the_cell_equations(preset):
    import verify_gate_traces

    err = verify_gate_traces.check_preset(preset, seed=PRESETS.index(preset))
    expected_checks = {"lstm": 3, "gru": 2, "mgu": 2, "rnn": 1, "slstm": 5, "minlstm": 3, "mingru": 2}[VARIANTS[preset].family]
    assert len(err) >= expected_checks
    assert max(err.values()) <= 1e-5, err


def test_trace_identities_of_the_ablations():
    x = _x((2, 6, 3), seed=5)
    traces = {p: lstm_lab.gate_trace(randomize(lstm_lab.RNN(3, 4, p, rngs=nnx.Rngs(0)), 6), x)
              for p in ("cifg", "nig", "nfg", "nog", "niaf", "noaf", "vanilla")}
    np.testing.assert_allclose(traces["cifg"]["f"], 1 - traces["cifg"]["i"], atol=1e-7)
    assert np.all(np.asarray(traces["nig"]["i"]) == 1)
    assert np.all(np.asarray(traces["nfg"]["f"]) == 1)
    assert np.all(np.asarray(traces["nog"]["o"]) == 1)
    np.testing.assert_allclose(traces["noaf"]["y"], traces["noaf"]["c"] * traces["noaf"]["o"], atol=1e-7)
    np.testing.assert_allclose(traces["vanilla"]["y"], np.tanh(traces["vanilla"]["c"]) * traces["vanilla"]["o"],
                               atol=1e-6)
    assert np.abs(traces["niaf"]["z"]).max() > 1  # not squashed by tanh
    assert np.abs(traces["vanilla"]["z"]).max() < 1
    for p in ("vanilla", "cifg", "nig"):  # every present gate is a real sigmoid, strictly inside (0, 1)
        for g in ("i", "f", "o"):
            if VARIANTS[p].gate_names().count(g):
                assert 0 < np.asarray(traces[p][g]).min() and np.asarray(traces[p][g]).max() < 1


def test_nfg_cell_state_is_a_running_sum():
    """Without a forget gate c_t = c_{t-1} + z_t*i_t: the cell state integrates."""
    layer = randomize(lstm_lab.RNN(2, 3, "nfg", rngs=nnx.Rngs(0)), 2)
    tr = lstm_lab.gate_trace(layer, _x((1, 20, 2), seed=1))
    np.testing.assert_allclose(np.cumsum(tr["z"] * tr["i"], axis=1), tr["c"], rtol=1e-5, atol=1e-5)


def test_gate_trace_is_zero_past_sequence_end_and_validates_arguments():
    layer = lstm_lab.RNN(2, 3, "lstm", num_layers=2, rngs=nnx.Rngs(0))
    tr = lstm_lab.gate_trace(layer, _x((2, 5, 2)), layer_index=1, seq_lengths=jnp.array([5, 2]))
    assert np.all(np.asarray(tr["i"])[1, 2:] == 0) and np.all(np.asarray(tr["i"])[1, :2] > 0)
    with pytest.raises(ValueError, match=r"layer_index must be in 0..1; got 2"):
        lstm_lab.gate_trace(layer, _x((2, 5, 2)), layer_index=2)
    with pytest.raises(ValueError, match=r"direction must be in 0..0 \(bidirectional=False\); got 1"):
        lstm_lab.gate_trace(layer, _x((2, 5, 2)), direction=1)
    with pytest.raises(TypeError, match=r"unknown keyword"):
        lstm_lab.gate_trace(layer, _x((2, 5, 2)), seqlens=3)


# ---------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
def test_bfloat16_compute_close_to_float32(preset):
    layer = lstm_lab.RNN(8, 16, preset, num_layers=2, rngs=nnx.Rngs(0))
    x = _x((4, 10, 8), seed=1)
    y32, c32 = layer(x)
    layer.dtype = jnp.bfloat16
    y16, c16 = layer(x)
    assert y16.dtype == jnp.bfloat16 and y32.dtype == jnp.float32
    assert c16[0][0].h.dtype == jnp.float32  # the carry stays in float32
    assert np.isfinite(np.asarray(y16, np.float32)).all()
    assert np.abs(np.asarray(y16, np.float32) - np.asarray(y32)).max() <= 2e-2
    assert np.abs(np.asarray(c16[1][0].h) - np.asarray(c32[1][0].h)).max() <= 2e-2


def test_float32_stays_float32_with_x64_enabled():
    layer = lstm_lab.RNN(3, 4, "fgr", rngs=nnx.Rngs(0))
    y, c = layer(_x((2, 5, 3)))
    assert y.dtype == jnp.float32 and all(a.dtype == jnp.float32 for a in jax.tree.leaves(c))


# ---------------------------------------------------------------------------
# Layouts, carries, compilation
# ---------------------------------------------------------------------------
def test_time_major_unroll_jit_and_batch_axes_agree():
    layer = randomize(lstm_lab.RNN(3, 4, "vanilla", num_layers=2, bidirectional=True, rngs=nnx.Rngs(0)), 1)
    x = _x((2, 3, 7, 3))
    lengths = jnp.array([[7, 1, 4], [2, 6, 7]])
    y, c = layer(x, seq_lengths=lengths)
    # flat batch
    y_flat, c_flat = layer(x.reshape(6, 7, 3), seq_lengths=lengths.reshape(6))
    np.testing.assert_allclose(y.reshape(6, 7, 8), y_flat, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(c[1][1].c.reshape(6, 4), c_flat[1][1].c, rtol=1e-6, atol=1e-7)
    # time major
    tm = lstm_lab.RNN(3, 4, "vanilla", num_layers=2, bidirectional=True, time_major=True, rngs=nnx.Rngs(0))
    nnx.update(tm, nnx.state(layer, nnx.Param))
    y_tm, c_tm = tm(jnp.moveaxis(x, 2, 0), seq_lengths=lengths)
    np.testing.assert_allclose(jnp.moveaxis(y_tm, 0, 2), y, rtol=1e-6, atol=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), c_tm, c)
    # unroll
    layer.unroll = 3
    y_u, _ = layer(x, seq_lengths=lengths)
    np.testing.assert_allclose(y_u, y, rtol=1e-6, atol=1e-7)
    # jit
    y_j, c_j = nnx.jit(lambda m, x, l: m(x, seq_lengths=l))(layer, x, lengths)
    np.testing.assert_allclose(y_j, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("preset", ["lstm", "fgr", "gru"])
def test_truncated_bptt_carry_continues_the_sequence(preset):
    layer = randomize(lstm_lab.RNN(3, 4, preset, num_layers=2, rngs=nnx.Rngs(0)), 2)
    x = _x((3, 12, 3))
    y, c = layer(x)
    y1, c1 = layer(x[:, :5])
    y2, c2 = layer(x[:, 5:], initial_carry=c1)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], axis=1), y, rtol=1e-6, atol=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), c2, c)


def test_initialize_carry_structure():
    layer = lstm_lab.RNN(3, 4, "fgr", num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))
    carry = layer.initialize_carry((5, 2))
    assert len(carry) == 2 and all(len(layer_c) == 2 for layer_c in carry)
    state = carry[1][1]
    assert isinstance(state, lstm_lab.FGRState)
    assert state.h.shape == (5, 2, 4) and state.c.shape == (5, 2, 4) and state.gates.shape == (5, 2, 12)
    assert isinstance(lstm_lab.RNN(3, 4, "mgu", rngs=nnx.Rngs(0)).initialize_carry((1,))[0][0],
                      lstm_lab.HiddenState)


# ---------------------------------------------------------------------------
# Dropout and initialisation
# ---------------------------------------------------------------------------
def test_dropout_between_layers():
    layer = lstm_lab.RNN(3, 16, "lstm", num_layers=2, dropout=0.5, rngs=nnx.Rngs(0))
    plain = lstm_lab.RNN(3, 16, "lstm", num_layers=2, rngs=nnx.Rngs(0))
    x = _x((2, 5, 3))
    np.testing.assert_array_equal(layer(x)[0], plain(x)[0])  # same params; deterministic by default
    a = layer(x, deterministic=False)[0]
    b = layer(x, deterministic=False)[0]
    assert not np.allclose(a, plain(x)[0]) and not np.allclose(a, b)
    single = lstm_lab.RNN(3, 16, "lstm", dropout=0.5, rngs=nnx.Rngs(0))  # nothing between: no dropout
    np.testing.assert_array_equal(single(x, deterministic=False)[0], single(x)[0])


def _bias_blocks(layer, preset):
    cell = layer.cells[0][0]
    H = cell.hidden_size
    b = np.asarray(cell.b[...])
    return {g: b[j * H:(j + 1) * H] for j, g in enumerate(VARIANTS[preset].gate_names())}


def test_forget_bias_and_chrono_init():
    b = _bias_blocks(lstm_lab.RNN(2, 8, "lstm", forget_bias=2.5, rngs=nnx.Rngs(0)), "lstm")
    assert np.all(b["f"] == 2.5) and np.all(b["i"] == 0) and np.all(b["z"] == 0) and np.all(b["o"] == 0)
    b = _bias_blocks(lstm_lab.RNN(2, 8, "cifg", rngs=nnx.Rngs(0)), "cifg")
    assert np.all(b["i"] == -1.0)  # f = 1 - s(a_i) = s(-a_i)
    b = _bias_blocks(lstm_lab.RNN(2, 8, "gru", rngs=nnx.Rngs(0)), "gru")
    assert np.all(b["u"] == 1.0) and np.all(b["r"] == 0)
    b = _bias_blocks(lstm_lab.RNN(2, 64, "lstm", chrono_init=100, rngs=nnx.Rngs(0)), "lstm")
    assert b["f"].min() >= 0 and b["f"].max() <= np.log(99) + 1e-6 and b["f"].std() > 0.3
    np.testing.assert_array_equal(b["i"], -b["f"])
    with pytest.raises(ValueError, match="cell 'rnn' has no gate"):
        lstm_lab.RNN(2, 8, "rnn", chrono_init=100, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="chrono_init .* must be > 2; got 1"):
        lstm_lab.RNN(2, 8, "lstm", chrono_init=1, rngs=nnx.Rngs(0))


def test_raw_input_cell_call_matches_layer():
    layer = randomize(lstm_lab.RNN(3, 4, "cifg", rngs=nnx.Rngs(0)), 3)
    cell = layer.cells[0][0]
    x = _x((2, 3, 3))
    carry = cell.initialize_carry((2,))
    ys = []
    for t in range(3):
        carry, y = cell(carry, x[:, t])
        ys.append(y)
    np.testing.assert_allclose(jnp.stack(ys, 1), layer(x)[0], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# Bad input: clear errors before anything is traced
# ---------------------------------------------------------------------------
@pytest.fixture
def no_scan(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the scan ran before the input was checked")
    monkeypatch.setattr(lstm_lab.recurrent, "run_direction", fail)


@pytest.fixture(scope="module")
def small_layer():
    return lstm_lab.RNN(4, 3, "lstm", num_layers=2, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(x=np.zeros((2, 5, 3), np.float32)), ValueError, r"must have 4 features .*got shape \(2, 5, 3\)"),
    (dict(x=np.zeros((5, 4), np.float32)), ValueError, r"at least one batch axis; got shape \(5, 4\) \(rank 2\)"),
    (dict(x=np.zeros((2, 5, 4), np.int32)), TypeError, r"floating-point array; got dtype int32"),
    (dict(seq_lengths=np.array([[5], [5]])), ValueError, r"seq_lengths must have shape \(batch...\) = \(2,\); got \(2, 1\)"),
    (dict(seq_lengths=np.array([5, 0])), ValueError, r"seq_lengths must be in 1..T = 1..5; got 0 at index \(1,\)"),
    (dict(seq_lengths=np.array([6, 2])), ValueError, r"1..T = 1..5; got 6 at index \(0,\)"),
    (dict(seq_lengths=np.array([5.0, 2.0])), TypeError, r"seq_lengths must be integers; got dtype float"),
    (dict(initial_carry="layer.initialize_carry((3,))"), ValueError, r"initial_carry\[0\]\[0\]\.h must have shape \(2, 3\); got \(3, 3\)"),
    (dict(initial_carry="layer.initialize_carry((2,))[0]"), ValueError, r"initial_carry must be a tuple of num_layers=2 tuples of num_directions=1 LSTMState\(h \(2, 3\), c \(2, 3\)\)"),
    (dict(initial_carry="((jnp.zeros((2, 3)), jnp.zeros((2, 3))),) * 2"), ValueError, r"initial_carry must be a tuple"),
])
def test_bad_call_input_is_rejected_before_the_scan(small_layer, no_scan, kwargs, exc, pattern):
    layer = small_layer
    x = kwargs.pop("x", np.zeros((2, 5, 4), np.float32))
    if isinstance(kwargs.get("initial_carry"), str):
        kwargs["initial_carry"] = eval(kwargs["initial_carry"])
    with pytest.raises(exc, match=pattern):
        layer(x, **kwargs)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(hidden_size=0), r"hidden_size must be a positive int; got 0"),
    (dict(num_layers=1.5), r"num_layers must be a positive int; got 1.5"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\); got 1.0"),
    (dict(impl="cudnn"), r"unknown impl 'cudnn'"),
])
def test_bad_constructor_arguments(kwargs, pattern):
    args = dict(in_features=3, hidden_size=4, rngs=nnx.Rngs(0)) | kwargs
    with pytest.raises(ValueError, match=pattern):
        lstm_lab.RNN(**args)
