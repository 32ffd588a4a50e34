"""Regularization inside the recurrence: layer_norm, recurrent_dropout, variational_dropout, zoneout, weight_drop.

Training draws its masks from the layer's ``dropout_key``; ``RNN.noise`` returns the very masks it draws, so the
float64 reference (tests/reference.py, with the masks passed in) checks the training math exactly, and evaluation
(no masks; zoneout's expectation) against the reference without them.
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

from conftest import carry_to_ref, layer_params, random_carry, randomize
import reference

ALL_ON = dict(layer_norm=True, recurrent_dropout=0.3, variational_dropout=0.25, zoneout_c=0.2, zoneout_h=0.15,
              weight_drop=0.3)
SPECS = {
    "layer_norm": CellSpec(layer_norm=True),
    "recurrent_dropout": CellSpec(recurrent_dropout=0.4),
    "variational_dropout": CellSpec(variational_dropout=0.3),
    "zoneout": CellSpec(zoneout_c=0.3, zoneout_h=0.2),
    "weight_drop": CellSpec(weight_drop=0.4),
    "all+vanilla": VARIANTS["vanilla"].replace(**ALL_ON),
    "all+cifg": VARIANTS["cifg"].replace(**ALL_ON),
    "all+fgr": VARIANTS["fgr"].replace(**ALL_ON),
    "all+nig+noaf": CellSpec(input_gate=False, output_activation="identity", peepholes=True, **ALL_ON),
    "gru": CellSpec(family="gru", recurrent_dropout=0.3, variational_dropout=0.2, zoneout_h=0.2, weight_drop=0.3),
    "gru_reset_after": CellSpec(family="gru", reset_after=True, recurrent_dropout=0.3, variational_dropout=0.2,
                                zoneout_h=0.2),
    "mgu": CellSpec(family="mgu", variational_dropout=0.2, zoneout_h=0.25, weight_drop=0.2),
    "rnn": CellSpec(family="rnn", variational_dropout=0.2, zoneout_h=0.25, weight_drop=0.2),
}
B, T, F, H = 3, 6, 3, 4
LENGTHS = np.array([6, 3, 1])


def _case(spec, dtype=jnp.float64, seed=0, impl="auto"):
    layer = randomize(lstm_lab.RNN(F, H, spec, num_layers=2, bidirectional=True, impl=impl, param_dtype=dtype,
                                   rngs=nnx.Rngs(seed)), seed)
    rng = np.random.default_rng(seed + 1)
    x = rng.normal(size=(B, T, F))
    carry = random_carry(layer, (B,), seed + 2, dtype)
    return layer, x, carry


def _noise(layer, key):
    return [[{k: np.asarray(v) for k, v in layer.noise(key, li, d, T, B, jnp.float64).items()}
             for d in range(2)] for li in range(2)]


@pytest.mark.parametrize("name", list(SPECS))
def test_training_and_evaluation_match_the_reference(name):
    spec = SPECS[name]
    layer, x, carry = _case(spec, seed=len(name))
    key = jax.random.key(7)
    ref = lambda noise: reference.run_layer(spec, layer_params(layer), x, lengths=LENGTHS,  # noqa: E731
                                            initial=carry_to_ref(carry, (B,)), noise=noise)
    for deterministic in (False, True):
        y, final = layer(jnp.asarray(x), seq_lengths=jnp.asarray(LENGTHS), initial_carry=carry,
                         deterministic=deterministic, dropout_key=key)
        y_ref, fin_ref, _ = ref(None if deterministic else _noise(layer, key))
        np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-12, atol=1e-12, err_msg=f"{deterministic=}")
        for li in range(2):
            for d in range(2):
                for k, v in final[li][d]._asdict().items():
                    np.testing.assert_allclose(np.asarray(v), fin_ref[li][d][k], rtol=1e-12, atol=1e-12)
    # the masks do something: training differs from evaluation, and from training with another key
    if spec.stochastic():
        y_train = layer(jnp.asarray(x), deterministic=False, dropout_key=key)[0]
        y_other = layer(jnp.asarray(x), deterministic=False, dropout_key=jax.random.key(8))[0]
        y_eval = layer(jnp.asarray(x))[0]
        assert not np.allclose(y_train, y_eval) and not np.allclose(y_train, y_other)


def test_masks_are_what_each_method_says():
    spec = CellSpec(**{**ALL_ON, "layer_norm": False})
    layer = lstm_lab.RNN(5, 64, spec, rngs=nnx.Rngs(0))
    n = layer.noise(jax.random.key(0), 0, 0, 200, 50)
    assert set(n) == {"x_mask", "h_mask", "z_mask", "zc_mask", "zh_mask", "R_mask"}
    assert n["x_mask"].shape == (50, 5) and n["h_mask"].shape == (50, 64)  # one per sequence: same every step
    for k in ("z_mask", "zc_mask", "zh_mask"):
        assert n[k].shape == (200, 50, 64)
        assert not np.array_equal(n[k][0], n[k][1])  # a fresh mask every step
    assert n["R_mask"].shape == layer.cells[0][0].R.shape
    for k, rate in (("x_mask", 0.25), ("h_mask", 0.25), ("z_mask", 0.3), ("R_mask", 0.3)):  # inverted dropout
        v = np.asarray(n[k], np.float64)
        np.testing.assert_allclose(np.unique(v), [0.0, 1 / (1 - rate)], rtol=1e-6)
        assert abs((v == 0).mean() - rate) < 0.05, k
    for k, rate in (("zc_mask", 0.2), ("zh_mask", 0.15)):  # zoneout: 1 = keep the previous value
        v = np.asarray(n[k])
        assert set(np.unique(v)) == {0.0, 1.0} and abs(v.mean() - rate) < 0.01, k
    # layers and directions draw their own masks
    n2 = lstm_lab.RNN(5, 64, spec, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0)).noise(
        jax.random.key(0), 1, 1, 200, 50)
    assert not np.array_equal(n["zh_mask"], n2["zh_mask"])


def test_zoneout_evaluation_is_the_expectation():
    """Averaged over many training masks, a zoneout step equals evaluation's expected step (one step from a
    random carry, so the expectation is linear in the mask)."""
    spec = CellSpec(zoneout_c=0.3, zoneout_h=0.4)
    layer = randomize(lstm_lab.RNN(2, 3, spec, param_dtype=jnp.float64, rngs=nnx.Rngs(0)), 1)
    x = jnp.ones((1, 1, 2))
    carry = random_carry(layer, (1,), 2, jnp.float64)
    keys = jax.random.split(jax.random.key(0), 4000)
    run = jax.jit(jax.vmap(lambda k: layer(x, initial_carry=carry, deterministic=False, dropout_key=k)[1][0][0]))
    mean = jax.tree.map(lambda a: a.mean(0), run(keys))
    expected = layer(x, initial_carry=carry)[1][0][0]
    for got, want in zip(mean, expected):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=0.03)


def test_training_without_a_key_is_one_clear_line():
    layer = lstm_lab.RNN(2, 3, CellSpec(zoneout_h=0.1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"deterministic=False with the cell's regularization \(zoneout_h=0.1\) "
                                         r"needs dropout_key"):
        layer(jnp.ones((1, 4, 2)), deterministic=False)
    layer(jnp.ones((1, 4, 2)))  # evaluation needs none


@pytest.mark.parametrize("name", ["all+vanilla", "gru"])
def test_gradients_check_grads_float64(name):
    spec = SPECS[name]
    # impl="scan": forward mode too (scan_vjp, a custom VJP, is held to the scan's gradients below)
    layer = randomize(lstm_lab.RNN(2, 3, spec, bidirectional=True, impl="scan", param_dtype=jnp.float64,
                                   rngs=nnx.Rngs(0)), 3)
    graphdef, params = nnx.split(layer)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 2)))
    key = jax.random.key(5)

    def f(params, x):
        y, final = nnx.merge(graphdef, params)(x, seq_lengths=jnp.asarray([4, 2]), deterministic=False,
                                               dropout_key=key)
        return jnp.sum(jnp.sin(y)) + sum(jnp.sum(v) for v in jax.tree.leaves(final))

    check_grads(f, (params, x), order=1, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)


def test_kernels_that_cannot_take_a_flag_say_which():
    spec = CellSpec(zoneout_h=0.1, layer_norm=True)
    for impl in ("native", "pallas"):
        why = kernels.impl_unsupported(impl, spec, 8)
        assert f"impl={impl!r} does not implement layer_norm=True, zoneout_h=0.1 inside its recurrence" in why
    for impl in ("scan", "scan_vjp"):
        assert kernels.impl_unsupported(impl, spec, 8) is None
    assert kernels.resolve_impl("auto", spec, "cpu", hidden_size=8) == "scan_vjp"  # native cannot: the next
    assert kernels.resolve_impl("auto", CellSpec(family="gru", zoneout_h=0.1), "cpu", hidden_size=8) == "scan"
    with pytest.raises(ValueError, match="does not implement zoneout_h=0.1"):
        lstm_lab.RNN(2, 8, CellSpec(zoneout_h=0.1), impl="pallas", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("remat", [False, True])
@pytest.mark.parametrize("name", ["layer_norm", "all+fgr", "all+nig+noaf"])
def test_scan_vjp_gradients_equal_the_scan(name, remat):
    """scan_vjp's hand-written backward with the in-step regularization: every gradient (parameters, input,
    initial carry) equal to autodiff of the scan, in training (the same masks) and evaluation, float64."""
    spec = SPECS[name]
    key = jax.random.key(2)
    grads = {}
    for impl in ("scan", "scan_vjp"):
        layer, x, carry = _case(spec, seed=3, impl=impl)
        layer.remat = remat
        graphdef, params = nnx.split(layer)
        for det in (False, True):
            def f(p, x, c):
                y, fin = nnx.merge(graphdef, p)(x, seq_lengths=jnp.asarray(LENGTHS), initial_carry=c,
                                                deterministic=det, dropout_key=key)
                return jnp.sum(jnp.sin(y)) + sum(jnp.sum(jnp.cos(v)) for v in jax.tree.leaves(fin))

            grads[impl, det] = jax.grad(f, (0, 1, 2))(params, jnp.asarray(x), carry)
    for det in (False, True):
        for a, b in zip(jax.tree.leaves(grads["scan_vjp", det]), jax.tree.leaves(grads["scan", det])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)


def test_weight_drop_runs_on_every_kernel_and_equals_the_scan():
    """weight_drop masks R around the kernel: native and scan_vjp train with it, equal to the scan."""
    why = kernels.impl_unsupported("native", CellSpec(weight_drop=0.5), 4)  # builds the kernel: here, not at import
    if why:
        pytest.skip(why)
    spec = CellSpec(weight_drop=0.5)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 3)), jnp.float32)
    key = jax.random.key(3)
    out = {}
    for impl in ("scan", "scan_vjp", "native"):
        layer = randomize(lstm_lab.RNN(3, 4, spec, impl=impl, rngs=nnx.Rngs(0)), 1)
        graphdef, params = nnx.split(layer)
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x, deterministic=False, dropout_key=key)[0] ** 2)  # noqa
        out[impl] = (loss(params), jax.grad(loss)(params))
    for impl in ("scan_vjp", "native"):
        for a, b in zip(jax.tree.leaves(out[impl]), jax.tree.leaves(out["scan"])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_a_vmapped_population_equals_its_members():
    """Members with their own parameters and keys, vmapped, give what each gives alone."""
    spec = VARIANTS["vanilla"].replace(**ALL_ON)
    layers = [randomize(lstm_lab.RNN(2, 3, spec, rngs=nnx.Rngs(i)), i) for i in range(3)]
    graphdef = nnx.split(layers[0])[0]
    params = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.split(layer)[1] for layer in layers])
    keys = jax.random.split(jax.random.key(0), 3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 2)), jnp.float32)
    run = lambda p, k: nnx.merge(graphdef, p)(x, deterministic=False, dropout_key=k)[0]  # noqa: E731
    pop = jax.vmap(run)(params, keys)
    for i, layer in enumerate(layers):
        np.testing.assert_allclose(np.asarray(pop[i]), np.asarray(layer(x, deterministic=False, dropout_key=keys[i])[0]),
                                   rtol=1e-5, atol=1e-6)


def test_bfloat16_close_to_float32():
    spec = VARIANTS["vanilla"].replace(**ALL_ON)
    layer32 = randomize(lstm_lab.RNN(3, 8, spec, rngs=nnx.Rngs(0)), 1)
    layer16 = randomize(lstm_lab.RNN(3, 8, spec, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), 1)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 3)), jnp.float32)
    for det in (True, False):
        y32 = layer32(x, deterministic=det, dropout_key=jax.random.key(1))[0]
        y16 = layer16(x, deterministic=det, dropout_key=jax.random.key(1))[0]
        assert y16.dtype == jnp.bfloat16
        assert float(jnp.abs(y16.astype(jnp.float32) - y32).max()) < 0.05


def test_layer_norm_parameters_are_pinned_and_start_as_plain_normalization():
    assert param_shapes(CellSpec(layer_norm=True, peepholes=True), 3, 2) == {
        "W": (3, 8), "R": (2, 8), "b": (8,), "p_i": (2,), "p_f": (2,), "p_o": (2,),
        "ln_x_g": (8,), "ln_h_g": (8,), "ln_c_g": (2,), "ln_c_b": (2,)}
    cell = lstm_lab.RNN(3, 2, "ln_lstm", rngs=nnx.Rngs(0)).cells[0][0]
    assert np.all(np.asarray(cell.ln_x_g[...]) == 1) and np.all(np.asarray(cell.ln_c_b[...]) == 0)
    # the trace's y is o * tanh(LN(c)) with unit gain
    layer = randomize(lstm_lab.RNN(3, 4, "ln_lstm", param_dtype=jnp.float64, rngs=nnx.Rngs(0)), 2)
    layer.cells[0][0].ln_c_g[...] = jnp.ones(4, jnp.float64)
    layer.cells[0][0].ln_c_b[...] = jnp.zeros(4, jnp.float64)
    tr = lstm_lab.gate_trace(layer, jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 3))))
    c = np.asarray(tr["c"])
    ln = (c - c.mean(-1, keepdims=True)) / np.sqrt(c.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(np.asarray(tr["y"]), np.tanh(ln) * np.asarray(tr["o"]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fields,pattern", [
    (dict(zoneout_c=1.0), r"zoneout_c is a rate in \[0, 1\); got 1.0"),
    (dict(weight_drop=True), r"weight_drop is a rate in \[0, 1\); got True"),
    (dict(family="gru", layer_norm=True), "layer_norm=True applies to lstm; it contradicts family='gru'"),
    (dict(family="gru", zoneout_c=0.1), "zoneout_c=0.1 applies to lstm; it contradicts family='gru'"),
    (dict(family="mingru", zoneout_h=0.1), "zoneout_h=0.1 applies to lstm, gru, mgu, rnn"),
    (dict(layer_norm=1), "layer_norm must be a bool"),
])
def test_bad_rates_and_flags_are_one_clear_line(fields, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        CellSpec(**fields)


def test_gate_trace_of_training_shows_the_masks():
    """With deterministic=False and a key, the trace is training's: where zoneout kept a unit, c and y are the
    previous step's exactly."""
    spec = CellSpec(zoneout_c=0.5, zoneout_h=0.5)
    layer = randomize(lstm_lab.RNN(2, 6, spec, param_dtype=jnp.float64, rngs=nnx.Rngs(0)), 1)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 2)))
    key = jax.random.key(4)
    tr = lstm_lab.gate_trace(layer, x, deterministic=False, dropout_key=key)
    n = layer.noise(key, 0, 0, 8, 3, jnp.float64)
    keep_c = np.asarray(n["zc_mask"]).transpose(1, 0, 2)[:, 1:] == 1  # [B, T-1, H]
    keep_h = np.asarray(n["zh_mask"]).transpose(1, 0, 2)[:, 1:] == 1
    c, y = np.asarray(tr["c"]), np.asarray(tr["y"])
    assert keep_c.any() and (~keep_c).any()
    np.testing.assert_array_equal(c[:, 1:][keep_c], c[:, :-1][keep_c])
    np.testing.assert_array_equal(y[:, 1:][keep_h], y[:, :-1][keep_h])
    y_train = layer(x, deterministic=False, dropout_key=key)[0]
    np.testing.assert_allclose(y, np.asarray(y_train), rtol=1e-12, atol=1e-12)
