"""The forecast task: reading a CSV series, chronological windows, scaling from train only, metrics in the series'
units, the three baselines, bad input in one line, training."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from lstm_lab import cli
from lstm_lab.tasks import forecast as fc
from lstm_lab.tasks.forecast import ForecastTask, read_series


def _csv(path, rows, header="time,load,temp"):
    path.write_text(header + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return path


def _series(n=200, seed=0):
    t = np.arange(n)
    rng = np.random.default_rng(seed)
    load = 10 + 0.05 * t + 2 * np.sin(2 * np.pi * t / 12) + 0.1 * rng.normal(size=n)
    temp = np.cos(2 * np.pi * t / 12) + 0.1 * rng.normal(size=n)
    return t, load, temp


def test_reads_a_csv_with_dates_and_checks_the_spacing(tmp_path):
    months = [f"{2000 + m // 12}-{m % 12 + 1:02d}-01" for m in range(30)]
    p = _csv(tmp_path / "m.csv", [(d, i, -i) for i, d in enumerate(months)])
    values, columns, targets, facts = read_series(p, "load")
    assert values.shape == (30, 2) and columns == ["load", "temp"] and targets == ["load"]
    assert facts["spacing"] == "1 months" and facts["start"].startswith("2000-01-01")
    days = _csv(tmp_path / "d.csv", [(f"2020-01-{d:02d}", d, 0) for d in range(1, 20)])
    assert read_series(days, "load,temp")[3]["spacing"] == "1 days"
    assert read_series(_csv(tmp_path / "n.csv", [(0.5 * i, i, 0) for i in range(9)]), "load")[3]["spacing"] == "0.5"


@pytest.mark.parametrize("rows, header, target, match", [
    ([(0, 1, 2), (1, 2, 3), (3, 4, 5)], None, "load", r"not regularly spaced: row 4 \(3\) follows row 3 \(1\) by 2"),
    ([("2020-01-01", 1, 2), ("2020-02-01", 2, 3), ("2020-04-01", 3, 4)], None, "load", r"row 4 \(2020-04-01"),
    ([(0, 1, 2), (1, "n/a", 3)], None, "load", r"row 3, column 'load': 'n/a' is not a finite number"),
    ([(0, 1, 2), (1, 2, 3)], None, "power", r"no column 'power' to forecast; its value columns: load, temp"),
    ([(0, 1, 2), (1, 2, 3)], "t,load,temp", "load", r"no time column 'time'"),
    ([(0, 1, 2), (1, 2)], None, "load", r"row 3 has 2 fields; the header has 3"),
    ([(0, 1, 2), ("May 3", 2, 3)], None, "load", r"time 'May 3' is neither a number nor an ISO date"),
    ([], None, "load", r"a header and no data rows"),
])
def test_bad_csv_is_one_line_naming_it(tmp_path, rows, header, target, match):
    p = _csv(tmp_path / "bad.csv", rows, header or "time,load,temp")
    with pytest.raises(ValueError, match=match) as e:
        kw = {"time": "time"} if header else {}
        read_series(p, target, **kw)
    assert "\n" not in str(e.value) and str(e.value).startswith("forecast: ")
    with pytest.raises(ValueError, match=r"forecast: '.*nowhere.csv' does not exist"):
        read_series(tmp_path / "nowhere.csv", "load")


def test_bad_options_are_one_line(tmp_path):
    t, load, temp = _series(60)
    p = _csv(tmp_path / "s.csv", zip(t, load, temp))
    with pytest.raises(ValueError, match=r"its valid split \(9 steps\) is shorter than context \+ horizon = 40"):
        ForecastTask(str(p), target="load", context=30, horizon=10)
    with pytest.raises(ValueError, match=r"season 12 is longer than the context 6"):
        ForecastTask(str(p), target="load", context=6, horizon=2, season=12)
    with pytest.raises(ValueError, match=r"give one of path, dataset or series; got path and dataset"):
        ForecastTask(str(p), target="load", dataset="co2")
    with pytest.raises(ValueError, match=r"unknown dataset 'co3'; the bundled ones are co2, sunspots"):
        ForecastTask(dataset="co3")
    with pytest.raises(ValueError, match=r"horizon must be a positive int; got 0"):
        ForecastTask(str(p), target="load", horizon=0)


def test_windows_are_chronological_and_scaling_comes_from_train_only(tmp_path):
    t, load, temp = _series(200)
    task = ForecastTask(str(_csv(tmp_path / "s.csv", zip(t, load, temp))), target="load", context=24, horizon=6)
    assert task.bounds == {"train": (0, 140), "valid": (140, 170), "test": (170, 200)}
    # every window lies inside its split: 140 - 30 + 1 train windows, 30 - 30 + 1 in valid and test
    assert task.split_sizes() == {"train": 111, "valid": 1, "test": 1}
    x, y, level = task._raw["test"]
    assert np.allclose(x[0, :, 0], load[170:194]) and np.allclose(y[0, :, 0], load[194:200])
    assert np.allclose(level[0], load[193])
    # changing the valid and test periods changes no scaling constant
    other = load.copy()
    other[140:] *= 3
    task2 = ForecastTask(str(_csv(tmp_path / "o.csv", zip(t, other, temp))), target="load", context=24, horizon=6)
    for name in ("x_mean", "x_std", "y_mean", "y_std", "mase_scale"):
        assert np.allclose(getattr(task, name), getattr(task2, name)), name
    # the scaled training inputs: relative to each window's last value, then standardised on train
    xs = np.stack([x for x, _ in task.data["train"]])
    assert np.allclose(xs.reshape(-1, 2).mean(0), 0, atol=1e-5) and np.allclose(xs.reshape(-1, 2).std(0), 1, atol=1e-4)


def test_metrics_are_in_the_series_units_and_skip_padding_and_fillers():
    rng = np.random.default_rng(1)
    series = np.cumsum(rng.normal(size=(150, 2)), axis=0) + 50
    task = ForecastTask(series=series, target="x0,x1", context=16, horizon=4, season=5)
    k, H = 2, 4
    batch = task.eval_batches("test", 32)[0]
    assert batch.inputs.shape[1] == 16 and int(batch.weights.sum(1).max()) == 16
    W = int((batch.weights.sum(1) > 0).sum())
    assert W == task.split_sizes()["test"] < 32  # filler rows follow
    out = rng.normal(size=(32, batch.inputs.shape[1], H * k)).astype(np.float32)
    m = task.summarize_batches([task.metric_sums(jnp.asarray(out), batch.arrays())])
    # by hand: the forecast is the output at step 16 (index 15), in original units
    _, y, level = task._raw["test"]
    fc_ = out[:W, 15].reshape(W, H, k) * task.y_std + task.y_mean + level[:, None, :]
    err = fc_ - y
    assert m["mae"] == pytest.approx(np.abs(err).mean(), rel=1e-5)
    assert m["rmse"] == pytest.approx(math.sqrt((err ** 2).mean()), rel=1e-5)
    assert m["mase"] == pytest.approx((np.abs(err) / task.mase_scale).mean(), rel=1e-5)
    assert m["smape"] == pytest.approx((200 * np.abs(err) / (np.abs(fc_) + np.abs(y))).mean(), rel=1e-5)
    assert m["loss"] == pytest.approx(((err / task.y_std) ** 2).mean(), rel=1e-5)
    train_t = series[:task.bounds["train"][1]]
    assert np.allclose(task.mase_scale, np.abs(train_t[5:] - train_t[:-5]).mean(0))


def test_baselines_are_exact_where_they_should_be():
    t = np.arange(300)
    periodic = np.sin(2 * np.pi * t / 7) + np.cos(2 * np.pi * t / 7 * 2)
    task = ForecastTask(series=periodic, context=21, horizon=10, season=7)
    assert task.baselines["seasonal_naive"]["mae"] < 1e-9          # a period-7 series: one season back is exact
    assert task.baselines["naive"]["mae"] > 0.3
    ar = np.zeros(300)
    ar[:2] = 1.0, 0.5
    for i in range(2, 300):
        ar[i] = 1.8 * ar[i - 1] - ar[i - 2] + 0.1               # a noise-free AR(2), undamped: linear in the context
    task = ForecastTask(series=ar, context=8, horizon=5, season=1)
    assert task.baselines["linear_ar"]["mae"] < 1e-4 * task.baselines["naive"]["mae"]
    b = task.baseline
    assert b["mae"] == task.baselines["naive"]["mae"] and b["linear_ar_mae"] == task.baselines["linear_ar"]["mae"]


def test_data_command_describes_the_series(tmp_path, capsys):
    t, load, temp = _series(120)
    p = _csv(tmp_path / "s.csv", zip(t, load, temp))
    assert cli.main(["data", "forecast", "--path", str(p), "--target", "load", "--context", "12",
                     "--horizon", "3"]) == 0
    out = capsys.readouterr().out
    assert "series: 120 steps, 0.0 .. 119.0, every 1; columns load, temp; forecast load" in out
    assert "steps per split: train 0..83 | valid 84..101 | test 102..119" in out
    assert "linear_ar on test: mae" in out and "seasonal_naive on test" in out
    assert cli.main(["data", "forecast", "--path", str(p), "--target", "watts"]) == 2
    assert "no column 'watts' to forecast" in capsys.readouterr().err


def test_an_lstm_learns_a_seasonal_series_past_the_naive_baselines(tmp_path):
    from lstm_lab.config import Config, apply_overrides
    from lstm_lab.training import train

    t, load, temp = _series(260)
    p = _csv(tmp_path / "s.csv", zip(t, load, temp))
    cfg = apply_overrides(Config(), {
        "task.name": "forecast", "task.options": {"path": str(p), "target": "load", "context": 24, "horizon": 6,
                                                  "season": 12},
        "model.hidden_size": 16, "optim.name": "adam", "optim.learning_rate": 1e-2, "train.batch_size": 16,
        "train.steps": 150, "train.eval_every": 50, "train.log_every": 50})
    summary = train(cfg, tmp_path / "run", quiet=True)
    base = summary["baseline"]
    assert summary["status"] == "completed"
    assert summary["test"]["mae"] < base["mae"] and summary["test"]["mae"] < base["seasonal_naive_mae"]
    # the forecasts in the series' units (for plots) are the ones the metrics scored
    from lstm_lab import tasks
    from lstm_lab.training import load_model

    model, cfg2, _ = load_model(tmp_path / "run")
    task = tasks.get("forecast", **cfg2.task.options)
    steps, y = task.truth("test")
    assert np.array_equal(steps[0], np.arange(task.bounds["test"][0] + 24, task.bounds["test"][0] + 30))
    assert np.abs(task.forecast(model) - y).mean() == pytest.approx(summary["test"]["mae"], rel=1e-4)
    assert set(task.baseline_forecasts()) == {"naive", "seasonal_naive", "linear_ar"}


def test_bundled_series():
    pytest.importorskip("statsmodels")
    task = ForecastTask(dataset="co2")
    assert len(task.values) == 526 and task.facts["start"] == "1958-03-01" and task.season == 12
    assert task.split_sizes() == {"train": 321, "valid": 32, "test": 32}
    assert np.isfinite(task.values).all()
    spots = ForecastTask(dataset="sunspots", context=22, horizon=5)
    assert len(spots.values) == 309 and spots.season == 11
    assert fc.DATASETS == {"co2": 12, "sunspots": 11}


def test_the_command_line_trains_a_csv_of_ones_own(tmp_path):
    import json

    t, load, temp = _series(120)
    p = _csv(tmp_path / "s.csv", zip(t, load, temp))
    exp = tmp_path / "my_exp.py"
    exp.write_text(f'overrides = {{"task.name": "forecast", "task.options": {{"path": {str(p)!r}, "target": "load", '
                   f'"context": 12, "horizon": 3}}, "model.hidden_size": 8, "train.batch_size": 8, '
                   f'"train.steps": 10, "train.eval_every": 5}}\n')
    assert cli.main(["train", str(exp), "--workdir", str(tmp_path / "run"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 10 and set(summary["test"]) == {"loss", "mae", "rmse", "mase", "smape"}
    assert summary["baseline"]["linear_ar_mae"] > 0


def test_absolute_windows_and_a_large_offset():
    """relative=False standardises the raw values; either way the metrics stay exact at a large offset (the float32
    targets are stored relative to a level: each window's last value, or the train split's mean)."""
    rng = np.random.default_rng(2)
    series = 1e6 + np.cumsum(rng.normal(size=160))
    for relative in (True, False):
        task = ForecastTask(series=series, context=10, horizon=2, relative=relative)
        batch = task.eval_batches("test", 64)[0]
        W = task.split_sizes()["test"]
        _, y, level = task._raw["test"]
        # outputs that forecast the truth exactly: the metrics are 0 to float32 precision of the relative values
        exact = ((y - level[:, None, :]) - task.y_mean) / task.y_std
        out = np.zeros((64, batch.inputs.shape[1], 2), np.float32)
        out[:W, 9] = exact.reshape(W, 2)
        m = task.summarize_batches([task.metric_sums(jnp.asarray(out), batch.arrays())])
        assert m["mae"] < 1e-4 and m["loss"] < 1e-9, (relative, m)
        expected = series[task.bounds["test"][0] + 9:][:W] if relative else series[:task.bounds["train"][1]].mean()
        assert np.allclose(level[:, 0], expected, rtol=0, atol=1e-9)
