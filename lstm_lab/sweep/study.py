"""Study files: a base config, the variants, hyperparameter distributions, the search and the metric.

A study file in ``experiments/`` defines ``study = Study(...)``::

    from lstm_lab.sweep import Study, LogUniform, OneMinusLogUniform, IntLogUniform, Uniform, ODYSSEY_VARIANTS

    study = Study(
        name="odyssey_copy",
        base="copy.py",                        # an experiment file (relative to the study file) or a dict
        variants=ODYSSEY_VARIANTS,             # preset names, or dicts {"name": ..., **CellSpec fields}
        space={"optim.learning_rate": LogUniform(1e-6, 1e-2),
               "model.hidden_size": IntLogUniform(20, 200),
               "optim.momentum": OneMinusLogUniform(0.01, 1.0),    # momentum = 1 - x, x log-uniform
               "model.input_noise": Uniform(0.0, 1.0)},
        trials_per_variant=200, metric="test.loss", direction="minimize", baseline="vanilla",
        search="random",
    )

Every trial of a study is planned up front as a *slot* ``variant/index`` (and
``/s<j>`` with several seeds per hyperparameter sample). Random and grid
search fix every hyperparameter in the plan (drawn from ``sampler_seed``, so a
study's trials do not depend on how many workers ran it or in which order);
``tpe`` and ``qmc`` leave them to Optuna's sampler, asked when the trial
starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import pathlib
import zlib
from typing import Any

import numpy as np

from lstm_lab._hints import did_you_mean, error_message

__all__ = ["Study", "LogUniform", "Uniform", "OneMinusLogUniform", "IntLogUniform", "IntUniform", "Choice",
           "ODYSSEY_VARIANTS", "ODYSSEY_SPACE", "ODYSSEY_SPACE_POPULATION", "ODYSSEY_BASE", "load_study", "StudyError", "SEARCHES"]

SEARCHES = ("random", "grid", "tpe", "qmc")
ODYSSEY_VARIANTS = ("vanilla", "nig", "nfg", "nog", "niaf", "noaf", "np", "cifg", "fgr")


_LOADING: list[str] = []  # the study file being executed (relative ``base`` paths resolve against it)


class StudyError(ValueError):
    """A study definition that cannot be run (names the bad field)."""


# ---------------------------------------------------------------------------
# Distributions
# ---------------------------------------------------------------------------
class _Dist:
    kind = ""

    def check(self, key: str) -> None:
        if not self.low < self.high:
            raise StudyError(f"study space {key!r}: {type(self).__name__} needs low < high; "
                             f"got low={self.low!r}, high={self.high!r}.")

    def optuna_name(self, key: str) -> str:
        return key

    def to_actual(self, x):
        return x

    def describe(self) -> dict:
        return {"kind": self.kind, "low": getattr(self, "low", None), "high": getattr(self, "high", None),
                "choices": list(getattr(self, "values", ())) or None}

    def extremes(self) -> list:
        """The actual config values a study must accept: both ends of the range (every Choice value)."""
        return [self.to_actual(self.low), self.to_actual(self.high)]

    def suggest(self, trial, key: str):
        """Ask an Optuna trial for this parameter (a planned value is returned as is); the actual value."""
        import optuna

        return self.to_actual(trial._suggest(self.optuna_name(key), self.to_optuna(optuna)))


@dataclasses.dataclass(frozen=True)
class LogUniform(_Dist):
    """``exp(U(log low, log high))`` — learning rates."""
    low: float
    high: float
    kind = "log_uniform"

    def check(self, key):
        super().check(key)
        if self.low <= 0:
            raise StudyError(f"study space {key!r}: LogUniform needs low > 0; got {self.low!r}.")

    def to_optuna(self, optuna):
        return optuna.distributions.FloatDistribution(self.low, self.high, log=True)

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

    def to_actual(self, x):
        return 1.0 - float(x)

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

    def check(self, key):
        super().check(key)
        if self.low < 1 or int(self.low) != self.low or int(self.high) != self.high:
            raise StudyError(f"study space {key!r}: IntLogUniform needs integers >= 1; got {self.low!r}, "
                             f"{self.high!r}.")
        if self.levels and not 2 <= self.levels:
            raise StudyError(f"study space {key!r}: IntLogUniform levels must be 0 (off) or >= 2; got {self.levels!r}.")

    def to_optuna(self, optuna):
        return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=True)

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

    def to_optuna(self, optuna):
        return optuna.distributions.IntDistribution(int(self.low), int(self.high))

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
ODYSSEY_BASE = {"optim.name": "sgd", "optim.nesterov": True}
# The same ranges with hidden sizes snapped to 8 log-spaced sizes (20, 28, 39, 54, 75, 104, 144, 200), so that
# `--population K` trains K trials at a time.
ODYSSEY_SPACE_POPULATION = {**ODYSSEY_SPACE, "model.hidden_size": IntLogUniform(20, 200, levels=8)}


# ---------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Study:
    """One ablation study. See the module docstring for a full example.

    A study is checked when it is made, before anything is written: every variant on the base config, and
    both ends of every distribution's range (every Choice value) on every variant, must build a valid
    training config (the config's own rules decide); otherwise a :class:`StudyError` names the variant,
    the key and the value.

    Args:
      name: the Optuna study name (one database may hold many studies).
      base: the base training config: an experiment file (path relative to
        the study file) or a dict of dotted overrides.
      variants: cell presets (``lstm-lab variants``) or dicts ``{"name": ...,
        **CellSpec fields}``; each becomes ``model.cell``.
      space: dotted config key -> distribution.
      trials_per_variant: hyperparameter samples per variant (random, tpe,
        qmc); grid search runs the whole grid for each variant instead.
      seeds: runs per hyperparameter sample, with seeds ``0..seeds-1`` offset
        by the sample's index (``train.seed = index * seeds + j``).
      metric: a key of the run summary, ``"test.loss"``, ``"valid.accuracy"``...
      direction: ``"minimize"`` or ``"maximize"``.
      baseline: the variant every other is compared with.
      search: ``random`` (Odyssey), ``grid``, ``tpe`` or ``qmc`` (Optuna samplers).
      sampler_seed: seeds the plan (random, grid order) and Optuna's samplers.
      grid_points: points per continuous parameter in a grid search.
      overrides: extra dotted overrides applied after ``base`` (and before
        the variant and the sampled hyperparameters).
      population: how many trials of one shape ``lstm-lab sweep`` trains as
        one vmapped program unless ``--population`` says otherwise.
    """

    name: str
    base: Any = dataclasses.field(default_factory=dict)
    variants: tuple = ODYSSEY_VARIANTS
    space: dict = dataclasses.field(default_factory=dict)
    trials_per_variant: int = 10
    seeds: int = 1
    metric: str = "test.loss"
    direction: str = "minimize"
    baseline: str = "vanilla"
    search: str = "random"
    sampler_seed: int = 0
    grid_points: int = 3
    overrides: dict = dataclasses.field(default_factory=dict)
    population: int = 1  # the default of `lstm-lab sweep --population` (not part of the study's identity)
    source: str = dataclasses.field(default="", compare=False)  # the study file (set by load_study)

    # -- validation ----------------------------------------------------------------
    def __post_init__(self):
        if not self.source and _LOADING:
            object.__setattr__(self, "source", _LOADING[-1])
        from lstm_lab.cells import CellSpec, resolve_cell
        from lstm_lab.config import flat_keys

        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise StudyError(f"study name must be a non-empty string without '/'; got {self.name!r}.")
        object.__setattr__(self, "variants", tuple(self.variants))
        if not self.variants:
            raise StudyError("study variants is empty.")
        names = []
        for v in self.variants:
            if isinstance(v, str):
                try:
                    resolve_cell(v)
                except (ValueError, KeyError) as e:
                    raise StudyError(f"study variants: {e}") from None
                names.append(v)
            elif isinstance(v, dict) and "name" in v:
                try:
                    CellSpec(**{k: x for k, x in v.items() if k != "name"})
                except (TypeError, ValueError) as e:
                    raise StudyError(f"study variant {v['name']!r}: {e}") from None
                names.append(v["name"])
            else:
                raise StudyError(f"study variants: each is a preset name or a dict with a 'name'; got {v!r}.")
        if len(set(names)) != len(names):
            raise StudyError(f"study variants: names repeat: {names}.")
        if self.baseline not in names:
            raise StudyError(f"study baseline {self.baseline!r} is not one of the variants "
                             f"{', '.join(names)}.{did_you_mean(self.baseline, names)}")
        if self.search not in SEARCHES:
            raise StudyError(f"study search {self.search!r} is not one of {', '.join(SEARCHES)}."
                             f"{did_you_mean(self.search, SEARCHES)}")
        if self.direction not in ("minimize", "maximize"):
            raise StudyError(f"study direction must be 'minimize' or 'maximize'; got {self.direction!r}.")
        split, _, key = self.metric.partition(".")
        if split not in ("valid", "test") or not key:
            raise StudyError(f"study metric must be 'valid.<name>' or 'test.<name>' (e.g. 'test.loss'); "
                             f"got {self.metric!r}.")
        for name in ("trials_per_variant", "seeds", "grid_points", "population"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise StudyError(f"study {name} must be an integer >= 1; got {getattr(self, name)!r}.")
        keys = flat_keys()
        for key, dist in self.space.items():
            if key not in keys or key == "model.cell":
                raise StudyError(f"study space: {key!r} is not a config key.{did_you_mean(key, keys)}")
            if not isinstance(dist, _Dist):
                raise StudyError(f"study space {key!r}: expected a distribution (LogUniform, Uniform, "
                                 f"OneMinusLogUniform, IntLogUniform, IntUniform, Choice); got {dist!r}.")
            dist.check(key)
        try:
            self.base_config()
        except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
            raise StudyError(f"study base config: {error_message(e, first_line=True)}") from None
        self._check_configs()

    def _check_configs(self) -> None:
        """Every variant on the base config, and every end of every distribution's range (each Choice value)
        on every variant, must make a valid training config (the config's own rules decide: nothing is
        planned that could only fail when its trial starts)."""
        for variant in self.variant_names:
            try:
                self.config_for(variant, {}, 0)
            except (ValueError, TypeError, KeyError) as e:
                raise StudyError(f"study variant {variant!r} with the base config: "
                                 f"{error_message(e, first_line=True)}") from None
            for key, dist in sorted(self.space.items()):
                for value in dist.extremes():
                    try:
                        self.config_for(variant, {key: value}, 0)
                    except (ValueError, TypeError, KeyError) as e:
                        raise StudyError(f"study space {key!r}: {dist!r} reaches {key}={value!r}, an invalid config "
                                         f"(variant {variant!r}): {error_message(e, first_line=True)} "
                                         f"Narrow the distribution (or change "
                                         f"the base config).") from None

    # -- accessors -------------------------------------------------------------------
    @property
    def variant_names(self) -> list[str]:
        return [v if isinstance(v, str) else v["name"] for v in self.variants]

    def cell_of(self, variant: str):
        for v in self.variants:
            if v == variant:
                return v
            if isinstance(v, dict) and v["name"] == variant:
                return {k: x for k, x in v.items() if k != "name"}
        raise StudyError(f"variant {variant!r} is not in study {self.name!r}.")

    def base_config(self):
        """The base training config: the ``base`` file or dict, then ``overrides`` (built once per study
        object: an experiment file named by ``base`` is executed once)."""
        cached = self.__dict__.get("_base_config")
        if cached is not None:
            return cached
        from lstm_lab.config import Config, apply_overrides, load_config

        if isinstance(self.base, dict):
            cfg = apply_overrides(Config(), self.base)
        else:
            path = pathlib.Path(self.base)
            if not path.is_absolute() and self.source:
                path = pathlib.Path(self.source).parent / path
            cfg = load_config(path)
        cfg = apply_overrides(cfg, self.overrides)
        object.__setattr__(self, "_base_config", cfg)
        return cfg

    def config_for(self, variant: str, hyper: dict, seed: int):
        """The training config of one trial: base, then the variant, the hyperparameters and the seed."""
        from lstm_lab.config import apply_overrides

        return apply_overrides(self.base_config(), {**hyper, "model.cell": self.cell_of(variant),
                                                    "train.seed": int(seed)})

    def describe_params(self) -> dict:
        return {k: {**d.describe(), "optuna_name": d.optuna_name(k)} for k, d in self.space.items()}

    def record(self) -> dict:
        """What identifies a study (stored with it; a different one is refused)."""
        from lstm_lab.config import to_dict

        return {"name": self.name, "base_config": to_dict(self.base_config()),
                "variants": [v if isinstance(v, str) else dict(v) for v in self.variants],
                "space": {k: {**d.describe()} for k, d in sorted(self.space.items())},
                "trials_per_variant": self.trials_per_variant, "seeds": self.seeds, "metric": self.metric,
                "direction": self.direction, "baseline": self.baseline, "search": self.search,
                "sampler_seed": self.sampler_seed, "grid_points": self.grid_points}

    @classmethod
    def from_record(cls, record: dict, *, source: str = "", population: int = 1) -> "Study":
        """The study :meth:`record` describes, rebuilt as data (no study or experiment file is read or
        executed): the resolved base config, the variants, the distributions and the search. Its
        :meth:`fingerprint` equals the recorded study's."""
        from lstm_lab.config import from_dict, to_overrides

        try:
            base = to_overrides(from_dict(record["base_config"]))
            space = {k: dist_from_description(d) for k, d in record.get("space", {}).items()}
            fields = {k: record[k] for k in ("trials_per_variant", "seeds", "metric", "direction", "baseline",
                                             "search", "sampler_seed", "grid_points")}
            variants = tuple(v if isinstance(v, str) else dict(v) for v in record["variants"])
            name = record["name"]
        except (KeyError, TypeError, ValueError) as e:
            raise StudyError(f"the stored study record is incomplete or invalid "
                             f"({error_message(e, first_line=True)}); plan the study "
                             f"again from its study file.") from None
        return cls(name=name, base=base, variants=variants, space=space, population=int(population or 1),
                   source=source or "", **fields)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.record(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    # -- the plan ------------------------------------------------------------------
    def plan(self) -> list[dict]:
        """Every trial of the study: ``{slot, variant, index, seed, params}``; ``params`` maps
        Optuna parameter names to planned values (empty for tpe/qmc: the sampler decides)."""
        keys = sorted(self.space)
        out = []
        for variant in self.variant_names:
            if self.search == "grid":
                axes = [self.space[k].grid(self.grid_points) for k in keys]
                samples = [dict(zip(keys, combo)) for combo in itertools.product(*axes)]
            elif self.search == "random":
                samples = []
                for i in range(self.trials_per_variant):
                    rng = np.random.default_rng([self.sampler_seed, zlib.crc32(variant.encode()), i])
                    samples.append({k: self.space[k].sample(rng) for k in keys})
            else:
                samples = [{} for _ in range(self.trials_per_variant)]
            for i, s in enumerate(samples):
                params = {"variant": variant, **{self.space[k].optuna_name(k): v for k, v in s.items()}}
                for j in range(self.seeds):
                    slot = f"{variant}/{i:04d}" + (f"/s{j}" if self.seeds > 1 else "")
                    out.append({"slot": slot, "variant": variant, "index": i, "seed": i * self.seeds + j,
                                "params": params})
        return out

    def hyper_from_params(self, params: dict) -> dict:
        """Dotted config overrides from Optuna parameter values (1 - x for OneMinusLogUniform)."""
        return {k: d.to_actual(params[d.optuna_name(k)]) for k, d in self.space.items()
                if d.optuna_name(k) in params}

    def sampler(self):
        import optuna

        if self.search == "tpe":
            return optuna.samplers.TPESampler(seed=self.sampler_seed)
        if self.search == "qmc":
            return optuna.samplers.QMCSampler(seed=self.sampler_seed)
        return optuna.samplers.RandomSampler(seed=self.sampler_seed)  # planned trials: every value is fixed


def load_study(path) -> Study:
    """The ``study`` defined by a study file (``.py``). The file is Python and is executed: a syntax error
    or any exception in it (or in an experiment file it names as ``base``) is a :class:`StudyError` of one
    line, ``study file <path>:<line>: <Error>: <message>``."""
    from lstm_lab._pyfile import UserFileError, exec_file

    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"study file {str(path)!r} does not exist.")
    if not path.is_file():
        raise StudyError(f"study file {str(path)!r} is not a file (a study file is a .py that defines `study`).")
    _LOADING.append(str(path.resolve()))
    try:
        mod = exec_file(path, f"_lstm_lab_study_{path.stem}", "study file")
    except UserFileError as e:
        raise StudyError(str(e)) from None
    finally:
        _LOADING.pop()
    study = getattr(mod, "study", None)
    if not isinstance(study, Study):
        raise StudyError(f"{path} must define `study = Study(...)` (from lstm_lab.sweep import Study).")
    if not study.source:
        study = dataclasses.replace(study, source=str(path.resolve()))
    return study


def dist_from_description(d: dict) -> _Dist:
    """Rebuild a distribution from :meth:`Study.describe_params` (for loading a stored study)."""
    cls = _DISTS[d["kind"]]
    if cls is Choice:
        return cls(*d["choices"])
    return cls(d["low"], d["high"], d["levels"]) if d.get("levels") else cls(d["low"], d["high"])
