"""Hyperparameter distributions: the only place that knows how a searched value maps to a config value
(``1 - x`` for :class:`OneMinusLogUniform`) and which ranges are searched on a log scale.

A distribution is part of a study file's ``space`` (config key -> distribution). It draws the planned values
of random and grid search (:meth:`sample`, :meth:`grid`), asks an Optuna trial for a value (:meth:`suggest`,
Optuna's public ``trial.suggest_*``), and describes itself for the study's record (:meth:`describe`; rebuilt
by :func:`dist_from_description`). The analysis reads a study's parameters from those descriptions:
:func:`to_search`, :func:`is_log`, :func:`is_int` and :func:`search_label` take a description's ``kind``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = ["StudyError", "LogUniform", "Uniform", "OneMinusLogUniform", "IntLogUniform", "IntUniform", "Choice",
           "ODYSSEY_SPACE", "ODYSSEY_SPACE_POPULATION", "dist_from_description", "to_search", "to_actual", "is_log",
           "is_int", "search_label", "parse_optuna_name", "optuna_distribution"]


class StudyError(ValueError):
    """A study definition that cannot be run (names the bad field)."""


class _Dist:
    kind = ""
    log = False  # searched on a log scale
    integer = False

    def check(self, key: str) -> None:
        if not self.low < self.high:
            raise StudyError(f"study space {key!r}: {type(self).__name__} needs low < high; "
                             f"got low={self.low!r}, high={self.high!r}.")

    def optuna_name(self, key: str) -> str:
        """The parameter's name in Optuna (the searched value's, see :meth:`to_actual`)."""
        return key

    @staticmethod
    def to_actual(x):
        """The config value of a searched value ``x``."""
        return x

    @staticmethod
    def to_search(actual):
        """The searched value of a config value (the inverse of :meth:`to_actual`)."""
        return actual

    @staticmethod
    def label(name: str) -> str:
        """How the searched value is named on an axis or in a table."""
        return name

    def describe(self) -> dict:
        return {"kind": self.kind, "low": getattr(self, "low", None), "high": getattr(self, "high", None),
                "choices": list(getattr(self, "values", ())) or None}

    def extremes(self) -> list:
        """The actual config values a study must accept: both ends of the range (every Choice value)."""
        return [self.to_actual(self.low), self.to_actual(self.high)]

    def suggest(self, trial, key: str):
        """Ask an Optuna trial for this parameter (``trial.suggest_*``: a planned value is returned as is);
        the actual value."""
        return self.to_actual(self.ask(trial, self.optuna_name(key)))


@dataclasses.dataclass(frozen=True)
class LogUniform(_Dist):
    """``exp(U(log low, log high))`` — learning rates."""
    low: float
    high: float
    kind = "log_uniform"
    log = True

    def check(self, key):
        super().check(key)
        if self.low <= 0:
            raise StudyError(f"study space {key!r}: LogUniform needs low > 0; got {self.low!r}.")

    def to_optuna(self, optuna):
        return optuna.distributions.FloatDistribution(self.low, self.high, log=True)

    def ask(self, trial, name):
        return trial.suggest_float(name, self.low, self.high, log=True)

    def sample(self, rng):
        return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))

    def grid(self, n):
        return [float(v) for v in np.geomspace(self.low, self.high, n)]


@dataclasses.dataclass(frozen=True)
class Uniform(_Dist):
    """``U(low, high)`` — input noise."""
    low: float
    high: float
    kind = "uniform"

    def to_optuna(self, optuna):
        return optuna.distributions.FloatDistribution(self.low, self.high)

    def ask(self, trial, name):
        return trial.suggest_float(name, self.low, self.high)

    def sample(self, rng):
        return float(rng.uniform(self.low, self.high))

    def grid(self, n):
        return [float(v) for v in np.linspace(self.low, self.high, n)]


@dataclasses.dataclass(frozen=True)
class OneMinusLogUniform(LogUniform):
    """``1 - x`` with ``x`` log-uniform in [low, high] — Odyssey's momentum (low=0.01, high=1: momentum in
    [0, 0.99], dense near 0.99). Optuna stores ``x`` as the parameter ``"1-<key>"``."""
    kind = "one_minus_log_uniform"

    def check(self, key):
        super().check(key)
        if self.high > 1:
            raise StudyError(f"study space {key!r}: OneMinusLogUniform needs high <= 1; got {self.high!r}.")

    def optuna_name(self, key):
        return f"1-{key}"

    @staticmethod
    def to_actual(x):
        return 1.0 - float(x)

    @staticmethod
    def to_search(actual):
        return 1.0 - actual

    @staticmethod
    def label(name):
        return f"1 - {name}"

    def sample(self, rng):
        return super().sample(rng)  # the optuna-space value x; the actual value is 1 - x


@dataclasses.dataclass(frozen=True)
class IntLogUniform(_Dist):
    """An integer log-uniform in [low, high] — hidden sizes.

    ``levels=n`` snaps each planned draw to the nearest of ``n`` log-spaced
    integers in [low, high] (random and grid search), so that trials share
    shapes and ``--population`` fills up; Optuna still sees the log-int range.
    """
    low: int
    high: int
    levels: int = 0
    kind = "int_log_uniform"
    log = True
    integer = True

    def check(self, key):
        super().check(key)
        if self.low < 1 or int(self.low) != self.low or int(self.high) != self.high:
            raise StudyError(f"study space {key!r}: IntLogUniform needs integers >= 1; got {self.low!r}, "
                             f"{self.high!r}.")
        if self.levels and not 2 <= self.levels:
            raise StudyError(f"study space {key!r}: IntLogUniform levels must be 0 (off) or >= 2; got {self.levels!r}.")

    def to_optuna(self, optuna):
        return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=True)

    def ask(self, trial, name):
        return trial.suggest_int(name, int(self.low), int(self.high), log=True)

    def extremes(self):
        return [int(self.low), int(self.high)]

    def _grid_values(self, n):
        return sorted({int(round(v)) for v in np.geomspace(self.low, self.high, n)})

    def sample(self, rng):
        # optuna's own rule for a log int: round a log-uniform draw on [low - 0.5, high + 0.5]
        x = math.exp(rng.uniform(math.log(self.low - 0.5), math.log(self.high + 0.5)))
        if self.levels:
            vals = self._grid_values(self.levels)
            return min(vals, key=lambda v: abs(math.log(v) - math.log(x)))
        return int(min(max(round(x), self.low), self.high))

    def grid(self, n):
        return self._grid_values(self.levels or n)

    def describe(self):
        return {**super().describe(), **({"levels": self.levels} if self.levels else {})}


@dataclasses.dataclass(frozen=True)
class IntUniform(_Dist):
    """An integer uniform in [low, high]."""
    low: int
    high: int
    kind = "int_uniform"
    integer = True

    def to_optuna(self, optuna):
        return optuna.distributions.IntDistribution(int(self.low), int(self.high))

    def ask(self, trial, name):
        return trial.suggest_int(name, int(self.low), int(self.high))

    def extremes(self):
        return [int(self.low), int(self.high)]

    def sample(self, rng):
        return int(rng.integers(self.low, self.high + 1))

    def grid(self, n):
        return sorted({int(round(v)) for v in np.linspace(self.low, self.high, n)})


@dataclasses.dataclass(frozen=True)
class Choice(_Dist):
    """One of ``values`` — e.g. hidden sizes on a grid, so that population groups fill up."""
    values: tuple
    kind = "choice"

    def __init__(self, *values):
        if len(values) == 1 and isinstance(values[0], (list, tuple)):
            values = tuple(values[0])
        object.__setattr__(self, "values", tuple(values))

    def check(self, key):
        if len(self.values) < 1 or len(set(self.values)) != len(self.values):
            raise StudyError(f"study space {key!r}: Choice needs distinct values; got {list(self.values)!r}.")

    def to_optuna(self, optuna):
        return optuna.distributions.CategoricalDistribution(self.values)

    def ask(self, trial, name):
        return trial.suggest_categorical(name, self.values)

    def extremes(self):
        return [v.item() if hasattr(v, "item") else v for v in self.values]

    def sample(self, rng):
        v = self.values[int(rng.integers(len(self.values)))]
        return v.item() if hasattr(v, "item") else v

    def grid(self, n):
        return list(self.values)


_DISTS = {c.kind: c for c in (LogUniform, Uniform, OneMinusLogUniform, IntLogUniform, IntUniform, Choice)}

# The Odyssey protocol (REFERENCES.md): SGD with Nesterov momentum and these four ranges.
ODYSSEY_SPACE = {
    "optim.learning_rate": LogUniform(1e-6, 1e-2),
    "model.hidden_size": IntLogUniform(20, 200),
    "optim.momentum": OneMinusLogUniform(0.01, 1.0),
    "model.input_noise": Uniform(0.0, 1.0),
}
# The same ranges with hidden sizes snapped to 8 log-spaced sizes (20, 28, 39, 54, 75, 104, 144, 200), so that
# `--population K` trains K trials at a time.
ODYSSEY_SPACE_POPULATION = {**ODYSSEY_SPACE, "model.hidden_size": IntLogUniform(20, 200, levels=8)}


def dist_from_description(d: dict) -> _Dist:
    """Rebuild a distribution from its :meth:`~_Dist.describe` (for loading a stored study)."""
    cls = _DISTS[d["kind"]]
    if cls is Choice:
        return cls(*d["choices"])
    return cls(d["low"], d["high"], d["levels"]) if d.get("levels") else cls(d["low"], d["high"])


# -- a stored description's kind: what the analysis of a study needs ----------------------------------
def _cls(kind: str) -> type[_Dist]:
    return _DISTS.get(kind, _Dist)


def to_search(kind: str, actual):
    """The searched value of a config value (an array too): ``1 - momentum`` for ``one_minus_log_uniform``."""
    return _cls(kind).to_search(actual)


def to_actual(kind: str, x):
    """The config value of a searched value (Optuna's parameter value)."""
    return _cls(kind).to_actual(x)


def is_log(kind: str) -> bool:
    """Whether values of this kind are searched (and best plotted) on a log scale."""
    return _cls(kind).log


def is_int(kind: str) -> bool:
    return _cls(kind).integer


def search_label(kind: str, name: str) -> str:
    """``name`` of the searched value: ``"1 - momentum"`` for ``one_minus_log_uniform``."""
    return _cls(kind).label(name)


def parse_optuna_name(name: str) -> tuple[str, str]:
    """An Optuna parameter's config key, and the kind its name implies (``"1-optim.momentum"`` ->
    ``("optim.momentum", "one_minus_log_uniform")``; ``""`` when the name does not tell)."""
    prefix = OneMinusLogUniform.optuna_name(None, "")
    if name.startswith(prefix):
        return name[len(prefix):], OneMinusLogUniform.kind
    return name, ""


def optuna_distribution(description: dict):
    """Optuna's distribution of the searched value of a stored description."""
    import optuna

    return dist_from_description(description).to_optuna(optuna)
