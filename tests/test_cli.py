"""The lstm-lab command line and the demo."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lstm_lab import VARIANTS
from lstm_lab.cli import main
from lstm_lab.demo import run_demo


def test_variants_lists_the_fourteen_presets(capsys):
    assert main(["variants"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {line.split()[0]: line for line in lines[2:]}
    assert list(rows) == list(VARIANTS) and len(rows) == 14
    # parameter count at in = hidden = 128: 4 blocks of (128*128 + 128*128 + 128), plus 3 peepholes
    assert "131,584" in rows["lstm"] and "131,968" in rows["vanilla"]
    assert "coupled=True" in rows["cifg"] and "gru" in rows["gru"].split()[1]


def test_unknown_command_and_bad_cell_fail_clearly(capsys):
    with pytest.raises(SystemExit):
        main(["varients"])
    with pytest.raises(SystemExit):
        main(["demo", "--cell", "lstn"])
    assert "Did you mean 'lstm'" in capsys.readouterr().err


def test_demo_loss_falls():
    logs = []
    history = run_demo("lstm", steps=300, length=20, hidden_size=32, log_every=50, print_fn=logs.append)
    assert len(history) == 6 and len(logs) == 7
    first, last = history[0][1], history[-1][1]
    assert first > 0.1 and last < 0.25 * first, history


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "lstm_lab.cli", "variants"], capture_output=True, text=True,
                         check=True).stdout
    assert "fgr" in out and "mgu" in out
