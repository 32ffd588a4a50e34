"""The benchmark scripts' pure parts (no timing is asserted anywhere)."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "layer_speed.py"


@pytest.fixture(scope="module")
def layer_speed():
    spec = importlib.util.spec_from_file_location("layer_speed", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(impl, cell, ms, T=100, B=32, H=128, dtype="float32"):
    return {"impl": impl, "cell": cell, "dtype": dtype, "T": T, "B": B, "H": H, "ms": ms}


def test_suggest_auto_picks_the_impl_fastest_in_most_groups(layer_speed):
    rows = [_row("torch", "lstm", 1.0)]  # references never count
    for H, (scan, vjp, pallas) in ((128, (10.0, 8.0, 4.0)), (1024, (50.0, 40.0, 45.0))):
        for cell in ("lstm", "cifg"):
            rows += [_row("scan", cell, scan, H=H), _row("scan_vjp", cell, vjp, H=H), _row("pallas", cell, pallas, H=H)]
    rows += [_row("scan", "gru", 10.0), _row("pallas", "gru", 5.0),
             _row("scan", "gru", 10.0, H=1024), _row("pallas", "gru", 25.0, H=1024),
             _row("scan", "rnn", 3.0)]  # one impl only: scan, the default
    table, lines = layer_speed.suggest_auto(rows, "gpu")
    # LSTM family: pallas fastest in 2 of 4 groups, scan_vjp in 2 of 4; the tie goes to the larger
    # geometric-mean speed-up over scan (pallas: sqrt(2.5 * 1.11) = 1.67 vs 1.25)
    assert table[("gpu", "lstm")] == "pallas"
    assert "fastest in 2/4" in lines[0] and "1.67x scan" in lines[0]
    assert "slower at 100/32/1024 float32 lstm, 100/32/1024 float32 cifg" in lines[0]
    # GRU: a tie of wins (1/2 each); pallas's geometric mean is sqrt(2 * 0.4) = 0.89x scan: scan
    assert table[("gpu", "gru")] == "scan"
    assert table[("gpu", "rnn")] == "scan" and "fastest in 1/1" in lines[2]
