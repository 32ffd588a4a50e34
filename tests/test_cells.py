"""The variant space: presets, validation, parameter layout."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

import lstm_lab
from lstm_lab import CellSpec, VARIANTS
from lstm_lab.cells import param_shapes, resolve_cell

PRESETS = ["lstm", "vanilla", "peephole", "nig", "nfg", "nog", "niaf", "noaf", "np", "cifg", "fgr",
           "gru", "mgu", "rnn", "ln_lstm", "slstm", "minlstm", "mingru"]


def test_the_eighteen_presets():
    assert list(VARIANTS) == PRESETS
    assert VARIANTS["peephole"] == VARIANTS["vanilla"]
    assert VARIANTS["np"] == VARIANTS["lstm"]
    assert VARIANTS["vanilla"].peepholes and not VARIANTS["lstm"].peepholes
    # Odyssey ablations are the vanilla baseline (with peepholes) minus one feature
    vanilla = VARIANTS["vanilla"]
    assert VARIANTS["nig"] == vanilla.replace(input_gate=False)
    assert VARIANTS["nfg"] == vanilla.replace(forget_gate=False)
    assert VARIANTS["nog"] == vanilla.replace(output_gate=False)
    assert VARIANTS["niaf"] == vanilla.replace(input_activation="identity")
    assert VARIANTS["noaf"] == vanilla.replace(output_activation="identity")
    assert VARIANTS["cifg"] == vanilla.replace(coupled=True)
    assert VARIANTS["fgr"] == vanilla.replace(full_gate_recurrence=True)


def test_specs_are_frozen_and_hashable():
    spec = VARIANTS["cifg"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.peepholes = False
    assert len({VARIANTS[p] for p in PRESETS}) == 16  # two aliases


# Written from the layout documented in lstm_lab.cells, at in=3, H=2.
EXPECTED_PARAMS = {
    "lstm": {"W": (3, 8), "R": (2, 8), "b": (8,)},
    "vanilla": {"W": (3, 8), "R": (2, 8), "b": (8,), "p_i": (2,), "p_f": (2,), "p_o": (2,)},
    "nig": {"W": (3, 6), "R": (2, 6), "b": (6,), "p_f": (2,), "p_o": (2,)},
    "nfg": {"W": (3, 6), "R": (2, 6), "b": (6,), "p_i": (2,), "p_o": (2,)},
    "nog": {"W": (3, 6), "R": (2, 6), "b": (6,), "p_i": (2,), "p_f": (2,)},
    "niaf": {"W": (3, 8), "R": (2, 8), "b": (8,), "p_i": (2,), "p_f": (2,), "p_o": (2,)},
    "noaf": {"W": (3, 8), "R": (2, 8), "b": (8,), "p_i": (2,), "p_f": (2,), "p_o": (2,)},
    "cifg": {"W": (3, 6), "R": (2, 6), "b": (6,), "p_i": (2,), "p_o": (2,)},
    "fgr": {"W": (3, 8), "R": (2, 8), "b": (8,), "p_i": (2,), "p_f": (2,), "p_o": (2,), "R_gates": (6, 6)},
    "gru": {"W": (3, 6), "R": (2, 6), "b": (6,)},
    "mgu": {"W": (3, 4), "R": (2, 4), "b": (4,)},
    "rnn": {"W": (3, 2), "R": (2, 2), "b": (2,)},
    "ln_lstm": {"W": (3, 8), "R": (2, 8), "b": (8,), "ln_x_g": (8,), "ln_h_g": (8,), "ln_c_g": (2,), "ln_c_b": (2,)},
    "slstm": {"W": (3, 8), "R": (2, 8), "b": (8,)},
    "minlstm": {"W": (3, 6), "b": (6,)},  # no R: the gates see x only
    "mingru": {"W": (3, 4), "b": (4,)},
}
EXPECTED_GATES = {"lstm": ("i", "f", "z", "o"), "nig": ("f", "z", "o"), "nfg": ("i", "z", "o"),
                  "nog": ("i", "f", "z"), "cifg": ("i", "z", "o"), "gru": ("r", "u", "n"), "mgu": ("f", "n"),
                  "rnn": ("h",), "slstm": ("i", "f", "z", "o"), "minlstm": ("f", "i", "n"), "mingru": ("z", "n")}


@pytest.mark.parametrize("preset", [p for p in PRESETS if p not in ("peephole", "np")])
def test_parameter_tree_is_pinned(preset):
    from flax import nnx
    assert param_shapes(VARIANTS[preset], 3, 2) == EXPECTED_PARAMS[preset]
    layer = lstm_lab.RNN(3, 2, preset, rngs=nnx.Rngs(0))
    cell = layer.cells[0][0]
    assert {k: v.shape for k, v in cell.params().items()} == EXPECTED_PARAMS[preset]
    state = nnx.state(layer, nnx.Param)
    paths = {"/".join(str(p) for p in path) for path, _ in nnx.to_flat_state(state)}
    assert paths == {f"cells/0/0/{k}" for k in EXPECTED_PARAMS[preset]}
    if preset in EXPECTED_GATES:
        assert VARIANTS[preset].gate_names() == EXPECTED_GATES[preset]


def test_gru_reset_after_has_recurrent_candidate_bias():
    assert param_shapes(CellSpec(family="gru", reset_after=True), 3, 2) == {
        "W": (3, 6), "R": (2, 6), "b": (6,), "b_hn": (2,)}


def test_every_consistent_flag_combination_is_a_valid_cell():
    n_ok = n_bad = 0
    for ig, fg, og, pe, co, fgr, g, h in itertools.product(
            [True, False], [True, False], [True, False], [True, False], [True, False], [True, False],
            ["tanh", "identity"], ["tanh", "identity"]):
        kwargs = dict(input_gate=ig, forget_gate=fg, output_gate=og, peepholes=pe, coupled=co,
                      full_gate_recurrence=fgr, input_activation=g, output_activation=h)
        contradictory = (co and not (ig and fg)) or ((pe or fgr) and not (ig or fg or og))
        if contradictory:
            with pytest.raises(ValueError):
                CellSpec(**kwargs)
            n_bad += 1
        else:
            spec = CellSpec(**kwargs)
            assert spec.num_params(4, 3) > 0
            n_ok += 1
    # of 64 flag sets: 24 couple without both gates, 3 more peep or recur with no gate at all
    assert n_bad == 27 * 4 and n_ok == 37 * 4


def test_contradiction_names_both_fields():
    with pytest.raises(ValueError, match=r"coupled=True.*input_gate=False"):
        CellSpec(coupled=True, input_gate=False)
    with pytest.raises(ValueError, match=r"coupled=True.*forget_gate=False"):
        CellSpec(coupled=True, forget_gate=False)
    with pytest.raises(ValueError, match=r"peepholes=True.*input_gate, forget_gate and output_gate"):
        CellSpec(input_gate=False, forget_gate=False, output_gate=False, peepholes=True)
    with pytest.raises(ValueError, match=r"peepholes=True.*family='gru'"):
        CellSpec(family="gru", peepholes=True)
    with pytest.raises(ValueError, match=r"reset_after=True.*family='lstm'"):
        CellSpec(reset_after=True)
    with pytest.raises(ValueError, match=r"full_gate_recurrence=True.*family='mgu'"):
        VARIANTS["mgu"].replace(full_gate_recurrence=True)


def test_bad_field_values():
    with pytest.raises(ValueError, match=r"unknown family 'lsmt'.*Did you mean 'lstm'"):
        CellSpec(family="lsmt")
    with pytest.raises(ValueError, match=r"input_activation='tahn'.*Did you mean 'tanh'"):
        CellSpec(input_activation="tahn")
    with pytest.raises(TypeError, match=r"peepholes must be a bool; got 1"):
        CellSpec(peepholes=1)


def test_unknown_preset_did_you_mean():
    with pytest.raises(ValueError, match=r"unknown cell preset 'vanila'.*Did you mean 'vanilla'"):
        resolve_cell("vanila")
    with pytest.raises(ValueError, match=r"unknown cell preset 'cifgg'.*Did you mean 'cifg'"):
        lstm_lab.RNN(2, 3, "cifgg", rngs=__import__("flax").nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"preset name or a CellSpec; got int"):
        resolve_cell(3)
    assert resolve_cell(" GRU ") == VARIANTS["gru"]


def test_names_and_descriptions():
    assert VARIANTS["peephole"].name == "vanilla"
    assert VARIANTS["np"].name == "lstm"
    odd = CellSpec(input_gate=False, full_gate_recurrence=True)
    assert odd.name == "lstm(input_gate=False, full_gate_recurrence=True)"
    assert CellSpec(**odd.flags()) == odd
