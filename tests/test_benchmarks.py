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


def test_gpu_summary_takes_ratios_within_a_run_and_only_from_torch_on_cuda(tmp_path, capsys):
    """benchmarks/gpu_summary.py (the README's GPU tables): a run whose torch ran on the CPU gives no cuDNN
    ratio, and a ratio never mixes two runs."""
    import json

    spec = importlib.util.spec_from_file_location("gpu_summary", _PATH.parent / "gpu_summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    shape = dict(T=128, B=16, H=256)
    cpu_torch = {"machine": {"torch_device": "cpu"},
                 "rows": [_row("torch", "lstm", 12.0, **shape), _row("pallas", "lstm", 2.0, **shape),
                          _row("scan_vjp", "lstm", 3.0, **shape), _row("flax", "lstm", 6.0, **shape)]}
    cuda = {"machine": {"torch_device": "cuda", "device_kind": "GPU", "repeats": 20},
            "rows": [_row("torch", "lstm", 5.0, **shape), _row("pallas", "lstm", 2.5, **shape)]}
    paths = []
    for name, d in (("a.json", cpu_torch), ("b.json", cuda)):
        paths.append(str(tmp_path / name))
        pathlib.Path(paths[-1]).write_text(json.dumps(d))
    mod.main(paths)
    out = capsys.readouterr().out
    assert "| 128/16/256 | 2.5 / 5 (2.00) | - | - | - | b.json |" in out  # not 12 / 2.0 from the CPU torch
    assert "| 128/16/256 | 2 | 3 | - | 6 | - | - | - | a.json |" in out  # the run with more columns
