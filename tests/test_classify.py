"""The classify task: the .ts reader, the stratified split, pooled metrics, a trained run, JapaneseVowels."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lstm_lab import tasks
from lstm_lab.config import Config, apply_overrides
from lstm_lab.tasks import classify
from lstm_lab.tasks.classify import ClassifyTask, read_ts, stratified_split

HEADER = ["@problemName toy", "@timeStamps false", "@missing false", "@univariate false", "@equalLength false"]


def _write(path, cases, classes=("up", "down"), header=None):
    """A .ts file of ``cases`` ([T, D] array, label) pairs; returns its path as a string."""
    lines = (HEADER + [f"@classLabel true {' '.join(classes)}", "@data"]) if header is None else header
    lines = lines + [":".join(",".join(f"{v:.6g}" for v in dim) for dim in np.asarray(x).T) + f":{label}"
                     for x, label in cases]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _ramps(n, seed):
    """``n`` two-dimensional cases of length 5..12: class up rises, class down falls (plus noise)."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        T, up = int(rng.integers(5, 13)), i % 2 == 0
        t = np.arange(T) * (0.3 if up else -0.3) + rng.normal()
        cases.append((np.stack([t, rng.normal(size=T)], 1) + 0.1 * rng.normal(size=(T, 2)), "up" if up else "down"))
    return cases


def _pair(tmp_path, train, test, classes=("up", "down")):
    _write(tmp_path / "toy_TEST.ts", test, classes)
    return _write(tmp_path / "toy_TRAIN.ts", train, classes)


# ---------------------------------------------------------------------------
# the reader
# ---------------------------------------------------------------------------
def test_read_ts_variable_length_multivariate(tmp_path):
    p = tmp_path / "v.ts"
    p.write_text("# a comment\n\n@problemName Toy\n@timeStamps false\n@missing false\n@univariate false\n"
                 "@dimensions 2\n@equalLength false\n@classLabel true b a\n@data\n"
                 "1,2,3:4,5,6:a\n\n  0.5, -1e-1 :2,3 : b \r\n7:8:a\n")
    xs, labels, meta = read_ts(p)
    assert [x.shape for x in xs] == [(3, 2), (2, 2), (1, 2)] and all(x.dtype == np.float32 for x in xs)
    np.testing.assert_array_equal(xs[0], [[1, 4], [2, 5], [3, 6]])
    np.testing.assert_allclose(xs[1], [[0.5, 2], [-0.1, 3]])
    assert labels == ["a", "b", "a"]
    assert meta == {"problem_name": "Toy", "classes": ["b", "a"], "dimensions": 2, "equal_length": False,
                    "series_length": None}


GOOD = HEADER + ["@classLabel true up down", "@data"]


@pytest.mark.parametrize("lines, match", [
    (HEADER + ["@classLabel true up down"], r"no @data line \(a \.ts file's header ends with @data\)"),
    (HEADER + ["@classLabel true up down", "1,2:up"], r"line 7 is neither a header .*, and no @data line came before"),
    (GOOD + ["1,2:up", "1,2:sideways"], r"unknown label 'sideways' in case 1 \(line 9\); @classLabel lists up down"),
    (GOOD + ["1,2,3:4,5:up"], r"case 0 \(line 8\): its dimensions differ in length \(3, 2\)"),
    (GOOD + ["1,2:up", "1,abc:down"], r"case 1 \(line 9\), dimension 0: 'abc' is not a number"),
    (GOOD + ["1,2:3,?:up"], r"case 0 \(line 8\), dimension 1: a missing value \('\?'; not supported\)"),
    (GOOD + ["1,NaN:up"], r"case 0 \(line 8\), dimension 0: a missing value \('NaN'; not supported\)"),
    (GOOD + ["1,,2:up"], r"case 0 \(line 8\), dimension 0: an empty value"),
    (GOOD + ["1,inf:up"], r"'inf' is not finite"),
    (GOOD + ["1,2:3,4:up", "1,2:down"], r"case 1 \(line 9\) has 1 dimensions; case 0 has 2"),
    (["@timeStamps true", "@classLabel true up down", "@data", "(0,1):up"], r"@timeStamps true is not supported"),
    (["@classLabel false", "@data", "1,2:up"], r"classify needs '@classLabel true' and the class labels"),
    (["@problemName x", "@data", "1,2:up"], r"no '@classLabel true c1 c2 \.\.\.' line before @data"),
    (["@dimensions 3", "@classLabel true up", "@data", "1,2:up"], r"@dimensions 3 but the cases have 1"),
    (GOOD, r"no cases after @data"),
])
def test_read_ts_bad_input_is_one_line(tmp_path, lines, match):
    p = tmp_path / "bad.ts"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=match) as e:
        read_ts(p)
    assert str(e.value).startswith(f"classify: {str(p)!r}: ") and "\n" not in str(e.value)


def test_read_ts_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"^classify: '.*nope_TRAIN\.ts' does not exist \(a UEA/UCR \.ts file\)\.$"):
        read_ts(tmp_path / "nope_TRAIN.ts")


# ---------------------------------------------------------------------------
# the split and the task's options
# ---------------------------------------------------------------------------
def test_stratified_split_is_seeded_and_covers_every_case_once():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 1 + [0] * 4)
    tr, va = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(len(labels)))
    assert [int(np.sum(labels[va] == c)) for c in range(3)] == [3, 1, 0]  # round(0.2 n_c); the single 2 stays
    again, other = stratified_split(labels, 0.2, seed=3), stratified_split(labels, 0.2, seed=4)
    assert np.array_equal(again[1], va) and not np.array_equal(other[1], va)


def test_task_splits_standardizes_and_describes(tmp_path):
    train, test = _ramps(20, 0), _ramps(6, 1)
    path = _pair(tmp_path, train, test)
    raw = ClassifyTask(path, standardize=False, valid_fraction=0.2, seed=1)
    assert raw.split_sizes() == {"train": 16, "valid": 4, "test": 6}
    seen = sorted(x.tobytes() for s in ("train", "valid") for x, _ in raw.data[s])
    assert seen == sorted(x.tobytes() for x in read_ts(path)[0])  # every case of the training file once
    assert all(np.array_equal(y, np.full(len(x), c)) for s in ("train", "valid", "test")
               for (x, y), c in zip(raw.data[s], raw.labels[s]))
    task = tasks.get("classify", path=path, seed=1)
    frames = np.concatenate([x for x, _ in task.data["train"]])
    np.testing.assert_allclose(frames.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(frames.std(0), 1, atol=1e-5)
    info = task.describe()
    assert info["classes"] == 2 and info["dimensions"] == 2 and info["output_size"] == 2
    assert info["class_counts"] == {"train": {"up": 8, "down": 8}, "valid": {"up": 2, "down": 2},
                                    "test": {"up": 3, "down": 3}}
    base = task.baseline
    assert base["accuracy"] == 0.5 and base["balanced_accuracy"] == 0.5 and base["loss"] == pytest.approx(np.log(2))
    assert {"logreg_accuracy", "logreg_macro_f1", "logreg_balanced_accuracy"} <= set(base)
    b = task.eval_batches("test", 4)[1]
    assert task.format_example(b, 0).endswith("steps of 2 dimensions") and "filler" in task.format_example(b, 3)


def test_numpy_logistic_regression_agrees_with_scikit_learn():
    pytest.importorskip("sklearn")
    rng = np.random.default_rng(0)
    X = rng.normal(size=(90, 4)) + np.repeat(np.eye(3, 4) * 3, 30, axis=0)
    y = np.repeat(np.arange(3), 30)
    assert np.mean(classify._softmax_regression(X, y, 3)(X) == classify._logistic_predict(X, y, X, 3)) >= 0.97


@pytest.mark.parametrize("options, match", [
    ({"dataset": "JapaneseVowels", "path": "x_TRAIN.ts"}, r"give path or dataset, not both"),
    ({"dataset": "Nope"}, r"unknown dataset 'Nope'; bundled: JapaneseVowels"),
    ({"pool": "max"}, r"pool must be 'last' or 'mean'; got 'max'"),
    ({"valid_fraction": 1.0}, r"valid_fraction must be in \(0, 1\); got 1.0"),
    ({"valid_fraction": 0.01}, r"valid_fraction=0.01 leaves the valid split of '.*toy_TRAIN.ts' \(20 cases\) empty"),
    ({"test_path": "x"}, r"'x' does not exist"),
])
def test_task_bad_options_are_one_line(tmp_path, options, match):
    opts = {"path": _pair(tmp_path, _ramps(20, 0), _ramps(4, 1)), **options}
    if "dataset" in options and options["dataset"] != "JapaneseVowels":
        opts.pop("path")
    with pytest.raises(ValueError, match=f"^classify: {match}") as e:
        ClassifyTask(**opts)
    assert "\n" not in str(e.value)


def test_task_bad_files_are_one_line(tmp_path, monkeypatch):
    single = _write(tmp_path / "single.ts", _ramps(4, 0))
    with pytest.raises(ValueError, match=r"has no _TRAIN in its name .*: pass test_path"):
        ClassifyTask(single)
    up_only = [c for c in _ramps(20, 0) if c[1] == "up"]
    with pytest.raises(ValueError, match=r"class 'down' is in '.*toy_TEST.ts' but not in the train split"):
        ClassifyTask(_pair(tmp_path, up_only, _ramps(4, 1)))
    _write(tmp_path / "other_TEST.ts", _ramps(4, 1), classes=("up", "down", "flat"))
    with pytest.raises(ValueError, match=r"has classes up down flat and 2 dimensions; .* has up down and 2"):
        ClassifyTask(_write(tmp_path / "other_TRAIN.ts", _ramps(20, 0)))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"^classify: dataset='JapaneseVowels' reads the copy bundled with sktime: "
                                         r"pip install 'lstm_lab\[classify\]'$"):
        ClassifyTask()


# ---------------------------------------------------------------------------
# pooled metrics against numpy
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("pool", ["last", "mean"])
def test_metric_sums_and_summarize_match_numpy(tmp_path, pool):
    cases = [(np.ones((3, 1)), c) for c in ("a", "b", "a", "b")]
    _write(tmp_path / "t_TEST.ts", cases, classes=("a", "b", "c"))
    task = ClassifyTask(_write(tmp_path / "t_TRAIN.ts", cases, classes=("a", "b", "c")), pool=pool,
                        valid_fraction=0.5)
    rng = np.random.default_rng(0)
    lengths, labels = np.array([5, 2, 3, 1, 4, 0]), np.array([0, 1, 1, 0, 0, 0])  # the last row: a filler
    logits = rng.normal(size=(6, 5, 3)).astype(np.float32)
    logits[..., 2] = -10.0  # class c: never predicted, never present -> left out of macro-F1
    logits[5] = 50.0 * np.array([0, 1, 0])  # the filler row would be a confident mistake
    weights = (np.arange(5) < lengths[:, None]).astype(np.float32)
    batch = {"targets": np.repeat(labels[:, None], 5, 1).astype(np.int32), "weights": weights,
             "inputs": np.zeros((6, 5, 1), np.float32), "lengths": np.maximum(lengths, 1).astype(np.int32)}

    # by hand, over the 5 real rows
    pooled = np.array([logits[r, n - 1] if pool == "last" else logits[r, :n].mean(0)
                       for r, n in enumerate(lengths[:5])], np.float64)
    logp = pooled - np.log(np.exp(pooled).sum(1, keepdims=True))
    ce = -logp[np.arange(5), labels[:5]]
    pred, y = pooled.argmax(1), labels[:5]
    f1 = [2 * np.sum((pred == c) & (y == c)) / (np.sum(pred == c) + np.sum(y == c)) for c in (0, 1)]

    sums = jax.jit(task.metric_sums)(jnp.asarray(logits), {k: jnp.asarray(v) for k, v in batch.items()})
    assert all(v.shape == (6,) for v in sums.values()) and set(sums) == {
        "loss_sum", "weight", "correct", *(f"{k}{c}" for k in ("tp", "fp", "fn") for c in range(3))}
    np.testing.assert_array_equal(sums["weight"], [1, 1, 1, 1, 1, 0])
    assert all(float(v[5]) == 0 for v in sums.values())
    got = task.summarize_batches([sums])
    assert got["loss"] == pytest.approx(ce.mean(), rel=1e-5)
    assert got["accuracy"] == pytest.approx(np.mean(pred == y)) and got["error"] == pytest.approx(1 - got["accuracy"])
    assert got["macro_f1"] == pytest.approx(np.mean(f1))
    assert float(task.loss(jnp.asarray(logits), batch)) == pytest.approx(ce.mean(), rel=1e-5)
    # vmapped over members (a population), each member scores as alone
    twice = jax.vmap(task.metric_sums)(jnp.stack([logits, logits[::-1]]), {k: jnp.stack([v, v[::-1]])
                                                                           for k, v in batch.items()})
    np.testing.assert_allclose(twice["loss_sum"][0], sums["loss_sum"], rtol=1e-6)
    np.testing.assert_allclose(twice["correct"][1], sums["correct"][::-1])


# ---------------------------------------------------------------------------
# training, and the bundled dataset
# ---------------------------------------------------------------------------
@pytest.mark.integration  # a whole run
def test_an_lstm_learns_rising_versus_falling(tmp_path):
    from lstm_lab.training import train

    path = _pair(tmp_path, _ramps(96, 0), _ramps(40, 1))
    cfg = apply_overrides(Config(), {"task.name": "classify", "task.options": {"path": path},
                                     "model.hidden_size": 16, "optim.name": "adam", "optim.learning_rate": 1e-2,
                                     "train.batch_size": 16, "train.steps": 150, "train.eval_every": 50,
                                     "train.log_every": 50})
    s = train(cfg, tmp_path / "run", quiet=True)
    assert s["status"] == "completed" and s["test"]["accuracy"] >= 0.9, s["test"]
    assert set(s["test"]) >= {"loss", "accuracy", "error", "macro_f1"}


def test_japanese_vowels():
    pytest.importorskip("sktime")
    task = tasks.get("classify", dataset="JapaneseVowels")
    assert task.output_size == 9 and task.input_size == 12 and task.options["dataset"] == "JapaneseVowels"
    sizes = task.split_sizes()
    assert sizes["train"] + sizes["valid"] == 270 and sizes["test"] == 370
    lengths = [len(x) for s in ("train", "valid", "test") for x, _ in task.data[s]]
    assert (min(lengths), max(lengths)) == (7, 29)
    assert task.describe()["class_counts"]["valid"] == {str(c): 6 for c in range(1, 10)}


def test_the_command_line_describes_and_trains_a_ts_file_of_ones_own(tmp_path, capsys):
    """`lstm-lab data classify --path` and `lstm-lab train` on an experiment that names a .ts file."""
    import json

    from lstm_lab import cli

    path = _pair(tmp_path, _ramps(48, 0), _ramps(20, 1))
    assert cli.main(["data", "classify", "--path", path]) == 0
    out = capsys.readouterr().out
    assert "2 classes, cases per class: train up:19 down:19 | valid up:5 down:5 | test up:10 down:10" in out
    exp = tmp_path / "my_exp.py"
    exp.write_text(f'overrides = {{"task.name": "classify", "task.options": {{"path": {path!r}}}, '
                   f'"model.hidden_size": 8, "train.batch_size": 8, "train.steps": 10, "train.eval_every": 5}}\n')
    assert cli.main(["train", str(exp), "--workdir", str(tmp_path / "run"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 10 and "macro_f1" in summary["test"] and "logreg_accuracy" in summary["baseline"]
    assert cli.main(["data", "classify", "--path", str(tmp_path / "nope_TRAIN.ts")]) == 2
    assert "classify: '" in capsys.readouterr().err
