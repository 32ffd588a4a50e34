"""Time-series forecasting: from the last ``context`` steps of a series, predict the next ``horizon`` steps.

``tasks.get("forecast", path="load.csv", target="load")`` reads a CSV file: a header row, a time column (``time``:
its name; default the first column) and one or more numeric value columns; ``target`` names the column(s) to
forecast (comma-separated for several), and the model reads every value column (``inputs="target"``: the targets
only). The time column must be regularly spaced — numbers with one step, or dates/times with one step in
seconds, days, months or years; a gap, a repeated or an out-of-order time is refused with the row. Two real series
ship with ``statsmodels`` (``pip install 'lstm_lab[forecast]'``, read from the installed package, never
downloaded): ``dataset="co2"`` (Mauna Loa CO2, ppm: the weekly series as monthly means, 1958-03 .. 2001-12, 526
months; the few months without a measurement filled by linear interpolation; season 12) and
``dataset="sunspots"`` (yearly sunspot numbers 1700-2008, 309 years; season 11).

Windows and splits:

* the series is cut **chronologically** into train / valid / test (``valid_fraction``, ``test_fraction`` of the
  steps, default 0.15 each); a window (``context`` steps read, the next ``horizon`` predicted) lies wholly inside
  one split, so the first ``context`` steps of valid and test are never predicted: a gap of ``context`` between
  the splits, and no window straddles a boundary. Train windows start at every step (``stride`` 1); valid and test
  score every window once.
* **scaling** is fitted on the train split only: with ``relative=True`` (the default) each window is first taken
  relative to its last observed value (inputs ``x - x[-1]``, targets ``y - x[-1]`` of the target column), so a
  trend the training period never reached still looks familiar (``relative=False``: targets relative to the train
  split's mean); then every column is standardised by means and standard deviations of the training windows.
  Metrics undo both: they are in the series' own units.

Model: the RNN reads the context; the head's outputs at the last step are the ``horizon x len(target)`` forecasts
(a direct multi-horizon forecast, horizon-major). Training loss: squared error in standardised units, averaged
over the forecasts of a window.

Metrics (test split, original units, over every forecast step of every window): ``mae``, ``rmse``, ``smape``
(symmetric MAPE, percent: ``200 |F - A| / (|F| + |A|)``, 0 where both are 0) and ``mase`` (MAE over the
training split's in-sample MAE of the seasonal naive forecast with season ``season``; 1 = as good as that).
Baselines, computed on the test windows beside every result (``task.baselines``; ``baseline`` is the naive one):
``naive`` (the last observed value, repeated), ``seasonal_naive`` (the value one season before each predicted
step) and ``linear_ar`` (a linear model of the same context the RNN reads, all horizons at once, fitted by least
squares on the training windows).

>>> import numpy as np
>>> t = np.arange(120.0)
>>> task = ForecastTask(series=np.sin(t / 3)[:, None], context=12, horizon=3, season=1)
>>> task.split_sizes(), task.input_size, task.output_size
({'train': 70, 'valid': 4, 'test': 4}, 1, 3)
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
import pathlib
from typing import Any

import jax.numpy as jnp
import numpy as np

from lstm_lab.tasks.registry import register
from lstm_lab.tasks.sequences import SequenceSet

__all__ = ["ForecastTask", "read_series", "DATASETS"]

DATASETS = {"co2": 12, "sunspots": 11}  # bundled with statsmodels: name -> season length


# ---------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------
def _parse_time(text: str):
    """A float, or a datetime (ISO 8601 date or date-time); None if it is neither."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return _dt.datetime.fromisoformat(text.strip())
    except ValueError:
        return None


def _spacing(times: list, where: str) -> str:
    """The one step between consecutive times, as text; a gap, repeat or disorder is one line naming the row."""
    if len(times) < 2:
        return "-"
    if isinstance(times[0], float):
        steps = np.diff(np.asarray(times))
        step = steps[0]
        bad = np.flatnonzero(~np.isclose(steps, step, rtol=1e-9, atol=1e-12) | (steps <= 0))
        if bad.size:
            k = int(bad[0])
            raise ValueError(f"forecast: {where}: the time column is not regularly spaced: row {k + 3} "
                             f"({times[k + 1]:g}) follows row {k + 2} ({times[k]:g}) by {steps[k]:g}, the series' "
                             f"step is {step:g} (fill or drop the gap first).")
        return f"{step:g}"
    secs = [(b - a).total_seconds() for a, b in zip(times, times[1:])]
    if all(s == secs[0] and s > 0 for s in secs):
        return f"{secs[0] / 86400:g} days" if secs[0] % 86400 == 0 else f"{secs[0]:g} s"
    months = [(b.year - a.year) * 12 + b.month - a.month for a, b in zip(times, times[1:])]
    same_in_month = all((t.day, t.time()) == (times[0].day, times[0].time()) for t in times)
    if same_in_month and all(m == months[0] and m > 0 for m in months):
        return f"{months[0] // 12} years" if months[0] % 12 == 0 else f"{months[0]} months"
    k = next(i for i, s in enumerate(secs) if s != secs[0] or s <= 0) if not same_in_month else \
        next(i for i, m in enumerate(months) if m != months[0] or m <= 0)
    raise ValueError(f"forecast: {where}: the time column is not regularly spaced: row {k + 3} ({times[k + 1]}) "
                     f"follows row {k + 2} ({times[k]}) by a different step than the rows before "
                     f"(fill or drop the gap first).")


def read_series(path, target, *, time: str | None = None) -> tuple[np.ndarray, list[str], list[str], dict]:
    """``(values [N, C] float64, column names, target names, facts)`` from a CSV file; bad input: one line."""
    p = pathlib.Path(path).expanduser()
    where = str(path)
    if not p.is_file():
        raise ValueError(f"forecast: {where!r} does not exist (a CSV file: a header row, a time column, value "
                         f"columns).")
    with open(p, newline="") as f:
        rows = [r for r in csv.reader(f) if any(cell.strip() for cell in r)]
    if len(rows) < 2:
        raise ValueError(f"forecast: {where!r} has {'no rows' if not rows else 'a header and no data rows'}.")
    header = [h.strip() for h in rows[0]]
    tcol = time if time is not None else header[0]
    if tcol not in header:
        raise ValueError(f"forecast: {where!r} has no time column {tcol!r}; its columns: {', '.join(header)}.")
    targets = [t.strip() for t in target.split(",")] if isinstance(target, str) else list(target or [])
    if not targets:
        raise ValueError(f"forecast: name the column(s) to forecast with target= (columns of {where!r}: "
                         f"{', '.join(h for h in header if h != tcol)}).")
    ti = header.index(tcol)
    columns = [h for h in header if h != tcol]
    for t in targets:
        if t not in columns:
            raise ValueError(f"forecast: {where!r} has no column {t!r} to forecast; its value columns: "
                             f"{', '.join(columns) or '(none)'}.")
    value_idx = [header.index(name) for name in columns]
    values = np.empty((len(rows) - 1, len(columns)))
    times = []
    for r, row in enumerate(rows[1:]):
        line = r + 2
        if len(row) != len(header):
            raise ValueError(f"forecast: {where!r} row {line} has {len(row)} fields; the header has {len(header)}.")
        t = _parse_time(row[ti])
        if t is None:
            raise ValueError(f"forecast: {where!r} row {line}: time {row[ti]!r} is neither a number nor an ISO date.")
        if times and type(t) is not type(times[0]):
            raise ValueError(f"forecast: {where!r} row {line}: time {row[ti]!r} mixes numbers and dates.")
        times.append(t)
        for c, ci in enumerate(value_idx):
            name, cell = columns[c], row[ci].strip()
            try:
                v = float(cell)
            except ValueError:
                v = math.nan
            if not math.isfinite(v):
                raise ValueError(f"forecast: {where!r} row {line}, column {name!r}: {cell!r} is not a finite number "
                                 f"(fill missing values first).")
            values[r, c] = v
    spacing = _spacing(times, repr(where))
    facts = {"start": str(times[0]), "end": str(times[-1]), "spacing": spacing}
    return values, columns, targets, facts


def _bundled(name: str) -> tuple[np.ndarray, list[str], list[str], dict]:
    if name not in DATASETS:
        raise ValueError(f"forecast: unknown dataset {name!r}; the bundled ones are {', '.join(DATASETS)} (or give "
                         f"path= a CSV file).")
    try:
        from statsmodels import datasets as smd
    except ImportError:
        raise ValueError(f"forecast: dataset={name!r} reads the copy bundled with statsmodels: "
                         f"pip install 'lstm_lab[forecast]'.") from None
    if name == "co2":
        weekly = smd.co2.load_pandas().data["co2"]
        monthly = weekly.resample("MS").mean().interpolate()
        values = monthly.to_numpy()[:, None]
        facts = {"start": str(monthly.index[0].date()), "end": str(monthly.index[-1].date()), "spacing": "1 months",
                 "source": "statsmodels.datasets.co2 (weekly, as monthly means; gaps interpolated)"}
        return values, ["co2"], ["co2"], facts
    data = smd.sunspots.load_pandas().data
    values = data["SUNACTIVITY"].to_numpy()[:, None]
    facts = {"start": str(int(data["YEAR"].iloc[0])), "end": str(int(data["YEAR"].iloc[-1])), "spacing": "1 years",
             "source": "statsmodels.datasets.sunspots"}
    return values, ["sunactivity"], ["sunactivity"], facts


# ---------------------------------------------------------------------------------------------------------------
# the task
# ---------------------------------------------------------------------------------------------------------------
@register("forecast")
class ForecastTask(SequenceSet):
    """Forecast ``horizon`` steps from ``context`` steps of a series (see the module doc).

    Options: ``path`` (a CSV file) with ``target`` and ``time``, or ``dataset`` (``co2``, ``sunspots``; the default
    when no path is given is ``co2``); ``context``, ``horizon``, ``season`` (default: the dataset's, else 1),
    ``valid_fraction``, ``test_fraction``, ``relative``, ``inputs`` (``all`` value columns or the ``target``
    columns), ``stride`` (between training windows). ``series=`` (an ``[N, C]`` array, the first ``len(target)``
    columns the targets) makes one from memory.
    """

    name = "forecast"

    def __init__(self, path: str | None = None, *, target=None, time: str | None = None, dataset: str | None = None,
                 context: int = 36, horizon: int = 12, season: int | None = None, valid_fraction: float = 0.15,
                 test_fraction: float = 0.15, relative: bool = True, inputs: str = "all", stride: int = 1,
                 series=None):
        given = [k for k, v in (("path", path), ("dataset", dataset), ("series", series)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"forecast: give one of path, dataset or series; got {' and '.join(given)}.")
        if series is not None:
            values = np.asarray(series, np.float64)
            values = values[:, None] if values.ndim == 1 else values
            columns = [f"x{i}" for i in range(values.shape[1])]
            targets = columns[:len(target.split(",")) if isinstance(target, str) else 1]
            facts = {"start": "0", "end": str(len(values) - 1), "spacing": "1"}
        elif path is not None:
            values, columns, targets, facts = read_series(path, target, time=time)
        else:
            dataset = dataset or "co2"
            values, columns, targets, facts = _bundled(dataset)
        for name, v in (("context", context), ("horizon", horizon), ("stride", stride)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"forecast: {name} must be a positive int; got {v!r}.")
        if season is None:
            season = DATASETS.get(dataset, 1)
        if not isinstance(season, (int, np.integer)) or season < 1:
            raise ValueError(f"forecast: season must be a positive int (1: none); got {season!r}.")
        if season > context:
            raise ValueError(f"forecast: season {season} is longer than the context {context}: the seasonal naive "
                             f"baseline needs a season inside the window (raise context or lower season).")
        for name, v in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
            if not 0 < v < 0.5:
                raise ValueError(f"forecast: {name} must be in (0, 0.5); got {v!r}.")
        if inputs not in ("all", "target"):
            raise ValueError(f"forecast: inputs must be 'all' or 'target'; got {inputs!r}.")
        n = len(values)
        n_test, n_valid = int(round(n * test_fraction)), int(round(n * valid_fraction))
        bounds = {"train": (0, n - n_valid - n_test), "valid": (n - n_valid - n_test, n - n_test), "test": (n - n_test, n)}
        window = context + horizon
        for s, (a, b) in bounds.items():
            if b - a < window:
                raise ValueError(f"forecast: the series has {n} steps; its {s} split ({b - a} steps) is shorter than "
                                 f"context + horizon = {window}: a longer series, a shorter context or "
                                 f"horizon, or other split fractions.")
        tidx = [columns.index(t) for t in targets]
        x_all = values if inputs == "all" else values[:, tidx]
        level_cols = tidx if inputs == "all" else list(range(len(tidx)))   # the targets among the inputs
        offset = values[bounds["train"][0]:bounds["train"][1], tidx].mean(0)
        self.context, self.horizon, self.season, self.relative = int(context), int(horizon), int(season), relative
        self.columns, self.targets, self.facts, self.bounds = columns, targets, facts, bounds
        self._level_cols = level_cols
        self.values = values

        def windows(split, step):
            a, b = bounds[split]
            starts = np.arange(a, b - window + 1, step)
            x = np.stack([x_all[s:s + context] for s in starts])                       # [W, L, F]
            y = np.stack([values[s + context:s + window][:, tidx] for s in starts])    # [W, H, k]
            # each window's level: its last value, or (relative=False) one constant, the train split's mean
            level = x[:, -1, level_cols] if relative else np.tile(offset, (len(starts), 1))  # [W, k]
            return x, y, level

        raw = {s: windows(s, stride if s == "train" else 1) for s in bounds}
        self._raw = raw
        x_tr, y_tr, lv_tr = raw["train"]
        x_rel = x_tr - x_tr[:, -1:, :] if relative else x_tr
        self.x_mean, self.x_std = x_rel.mean((0, 1)), x_rel.std((0, 1))
        self.x_std = np.where(self.x_std > 0, self.x_std, 1.0)
        y_rel = y_tr - lv_tr[:, None, :]
        self.y_mean, self.y_std = y_rel.mean((0, 1)), y_rel.std((0, 1))
        self.y_std = np.where(self.y_std > 0, self.y_std, 1.0)
        a, b = bounds["train"]
        train_t = values[a:b][:, tidx]
        self.mase_scale = np.abs(train_t[season:] - train_t[:-season]).mean(0)       # [k]
        self.mase_scale = np.where(self.mase_scale > 0, self.mase_scale, 1.0)

        def pairs(split):
            _, y, lv = raw[split]
            xs = self._scaled(split)
            out = []
            for w in range(len(xs)):
                tgt = np.zeros((context, horizon * len(tidx) + len(tidx)), np.float32)
                # the targets relative to the window's level (precise in float32 at any offset), then the level
                tgt[-1] = np.concatenate([(y[w] - lv[w]).reshape(-1), lv[w]])
                out.append((xs[w].astype(np.float32), tgt))
            return out

        options = {"path": path, "dataset": dataset, "target": ",".join(targets), "time": time, "context": context,
                   "horizon": horizon, "season": season, "valid_fraction": valid_fraction,
                   "test_fraction": test_fraction, "relative": relative, "inputs": inputs, "stride": stride}
        options = {k: v for k, v in options.items() if v is not None}
        super().__init__({s: pairs(s) for s in bounds}, loss="mse", name="forecast", input_kind="real",
                         input_size=x_all.shape[1], output_size=horizon * len(tidx), buckets=1, options=options)
        self.baselines = {name: self._score(f, "test") for name, f in self.baseline_forecasts("test").items()}

    # -- scoring ---------------------------------------------------------------------------------------------
    def metric_sums(self, outputs, batch):
        """Per window: the forecasts are the outputs at its last step (a batch is padded past the ``context``
        steps to a multiple of 8; filler rows have weight 0)."""
        k, H = len(self.targets), self.horizon
        w = batch["weights"]
        row = w.max(axis=1)                                                   # 1: a window, 0: filler
        last = w * (jnp.cumsum(w, axis=1) == w.sum(axis=1, keepdims=True))    # one-hot at the last valid step
        pred = jnp.einsum("bt,btc->bc", last, outputs[..., :H * k].astype(jnp.float32)).reshape(-1, H, k)
        tgt = jnp.einsum("bt,btc->bc", last, batch["targets"].astype(jnp.float32))
        y_rel, level = tgt[:, :H * k].reshape(-1, H, k), tgt[:, H * k:, None].swapaxes(1, 2)
        y_std, y_mean = jnp.asarray(self.y_std, jnp.float32), jnp.asarray(self.y_mean, jnp.float32)
        err = pred * y_std + y_mean - y_rel                                  # in the series' units
        fc, y = y_rel + err + level, y_rel + level                            # the forecast and the truth
        scaled = err / y_std
        smape = jnp.where(jnp.abs(fc) + jnp.abs(y) > 0, 200 * jnp.abs(err) / jnp.maximum(jnp.abs(fc) + jnp.abs(y),
                                                                                           1e-30), 0.0)
        per = lambda v: row * v.reshape(v.shape[0], -1).sum(axis=1)         # noqa: E731
        return {"loss_sum": per(scaled ** 2) / (H * k), "weight": row, "abs_sum": per(jnp.abs(err)),
                "sq_sum": per(err ** 2), "smape_sum": per(smape),
                "mase_sum": per(jnp.abs(err) / jnp.asarray(self.mase_scale, jnp.float32)),
                "count": row * H * k}

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["count"], 1e-12)
        return {"loss": sums["loss_sum"] / max(sums["weight"], 1e-12), "mae": sums["abs_sum"] / n,
                "rmse": math.sqrt(sums["sq_sum"] / n), "mase": sums["mase_sum"] / n, "smape": sums["smape_sum"] / n}

    # -- forecasts (numpy, original units): for plots and tables ------------------------------------------------
    def forecast(self, model, split: str = "test", batch_size: int = 64) -> np.ndarray:
        """A trained model's forecasts for every window of ``split``, ``[windows, horizon, targets]`` in the
        series' units (``model``: a :class:`~lstm_lab.models.SequenceModel`, e.g. from
        :func:`lstm_lab.training.load_model`)."""
        k, H = len(self.targets), self.horizon
        out = []
        for b in self.eval_batches(split, batch_size):           # windows in order (all have one length)
            y, _ = model(jnp.asarray(b.inputs), lengths=jnp.asarray(b.lengths))
            rows = b.weights.sum(axis=1) > 0
            last = np.asarray(y)[np.arange(len(rows)), b.lengths - 1][rows, :H * k].reshape(-1, H, k)
            level = b.targets[rows, self.context - 1, H * k:]
            out.append(last * self.y_std + self.y_mean + level[:, None, :])
        return np.concatenate(out)

    def truth(self, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
        """``(steps [windows, horizon], values [windows, horizon, targets])``: which steps of the series each window
        forecasts, and their true values."""
        _, y, _ = self._raw[split]
        first = self.bounds[split][0] + self.context
        return first + np.arange(len(y))[:, None] + np.arange(self.horizon)[None], y

    def baseline_forecasts(self, split: str = "test") -> dict[str, np.ndarray]:
        """The three baselines' forecasts, each ``[windows, horizon, targets]``."""
        return {"naive": self._naive(split), "seasonal_naive": self._seasonal(split),
                "linear_ar": self._linear_ar(split)}

    # -- baselines (numpy, original units) ----------------------------------------------------------------------
    def _scaled(self, split):
        """The model's inputs of every window of ``split`` (relative, then standardised on train)."""
        x, _, _ = self._raw[split]
        return ((x - x[:, -1:, :] if self.relative else x) - self.x_mean) / self.x_std

    def _target_context(self, split):
        return self._raw[split][0][:, :, self._level_cols]                       # [W, L, k], the series' units

    def _naive(self, split):
        ctx = self._target_context(split)
        return np.repeat(ctx[:, -1:, :], self.horizon, axis=1)

    def _seasonal(self, split):
        ctx, m = self._target_context(split), self.season
        h = np.arange(1, self.horizon + 1)
        back = self.context - m + (h - 1) % m                                     # the step one season earlier
        return ctx[:, back, :]

    def _features(self, split):
        xs = self._scaled(split)
        return np.concatenate([xs.reshape(len(xs), -1), np.ones((len(xs), 1))], axis=1)

    def _linear_ar(self, split):
        if not hasattr(self, "_ar"):
            _, y, lv = self._raw["train"]
            target = ((y - lv[:, None, :]) - self.y_mean) / self.y_std
            f = self._features("train")
            lam = 1e-6 * len(f)                                                 # a ridge only to stay defined
            self._ar = np.linalg.solve(f.T @ f + lam * np.eye(f.shape[1]), f.T @ target.reshape(len(f), -1))
        _, _, lv = self._raw[split]
        pred = (self._features(split) @ self._ar).reshape(len(lv), self.horizon, -1)
        return pred * self.y_std + self.y_mean + lv[:, None, :]

    def _score(self, forecast, split) -> dict[str, float]:
        _, y, _ = self._raw[split]
        err = forecast - y
        denom = np.abs(forecast) + np.abs(y)
        smape = np.where(denom > 0, 200 * np.abs(err) / np.where(denom > 0, denom, 1), 0.0)
        return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean())),
                "mase": float((np.abs(err) / self.mase_scale).mean()), "smape": float(smape.mean()),
                "loss": float(((err / self.y_std) ** 2).mean())}

    @property
    def baseline(self) -> dict[str, Any]:
        """The naive forecast's test metrics (``loss`` in the training loss's units), then the other baselines'."""
        out = {"model": "naive (last value); then seasonal naive, linear AR", **self.baselines["naive"]}
        for name in ("seasonal_naive", "linear_ar"):
            out.update({f"{name}_{k}": v for k, v in self.baselines[name].items() if k != "loss"})
        return out

    # -- description ---------------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.pop("lengths", None)
        out.pop("padded_lengths", None)
        f = self.facts
        out["series"] = [
            f"{len(self.values)} steps, {f['start']} .. {f['end']}, every {f['spacing']}"
            + (f" ({f['source']})" if "source" in f else "") + f"; columns {', '.join(self.columns)}; "
            f"forecast {', '.join(self.targets)}",
            "steps per split: " + " | ".join(f"{s} {a}..{b - 1}" for s, (a, b) in self.bounds.items())
            + f"; windows: context {self.context}, horizon {self.horizon}; season {self.season}",
            *(f"{name} on test: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items() if k != "loss")
              for name, m in self.baselines.items())]
        return out

    def format_example(self, batch, row: int = 0) -> str:
        k, H = len(self.targets), self.horizon
        tgt = batch.targets[row, int(batch.lengths[row]) - 1]
        y = tgt[:H * k].reshape(H, k) + tgt[H * k:]                            # relative to the level, plus it
        return f"context {self.context} steps -> next {H}: " + " ".join(f"{v:.4g}" for v in y[:, 0][:8]) + \
            (" ..." if H > 8 else "")
