"""The lstm-lab command line and the demo."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lstm_lab import VARIANTS
from lstm_lab.cli import main


def test_variants_lists_every_preset(capsys):
    assert main(["variants"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {line.split()[0]: line for line in lines[2:]}
    assert list(rows) == list(VARIANTS) and len(rows) == 18
    # parameter count at in = hidden = 128: 4 blocks of (128*128 + 128*128 + 128), plus 3 peepholes
    assert "131,584" in rows["lstm"] and "131,968" in rows["vanilla"]
    assert "coupled=True" in rows["cifg"] and "gru" in rows["gru"].split()[1]
    # sLSTM: 4 blocks like the LSTM; minLSTM: 3 blocks of (128*128 + 128), no R; minGRU: 2
    assert "132,864" in rows["ln_lstm"]  # lstm + 2 gains of 4*128 + the c-norm's gain and bias
    assert "131,584" in rows["slstm"] and "49,536" in rows["minlstm"] and "33,024" in rows["mingru"]


def test_unknown_command_and_bad_cell_fail_clearly(capsys):
    with pytest.raises(SystemExit):
        main(["varients"])
    with pytest.raises(SystemExit):
        main(["demo", "--cell", "lstn"])
    assert "Did you mean 'lstm'" in capsys.readouterr().err


@pytest.mark.integration  # end to end: whole runs or sweeps
def test_demo_trains_experiments_demo_py_and_the_loss_falls(tmp_path, capsys):
    assert main(["demo", "--steps", "300", "--length", "20", "--workdir", str(tmp_path / "demo")]) == 0
    out, err = capsys.readouterr()
    closing = out.strip().splitlines()[-1]  # the validation MSE against the baseline 1/6
    assert closing.startswith("done: validation MSE ") and "of the baseline 0.167" in closing, closing
    valid = float(closing.split()[3])
    assert valid < 0.5 / 6 and ("learned the task" in closing or "beats the baseline" in closing)
    assert "demo.py" in err and "step 300/300: valid" in err
    # a run like any other: the experiment file's config, with the flags as overrides
    run = json.loads((tmp_path / "demo" / "config.json").read_text())["config"]
    assert run["train"]["steps"] == 300 and run["task"]["options"]["T"] == 20 and run["model"]["hidden_size"] == 32
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"]
    assert len(losses) == 6 and losses[0] > 0.1 and losses[-1] < 0.25 * losses[0], losses


def test_preset_descriptions_state_only_flags_the_preset_has():
    """A description naming a flag value (``reset_after=True``) must match the preset, unless it is shown
    as another CellSpec (``CellSpec(family="gru", reset_after=True)``)."""
    import re

    from lstm_lab.cells import DESCRIPTIONS

    for name, spec in VARIANTS.items():
        text = re.sub(r"CellSpec\([^)]*\)", "", DESCRIPTIONS[name])
        for field, value in re.findall(r"(\w+)=(\w+)", text):
            if hasattr(spec, field):
                assert str(getattr(spec, field)) == value, (name, field, value, DESCRIPTIONS[name])


@pytest.mark.integration  # a fresh interpreter
def test_lazy_submodules_keep_import_light():
    code = ("import sys, lstm_lab; heavy = [m for m in ('optuna', 'pandas', 'matplotlib', 'orbax') if m in "
            "sys.modules]; assert not heavy, heavy; assert lstm_lab.tasks.get('copy', T=3).T == 3; "
            "assert lstm_lab.sweep.Study and lstm_lab.training.train and lstm_lab.interop.from_torch; "
            "assert 'tasks' in dir(lstm_lab)\n"
            "try:\n    lstm_lab.nope\nexcept AttributeError as e:\n    assert 'nope' in str(e)\n"
            "else:\n    raise SystemExit('lstm_lab.nope did not raise')")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.integration
def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "lstm_lab.cli", "variants"], capture_output=True, text=True,
                         check=True).stdout
    assert "fgr" in out and "mgu" in out
