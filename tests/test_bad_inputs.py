"""Every bad input is one clear line: the table of what a user can get wrong, the exit code, a phrase of the
message, and that nothing was written.

Each row runs ``lstm-lab`` in-process (``lstm_lab.cli.main``) in an empty working directory; the inputs it
needs (experiment and study files, a text file, a directory) live in a separate directory.
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import pytest
from flax import nnx

import lstm_lab
from lstm_lab.cli import main

REPO = pathlib.Path(__file__).resolve().parents[1]
COPY = str(REPO / "experiments" / "copy.py")
CHAR = str(REPO / "experiments" / "char_lm.py")
WORD = str(REPO / "experiments" / "word_lm.py")


def _train(*sets, exp=COPY):
    args = ["train", exp, "--workdir", "run", "--quiet"]
    for s in sets:
        args += ["--set", s]
    return args


# (id, argv (with {inputs} standing for the inputs directory), exit code, a phrase of the message on stderr)
ROWS = [
    ("hidden_size=0", _train("model.hidden_size=0"), 2, "model.hidden_size must be an integer >= 1; got 0"),
    ("hidden_size<0", _train("model.hidden_size=-4"), 2, "model.hidden_size must be an integer >= 1; got -4"),
    ("embed_dim=-1", _train("model.embed_dim=-1"), 2, "model.embed_dim must be an integer >= 0"),
    ("steps=0", _train("train.steps=0"), 2, "train.steps must be an integer >= 1; got 0"),
    ("max_minutes=-1", _train("train.max_minutes=-1"), 2, "train.max_minutes must be a finite number of minutes"),
    ("clip_norm=-1", _train("optim.clip_norm=-1"), 2, "optim.clip_norm must be a finite number > 0, or 0 (off)"),
    ("b1=2.0", _train("optim.b1=2.0"), 2, "optim.b1 must be in [0, 1); got 2.0"),
    ("lr=1e400", _train("optim.learning_rate=1e400"), 2, "optim.learning_rate must be a finite number > 0; got inf"),
    ("lr=nan", _train("optim.learning_rate=nan"), 2, "optim.learning_rate must be a finite number > 0; got nan"),
    ("lr=0", _train("optim.learning_rate=0"), 2, "optim.learning_rate must be a finite number > 0; got 0.0"),
    ("dropout=1", _train("model.dropout=1"), 2, "model.dropout must be in [0, 1); got 1.0"),
    ("train.lr", _train("train.lr=0.1"), 2, "unknown key 'train.lr'. Did you mean 'optim.learning_rate'?"),
    ("train.learning_rate", _train("train.learning_rate=0.1"), 2, "Did you mean 'optim.learning_rate'?"),
    ("optim.name typo", _train("optim.name=adamm"), 2,
     "optim.name='adamm' is not one of sgd, adam, adamw, rmsprop. Did you mean 'adam'?"),
    ("model.dtype typo", _train("model.dtype=bf16"), 2, "model.dtype='bf16' is not one of float32, bfloat16, float64"),
    ("model.impl typo", _train("model.impl=fast"), 2, "model.impl='fast' is not one of auto, scan, scan_vjp, pallas"),
    ("scan_vjp on a GRU", _train("model.impl=scan_vjp", "model.cell=gru"), 2,
     "impl='scan_vjp' supports the LSTM family"),
    ("cell typo", _train("model.cell=vanila"), 2, "unknown cell preset 'vanila'"),
    ("chrono_init=1", _train("model.chrono_init=1.5"), 2, "chrono_init is T_max"),
    ("tie_weights size", _train("task.options.path={inputs}/text.txt", "model.tie_weights=True", "model.embed_dim=7",
                                exp=CHAR), 2, "model.tie_weights needs embed_dim == the RNN output size"),
    ("char_lm path is a directory", _train("task.options.path={inputs}", exp=CHAR), 2,
     "is a directory; expected a text file"),
    ("word_lm path is a file", _train("task.options.path={inputs}/text.txt", exp=WORD), 2,
     "is not a directory"),
    ("char_lm seq_len too long", _train("task.options.path={inputs}/text.txt", "task.options.seq_len=5000",
                                        exp=CHAR), 2, "cannot fill one window"),
    ("unknown task option", _train("task.options.TT=5"), 2, "TT"),
    ("experiment file syntax error", ["train", "{inputs}/broken.py", "--workdir", "run"], 2,
     "broken.py:3: SyntaxError"),
    ("experiment file raises", ["train", "{inputs}/raises.py", "--workdir", "run"], 2,
     "raises.py:2: ZeroDivisionError"),
    ("experiment file missing", ["train", "{inputs}/nope.py", "--workdir", "run"], 2, "does not exist"),
    ("study file syntax error", ["sweep", "{inputs}/broken_study.py", "--dir", "study"], 2,
     "broken_study.py:3: SyntaxError"),
    ("study base adamm", ["sweep", "{inputs}/bad_base_study.py", "--dir", "study"], 2,
     "optim.name='adamm' is not one of"),
    ("study space out of range", ["sweep", "{inputs}/bad_space_study.py", "--dir", "study"], 2,
     "optim.b1"),
    ("sample --length -5", ["sample", "run", "--length", "-5"], 2, "--length: must be an integer >= 1; got -5"),
    ("sample --temperature 0", ["sample", "run", "--temperature", "0"], 2, "--temperature: must be a finite number"),
    ("sample from no run", ["sample", "run"], 2, "is not a run directory"),
    ("demo --steps 0", ["demo", "--steps", "0"], 2, "--steps: must be an integer >= 1; got 0"),
    ("data: unknown task", ["data", "coppy"], 2, "Did you mean 'copy'"),
    ("music: missing file", ["data", "music", "--path", "{inputs}/none.json"], 2, "none.json' does not exist"),
    ("music: pitch out of range", ["data", "music", "--path", "{inputs}/bad_music.json"], 2,
     "train piece 0, step 1: pitch 12 is outside the piano's MIDI 21..108"),
    ("--import of no module", ["data", "copy", "--import", "no_such_tasks_module"], 2,
     "--import 'no_such_tasks_module': No module named"),
    ("eval_every_epochs on a stream", _train("train.eval_every_epochs=1"), 2,
     "train.eval_every_epochs=1.0 needs a task of a finite set of sequences"),
    ("status of no study", ["status", "study"], 2, "is not a study directory"),
]

TINY_STUDY = """\
from lstm_lab.sweep import *
study = Study(name="bad", base={base!r}, variants=("vanilla", "nfg"), space={space}, trials_per_variant=2)
"""


@pytest.fixture
def inputs(tmp_path):
    d = tmp_path / "inputs"
    d.mkdir()
    (d / "text.txt").write_text("to be or not to be, that is the question\n" * 40)
    (d / "bad_music.json").write_text('{"train": [[[60], [12]]], "valid": [[[60], [62]]], "test": [[[60], [62]]]}')
    (d / "broken.py").write_text("overrides = {\n    'model.hidden_size': 8,\n    'train.steps' 5,\n}\n")
    (d / "raises.py").write_text("x = 1\ny = x / 0\noverrides = {}\n")
    (d / "broken_study.py").write_text("from lstm_lab.sweep import *\n\nstudy = Study(name='x' base={})\n")
    (d / "bad_base_study.py").write_text(TINY_STUDY.format(
        base={"optim.name": "adamm", "model.dtype": "bf16", "train.steps": 0}, space="{}"))
    (d / "bad_space_study.py").write_text(TINY_STUDY.format(
        base={"task.options": {"T": 2}, "model.hidden_size": 8},
        space="{'optim.b1': Uniform(0.5, 1.5)}"))
    return d


@pytest.mark.parametrize("argv, code, phrase", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_one_clear_line_and_writes_nothing(argv, code, phrase, inputs, tmp_path, monkeypatch, capsys):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = [a.replace("{inputs}", str(inputs)) for a in argv]
    try:
        got = main(argv)
    except SystemExit as e:  # argparse's own errors
        got = e.code
    err = capsys.readouterr().err
    assert got == code, err
    assert phrase in err, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("usage:")
             and not ln.startswith("  ") and "warning" not in ln.lower()]
    assert len(lines) == 1, err
    assert sorted(p.name for p in work.iterdir()) == [], "a bad input wrote files"
    assert sorted(p.name for p in inputs.iterdir()) == sorted(
        ["text.txt", "broken.py", "raises.py", "broken_study.py", "bad_base_study.py", "bad_space_study.py", "bad_music.json"])


@pytest.mark.parametrize("kwargs, phrase", [
    (dict(dtype=jnp.int32), "dtype must be a floating-point dtype"),
    (dict(param_dtype=jnp.int8), "param_dtype must be a floating-point dtype"),
    (dict(impl="fast"), "unknown impl 'fast'"),
    (dict(chrono_init=1.0), "must be > 2"),
])
def test_layer_refuses_what_it_cannot_compute(kwargs, phrase):
    with pytest.raises((TypeError, ValueError), match=None) as e:
        lstm_lab.RNN(2, 3, "lstm", rngs=nnx.Rngs(0), **kwargs)
    assert phrase in str(e.value)


def test_seq_lengths_under_jit_are_checked_in_debug_mode():
    from lstm_lab.recurrent import debug_checks

    layer = lstm_lab.RNN(2, 3, "lstm", rngs=nnx.Rngs(0))
    x = jnp.ones((2, 4, 2), jnp.float32)
    with pytest.raises(ValueError, match=r"seq_lengths must be in 1..T = 1..4; got 5"):
        layer(x, seq_lengths=jnp.array([5, 2]))  # concrete: checked on the host
    before = debug_checks()
    try:
        debug_checks(False)
        fn = nnx.jit(lambda m, x, s: m(x, seq_lengths=s)[0])
        assert fn(layer, x, jnp.array([5, 0])).shape == (2, 4, 3)  # traced: not checked (documented)
        debug_checks(True)
        fn = nnx.jit(lambda m, x, s: m(x, seq_lengths=s)[0])
        with pytest.raises(Exception, match=r"seq_lengths must be in 1..T = 1..4; got 5"):
            fn(layer, x, jnp.array([5, 0])).block_until_ready()
        assert fn(layer, x, jnp.array([4, 1])).shape == (2, 4, 3)
    finally:
        debug_checks(before)


def test_study_checks_every_variant_and_range_when_made():
    from lstm_lab.sweep import Study, StudyError, Uniform

    with pytest.raises(StudyError, match=r"optim.name='adamm'"):
        Study(name="x", base={"optim.name": "adamm", "model.dtype": "bf16", "train.steps": 0})
    with pytest.raises(StudyError, match=r"optim.b1"):
        Study(name="x", base={"model.hidden_size": 8}, variants=("vanilla",), baseline="vanilla",
              space={"optim.b1": Uniform(0.5, 1.5)})
    # a variant that cannot run the base config: scan_vjp is for the LSTM family
    with pytest.raises(StudyError, match=r"gru"):
        Study(name="x", base={"model.impl": "scan_vjp"}, variants=("vanilla", "gru"), baseline="vanilla")


def test_rules_between_fields_see_the_final_values_whatever_the_order():
    from lstm_lab.config import Config, apply_overrides

    base = apply_overrides(Config(), {"model.impl": "scan_vjp", "model.embed_dim": 64, "model.hidden_size": 256})
    # each override alone would break a rule with the other's old value; together they are valid
    cfg = apply_overrides(base, {"model.cell": "gru", "model.impl": "scan"})
    assert (cfg.model.cell, cfg.model.impl) == ("gru", "scan")
    cfg = apply_overrides(base, {"model.tie_weights": True, "model.embed_dim": 256})
    assert cfg.model.tie_weights and cfg.model.embed_dim == 256
    with pytest.raises(ValueError, match=r"model.tie_weights needs embed_dim == the RNN output size: embed_dim=7"):
        apply_overrides(base, {"model.tie_weights": True, "model.embed_dim": 7})


def test_config_sections_refuse_direct_construction_too():
    from lstm_lab.config import ModelConfig, OptimConfig, TrainConfig

    with pytest.raises(ValueError, match=r"optim.name='adan'.*Did you mean 'adam'"):
        OptimConfig(name="adan")
    with pytest.raises(ValueError, match=r"train.max_minutes"):
        TrainConfig(max_minutes=-1)
    with pytest.raises(ValueError, match=r"model.hidden_size"):
        ModelConfig(hidden_size=0)
    with pytest.raises(TypeError, match=r"train.steps must be int; got 'many'"):
        TrainConfig(steps="many")
    assert OptimConfig(learning_rate=1).learning_rate == 1.0  # coerced to its type
