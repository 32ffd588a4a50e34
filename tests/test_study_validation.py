"""A study is checked where it is made: every variant on the base config and every end of every range must
be a valid training config; errors in study and experiment files are one line with file:line."""

from __future__ import annotations

import textwrap

import pytest

from lstm_lab import sweep
from lstm_lab.cli import main
from lstm_lab.sweep import Choice, IntUniform, LogUniform, OneMinusLogUniform, Study, StudyError, Uniform

from test_sweep import TINY, write_study


@pytest.mark.parametrize("kw, needles", [
    (dict(base={"optim.name": "adamm", "model.dtype": "bf16", "train.steps": 0}), ["base config", "optim.name", "adamm"]),
    (dict(base={**TINY, "model.dtype": "bf16"}), ["base config", "model.dtype", "bf16"]),
    (dict(base={**TINY, "train.steps": 0}), ["base config", "train.steps", "got 0"]),
    (dict(space={"optim.momentum": Uniform(0.5, 1.0)}), ["'optim.momentum'", "optim.momentum=1.0", "Narrow"]),
    (dict(space={"optim.learning_rate": Choice(1e-3, 0.0)}), ["optim.learning_rate=0.0"]),
    (dict(space={"model.hidden_size": Choice(8, "big")}), ["model.hidden_size='big'"]),
    (dict(space={"model.dropout": Uniform(0.0, 1.5)}), ["model.dropout=1.5"]),
    (dict(space={"model.hidden_size": IntUniform(0, 8)}), ["model.hidden_size=0"]),
    (dict(space={"optim.b1": OneMinusLogUniform(1e-3, 1.5)}), ["high <= 1"]),
])
def test_study_refuses_configs_its_trials_would_fail(kw, needles):
    args = {"name": "x", "base": TINY, "variants": ("vanilla", "nfg"), **kw}
    with pytest.raises(StudyError) as e:
        Study(**args)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg


def test_variant_refused_by_the_config_names_the_variant():
    # the base is fine for the LSTM variants, not for a GRU (scan_vjp is the LSTM family's)
    base = {**TINY, "model.impl": "scan_vjp"}
    Study(name="x", base=base, variants=("vanilla", "nfg"))
    with pytest.raises(StudyError) as e:
        Study(name="x", base=base, variants=("vanilla", "gru"))
    assert "study variant 'gru' with the base config" in str(e.value) and "scan_vjp" in str(e.value)


def test_nothing_is_written_for_an_invalid_study(tmp_path, capsys):
    f = write_study(tmp_path / "s.py", base={**TINY, "optim.name": "adamm"})
    sd = tmp_path / "st"
    assert main(["sweep", str(f), "--dir", str(sd)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optim.name" in err and "'adamm'" in err and f"{f}:2" in err, err
    assert not sd.exists()


@pytest.mark.parametrize("text, where, what", [
    ("from lstm_lab.sweep import *\nstudy = Study(name='x',\n", 2, "SyntaxError"),
    ("from lstm_lab.sweep import *\nx = 1\nstudy = Study(name='x', base=undefined_name)\n", 3, "NameError"),
    ("import json\n\n\nraise RuntimeError('boom')\n", 4, "RuntimeError: boom"),
])
def test_study_file_errors_are_one_line_at_file_and_line(tmp_path, capsys, text, where, what):
    f = tmp_path / "bad.py"
    f.write_text(text)
    with pytest.raises(StudyError) as e:
        sweep.load_study(f)
    msg = str(e.value)
    assert "\n" not in msg and f"{f}:{where}" in msg and what in msg, msg
    assert main(["sweep", str(f), "--dir", str(tmp_path / "st")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and f"{f}:{where}" in err, err


def test_experiment_file_used_as_base_errors_point_at_it(tmp_path):
    (tmp_path / "exp.py").write_text("overrides = {\n    'task.name': 'copy',\n    'model.hidden_size': 1 / 0,\n}\n")
    f = tmp_path / "s.py"
    f.write_text(textwrap.dedent("""\
        from lstm_lab.sweep import *
        study = Study(name='x', base='exp.py')
        """))
    with pytest.raises(StudyError) as e:
        sweep.load_study(f)
    msg = str(e.value)
    assert "\n" not in msg and "exp.py:3" in msg and "ZeroDivisionError" in msg and f"{f}:2" in msg, msg
    (tmp_path / "exp.py").write_text("overrides = {'task.name': 'copy'\n")
    with pytest.raises(StudyError, match=r"exp\.py:1.*SyntaxError"):
        sweep.load_study(f)
    (tmp_path / "exp.py").write_text("overrides = {'train.steps': 0}\n")
    with pytest.raises(StudyError, match="train.steps must be an integer >= 1; got 0"):
        sweep.load_study(f)


def test_shipped_studies_are_valid():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "experiments"
    for name in ("quick.py", "odyssey_copy.py", "odyssey_char_lm.py", "odyssey_jsb.py"):
        study = sweep.load_study(root / name)
        assert study.plan()
    Study(name="x", base=TINY, space={"optim.b1": OneMinusLogUniform(1e-3, 1.0)})  # b1 = 1 - x in [0, 0.999]
    assert LogUniform(1e-3, 1e-1).extremes() == [1e-3, 1e-1]
    assert OneMinusLogUniform(0.01, 1.0).extremes() == [0.99, 0.0]


def test_variant_overrides_per_variant_and_checked():
    """Per-variant settings (e.g. an equal-parameter hidden size per variant), checked like everything else, part of
    the study's identity only when given (an existing study keeps its fingerprint)."""
    plain = Study(name="v", base=TINY, variants=("vanilla", "nfg"))
    study = Study(name="v", base=TINY, variants=("vanilla", "nfg"),
                  variant_overrides={"nfg": {"model.hidden_size": 12}})
    assert study.config_for("nfg", {}, 0).model.hidden_size == 12
    assert study.config_for("vanilla", {}, 0).model.hidden_size == TINY["model.hidden_size"]
    assert study.config_for("nfg", {"model.hidden_size": 20}, 0).model.hidden_size == 20  # the space's value wins
    assert "variant_overrides" not in plain.record() and study.fingerprint() != plain.fingerprint()
    assert Study.from_record(study.record()).fingerprint() == study.fingerprint()
    with pytest.raises(StudyError, match="variant_overrides: 'nfgg' is not one of the variants vanilla, nfg"):
        Study(name="v", base=TINY, variants=("vanilla", "nfg"), variant_overrides={"nfgg": {}})
    with pytest.raises(StudyError, match="study variant 'nfg' with the base config: .*model.hiden_size"):
        Study(name="v", base=TINY, variants=("vanilla", "nfg"), variant_overrides={"nfg": {"model.hiden_size": 3}})
    with pytest.raises(StudyError, match=r"variant_overrides\['nfg'\] must be a dict of dotted config keys"):
        Study(name="v", base=TINY, variants=("vanilla", "nfg"), variant_overrides={"nfg": {"model.cell": "lstm"}})


def test_interleave_orders_the_plan_by_trial_index():
    study = Study(name="v", base=TINY, variants=("vanilla", "nfg"), trials_per_variant=3, interleave=True)
    assert [p["slot"] for p in study.plan()] == ["vanilla/0000", "nfg/0000", "vanilla/0001", "nfg/0001",
                                                 "vanilla/0002", "nfg/0002"]
    plain = Study(name="v", base=TINY, variants=("vanilla", "nfg"), trials_per_variant=3)
    assert [p["slot"] for p in plain.plan()][:2] == ["vanilla/0000", "vanilla/0001"]
    assert {p["slot"]: p["params"] for p in plain.plan()} == {p["slot"]: p["params"] for p in study.plan()}
    assert "interleave" not in plain.record() and Study.from_record(study.record()).interleave
