"""The layer against the float64 NumPy transcription of the equations (tests/reference.py)."""

from __future__ import annotations

import zlib
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lstm_lab
from lstm_lab import CellSpec, VARIANTS

from conftest import DISTINCT_PRESETS, carry_to_ref, layer_params, random_carry, randomize
import reference

# (batch_shape, T, F, H, num_layers, bidirectional, time_major, use_lengths, use_carry)
CONFIGS = {
    "1layer-lengths-carry": ((3,), 7, 4, 5, 1, False, False, True, True),
    "2axes-2layers-bidir-lengths": ((2, 3), 6, 3, 4, 2, True, False, True, True),
    "time-major-bidir": ((2,), 5, 3, 3, 1, True, True, False, False),
}


def _inputs(batch_shape, T, F, time_major, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, (*batch_shape, T, F))
    lengths = rng.integers(1, T + 1, batch_shape)
    lengths.flat[0] = T  # one full-length sequence
    return x, lengths


def check_against_reference(spec, config, *, dtype=jnp.float32, seed=0, rtol=1e-5, atol=1e-6):
    batch_shape, T, F, H, L, bidir, time_major, use_len, use_carry = config
    layer = lstm_lab.RNN(F, H, spec, num_layers=L, bidirectional=bidir, time_major=time_major,
                         param_dtype=dtype, rngs=nnx.Rngs(seed))
    randomize(layer, seed)
    x, lengths = _inputs(batch_shape, T, F, time_major, seed + 1)
    carry = random_carry(layer, batch_shape, seed + 2, dtype) if use_carry else None
    x_in = np.moveaxis(x, -2, 0) if time_major else x
    y, final = layer(jnp.asarray(x_in, dtype), seq_lengths=jnp.asarray(lengths) if use_len else None,
                     initial_carry=carry)
    B = math.prod(batch_shape)
    y_ref, fin_ref, _ = reference.run_layer(
        spec, layer_params(layer), x.reshape(B, T, F), lengths=lengths.reshape(B) if use_len else None,
        initial=carry_to_ref(carry, batch_shape) if use_carry else None)
    y = np.asarray(y, np.float64)
    if time_major:
        y = np.moveaxis(y, 0, -2)
    assert y.dtype == np.float64 and y.shape == (*batch_shape, T, H * (2 if bidir else 1))
    np.testing.assert_allclose(y.reshape(B, T, -1), y_ref, rtol=rtol, atol=atol)
    assert len(final) == L and all(len(f) == (2 if bidir else 1) for f in final)
    for li in range(L):
        for d in range(len(final[li])):
            state = final[li][d]
            assert type(state) is lstm_lab.cells.carry_type(spec)
            for k, v in state._asdict().items():
                assert v.shape[:-1] == batch_shape
                np.testing.assert_allclose(np.asarray(v, np.float64).reshape(B, -1), fin_ref[li][d][k],
                                           rtol=rtol, atol=atol, err_msg=f"final carry [{li}][{d}].{k}")
    if use_len:  # outputs past each end are exactly zero
        t = np.arange(T)
        past = t[None, :] >= lengths.reshape(B)[:, None]
        assert np.all(y.reshape(B, T, -1)[past] == 0)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("preset", DISTINCT_PRESETS)
def test_preset_matches_reference_float32(preset, config):
    check_against_reference(VARIANTS[preset], CONFIGS[config], seed=zlib.crc32(f"{preset}-{config}".encode()) % 1000)


def _random_specs(n, seed):
    """Random LSTM-family flag combinations (contradictory ones skipped)."""
    rng = np.random.default_rng(seed)
    specs = []
    while len(specs) < n:
        flags = dict(input_gate=bool(rng.random() < 0.7), forget_gate=bool(rng.random() < 0.7),
                     output_gate=bool(rng.random() < 0.7), peepholes=bool(rng.random() < 0.5),
                     coupled=bool(rng.random() < 0.3), full_gate_recurrence=bool(rng.random() < 0.4),
                     input_activation=str(rng.choice(["tanh", "identity", "relu"])),
                     output_activation=str(rng.choice(["tanh", "identity", "sigmoid"])))
        try:
            spec = CellSpec(**flags)
        except ValueError:
            continue
        if spec not in specs and spec not in VARIANTS.values():
            specs.append(spec)
    return specs


@pytest.mark.parametrize("spec", _random_specs(12, seed=2026), ids=lambda s: s.describe())
def test_random_flag_combination_matches_reference(spec):
    check_against_reference(spec, CONFIGS["2axes-2layers-bidir-lengths"], seed=7)


@pytest.mark.parametrize("spec", [VARIANTS["lstm"], VARIANTS["fgr"], VARIANTS["cifg"],
                                  CellSpec(family="gru", reset_after=True), VARIANTS["gru"],
                                  VARIANTS["mgu"], VARIANTS["rnn"]], ids=lambda s: s.name)
def test_float64_matches_reference_tightly(spec):
    check_against_reference(spec, CONFIGS["2axes-2layers-bidir-lengths"], dtype=jnp.float64, seed=3,
                            rtol=1e-12, atol=1e-13)


def test_gru_reset_after_matches_reference():
    check_against_reference(CellSpec(family="gru", reset_after=True), CONFIGS["1layer-lengths-carry"], seed=11)


@pytest.mark.parametrize("preset", ["vanilla", "fgr", "gru", "mgu"])
def test_gate_trace_matches_reference_on_upper_reverse_layer(preset):
    spec = VARIANTS[preset]
    batch_shape, T, F, H = (2, 2), 6, 3, 4
    layer = randomize(lstm_lab.RNN(F, H, spec, num_layers=2, bidirectional=True, param_dtype=jnp.float64,
                                   rngs=nnx.Rngs(0)), 5)
    x, lengths = _inputs(batch_shape, T, F, False, 9)
    carry = random_carry(layer, batch_shape, 4, jnp.float64)
    tr = lstm_lab.gate_trace(layer, jnp.asarray(x), layer_index=1, direction=1,
                             seq_lengths=jnp.asarray(lengths), initial_carry=carry)
    _, _, tr_ref = reference.run_layer(spec, layer_params(layer), x.reshape(4, T, F),
                                       lengths=lengths.reshape(4), initial=carry_to_ref(carry, batch_shape),
                                       want_trace=(1, 1))
    assert sorted(tr) == sorted(tr_ref) == sorted(lstm_lab.cells.trace_names(spec))
    for k in tr:
        assert tr[k].shape == (*batch_shape, T, H)
        np.testing.assert_allclose(np.asarray(tr[k]).reshape(4, T, H), tr_ref[k], rtol=1e-12, atol=1e-13,
                                   err_msg=k)
