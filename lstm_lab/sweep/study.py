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

A space key is a dotted config key (``model.hidden_size``) or
``model.cell.<field>``, a :class:`~lstm_lab.CellSpec` field other than
``family``, searched on every variant's cell (``"model.cell.zoneout_h":
Uniform(0.0, 0.3)``, ``"model.cell.layer_norm": Choice(False, True)``; see
:class:`Study`).

:func:`prepare_study` plans a study into its directory and database, once however many processes start
together (see :mod:`lstm_lab.sweep.storage` for the study directory's files).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import pathlib
import shutil
import time
import zlib
from typing import Any, Callable

import numpy as np

from lstm_lab._hints import did_you_mean, error_message
from lstm_lab._io import FileLock, atomic_json
from lstm_lab.sweep import storage as db
from lstm_lab.sweep.space import (ODYSSEY_SPACE, ODYSSEY_SPACE_POPULATION, Choice, IntLogUniform, IntUniform,
                                  LogUniform, OneMinusLogUniform, StudyError, Uniform, _Dist, dist_from_description)

__all__ = ["Study", "LogUniform", "Uniform", "OneMinusLogUniform", "IntLogUniform", "IntUniform", "Choice",
           "ODYSSEY_VARIANTS", "ODYSSEY_SPACE", "ODYSSEY_SPACE_POPULATION", "ODYSSEY_BASE", "load_study", "StudyError",
           "SEARCHES", "prepare_study", "attach_study", "PLAN_LOCK", "PLAN_ATTR"]

SEARCHES = ("random", "grid", "tpe", "qmc")
ODYSSEY_VARIANTS = ("vanilla", "nig", "nfg", "nog", "niaf", "noaf", "np", "cifg", "fgr")

#: a space key ``model.cell.<field>`` searches one CellSpec field of every variant's cell
CELL_PREFIX = "model.cell."


def cell_fields() -> list[str]:
    """The CellSpec fields a study may search as ``model.cell.<field>`` (all but ``family``: the variant's)."""
    from lstm_lab.cells import CellSpec

    return [f.name for f in dataclasses.fields(CellSpec) if f.name != "family"]


def split_cell_params(hyper: dict) -> tuple[dict, dict]:
    """``hyper`` split into its config overrides and its CellSpec fields (``model.cell.<field>`` keys, as
    ``{field: value}``)."""
    cell = {k[len(CELL_PREFIX):]: v for k, v in hyper.items() if str(k).startswith(CELL_PREFIX)}
    return {k: v for k, v in hyper.items() if not str(k).startswith(CELL_PREFIX)}, cell


_LOADING: list[str] = []  # the study file being executed (relative ``base`` paths resolve against it)


# The Odyssey protocol (REFERENCES.md): SGD with Nesterov momentum over ODYSSEY_SPACE's four ranges.
ODYSSEY_BASE = {"optim.name": "sgd", "optim.nesterov": True}


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

    Searching the cell: a space key ``model.cell.<field>`` (a :class:`~lstm_lab.CellSpec` field other than
    ``family``, which the variant decides) samples that field for every variant. Each trial's ``model.cell``
    is then the variant's cell as a dict of CellSpec fields with the sampled values merged in
    (:meth:`cell_for`); the values are recorded as the trial's parameters under the full key, like any
    other. Every range end (every Choice value), and every combination of them across the ``model.cell.*``
    keys, must make a valid cell for every variant: a rate that does not apply to a variant's family
    (``zoneout_c`` on a GRU) is refused when the study is made. Trials whose cells differ (another rate)
    train in different populations (:func:`~lstm_lab.training.population_key` keys on ``model.cell``)::

        Study(name="reg", base="copy.py", variants=["lstm", "gru"], baseline="lstm",
              space={"optim.learning_rate": LogUniform(1e-3, 1e-1),
                     "model.cell.zoneout_h": Uniform(0.0, 0.3),             # LSTM family, GRU, MGU, RNN
                     "model.cell.variational_dropout": Choice(0.0, 0.25)})

    (``"model.cell.layer_norm": Choice(False, True)`` there would be refused: layer norm is the LSTM family's,
    so it is searched with LSTM-family variants only, e.g. ``["lstm", "cifg"]``.)

    Args:
      name: the Optuna study name (one database may hold many studies).
      base: the base training config: an experiment file (path relative to
        the study file) or a dict of dotted overrides.
      variants: cell presets (``lstm-lab variants``) or dicts ``{"name": ...,
        **CellSpec fields}``; each becomes ``model.cell``.
      space: dotted config key (or ``model.cell.<field>``) -> distribution.
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
      interleave: run the trials in the order trial 0 of every variant, then trial 1 of every variant, ...
        (default: all of the first variant's first), so that a study stopped part way has as many trials of
        each variant: for studies run over several sittings.
      variant_overrides: per-variant dotted overrides, ``{"nfg": {"model.hidden_size": 40}}`` (e.g. a hidden
        size per variant for equal-parameter comparisons), applied after ``overrides`` and before the sampled
        hyperparameters (a key the space also samples is the space's).
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
    variant_overrides: dict = dataclasses.field(default_factory=dict)
    interleave: bool = False
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
        if not isinstance(self.variant_overrides, dict):
            raise StudyError(f"study variant_overrides must be a dict {{variant: {{key: value}}}}; got "
                             f"{self.variant_overrides!r}.")
        for variant, over in self.variant_overrides.items():
            if variant not in names:
                raise StudyError(f"study variant_overrides: {variant!r} is not one of the variants "
                                 f"{', '.join(names)}.{did_you_mean(str(variant), names)}")
            if not isinstance(over, dict) or "model.cell" in over:
                raise StudyError(f"study variant_overrides[{variant!r}] must be a dict of dotted config keys "
                                 f"(not model.cell: that is the variant); got {over!r}.")
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
        if not isinstance(self.interleave, bool):
            raise StudyError(f"study interleave must be True or False; got {self.interleave!r}.")
        for name in ("trials_per_variant", "seeds", "grid_points", "population"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise StudyError(f"study {name} must be an integer >= 1; got {getattr(self, name)!r}.")
        keys = flat_keys()
        cell_keys = [CELL_PREFIX + f for f in cell_fields()]
        for key, dist in self.space.items():
            if not isinstance(key, str):
                raise StudyError(f"study space: keys are dotted config keys (strings); got {key!r}.")
            if key == CELL_PREFIX + "family":
                raise StudyError(f"study space: {key!r} cannot be searched: each variant decides its cell's "
                                 f"family (list variants of each family instead).")
            if key.startswith(CELL_PREFIX):
                if key not in cell_keys:
                    raise StudyError(f"study space: {key!r} is not a CellSpec field (model.cell.<field>)."
                                     f"{did_you_mean(key, cell_keys)}")
            elif key == "model.cell":
                raise StudyError("study space: 'model.cell' is the variant; search a field of it as "
                                 "'model.cell.<field>' (e.g. 'model.cell.zoneout_h').")
            elif key not in keys:
                raise StudyError(f"study space: {key!r} is not a config key.{did_you_mean(key, keys + cell_keys)}")
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
                for value in _extremes(key, dist):
                    try:
                        self.config_for(variant, {key: value}, 0)
                    except (ValueError, TypeError, KeyError) as e:
                        fix = ("A model.cell.* key applies to every variant: narrow the distribution, or leave "
                               "the variant out." if key.startswith(CELL_PREFIX) else
                               "Narrow the distribution (or change the base config).")
                        raise StudyError(f"study space {key!r}: {dist!r} reaches {key}={value!r}, an invalid config "
                                         f"(variant {variant!r}): {error_message(e, first_line=True)} "
                                         f"{fix}") from None
            self._check_cell_combinations(variant)

    def _check_cell_combinations(self, variant: str) -> None:
        """Every combination of the ``model.cell.*`` keys' range ends (Choice values) must make a valid
        CellSpec on ``variant`` (CellSpec's rules relate fields: ``coupled`` needs ``input_gate``)."""
        from lstm_lab.cells import CellSpec
        from lstm_lab.config import cell_from_config

        keys = sorted(k for k in self.space if k.startswith(CELL_PREFIX))
        if len(keys) < 2:
            return  # one key: checked on its own above
        flags = cell_from_config(self.cell_of(variant)).flags()
        for combo in itertools.product(*(_extremes(k, self.space[k]) for k in keys)):
            try:
                CellSpec(**{**flags, **{k[len(CELL_PREFIX):]: v for k, v in zip(keys, combo)}})
            except (ValueError, TypeError) as e:
                values = ", ".join(f"{k}={v!r}" for k, v in zip(keys, combo))
                raise StudyError(f"study space: {values} together make an invalid cell (variant {variant!r}): "
                                 f"{error_message(e, first_line=True)} Narrow the distributions.") from None

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

    def cell_for(self, variant: str, hyper: dict):
        """A trial's ``model.cell``: the variant's cell (:meth:`cell_of`) when ``hyper`` has no
        ``model.cell.<field>`` key; else the variant's cell as a dict of every CellSpec field with those values
        merged in (checked: ValueError/TypeError with CellSpec's own message)."""
        from lstm_lab.cells import CellSpec
        from lstm_lab.config import cell_from_config

        cell = self.cell_of(variant)
        sampled = split_cell_params(hyper)[1]
        if not sampled:
            return cell
        merged = {**cell_from_config(cell).flags(), **sampled}
        CellSpec(**merged)
        return merged

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
        """The training config of one trial: base, then the variant's overrides, the hyperparameters, the
        variant's cell with the sampled ``model.cell.<field>`` values (:meth:`cell_for`) and the seed. The one
        place a trial's config is made: solo runs, populations and every worker build it here."""
        from lstm_lab.config import apply_overrides

        overrides = split_cell_params(hyper)[0]
        return apply_overrides(self.base_config(), {**self.variant_overrides.get(variant, {}), **overrides,
                                                    "model.cell": self.cell_for(variant, hyper),
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
                "sampler_seed": self.sampler_seed, "grid_points": self.grid_points,
                **({"variant_overrides": {k: dict(v) for k, v in sorted(self.variant_overrides.items())}}
                   if self.variant_overrides else {}),
                **({"interleave": True} if self.interleave else {})}

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
            fields["variant_overrides"] = dict(record.get("variant_overrides") or {})
            fields["interleave"] = bool(record.get("interleave", False))
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
        if self.interleave:  # trial i of every variant before trial i + 1 of any (stable: variants keep their order)
            out.sort(key=lambda p: p["index"])
        return out

    def ask(self, trial) -> tuple[str, dict]:
        """A popped Optuna trial's variant and hyperparameters (actual values), through ``trial.suggest_*``:
        the planned values of random and grid search, the sampler's for tpe and qmc."""
        variant = trial.suggest_categorical("variant", self.variant_names)
        return variant, {key: dist.suggest(trial, key) for key, dist in sorted(self.space.items())}

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


def _extremes(key: str, dist: _Dist) -> list:
    """The values of ``key`` a study must accept: the distribution's extremes; for a continuous distribution
    of a ``model.cell.*`` key, as floats (what its draws are: ``Uniform(1, 4)`` is no ``num_heads``)."""
    values = dist.extremes()
    if key.startswith(CELL_PREFIX) and not dist.integer and not isinstance(dist, Choice):
        values = [float(v) for v in values]
    return values


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


# ---------------------------------------------------------------------------
# Planning: once, atomically
# ---------------------------------------------------------------------------
PLAN_LOCK = ".plan.lock"  # in the study directory: flock-ed while a process plans the study
PLAN_ATTR = "lstm_lab_planned"  # study user attr: the digest of the planned slots, set once they are all enqueued


class _FileLock(FileLock):
    """The planning lock (:class:`~lstm_lab._io.FileLock`, waiting, saying once that it waits). A study directory
    moved aside by ``--force`` takes its lock file along: the new directory's file is then locked."""

    def __init__(self, path, *, log: Callable[[str], None] | None = None, what: str = ""):
        on_wait = (lambda: log(f"waiting for another process planning {what or pathlib.Path(path).parent}")) \
            if log is not None else None
        super().__init__(path, wait=True, on_wait=on_wait)

    def move_dir_aside(self, aside) -> None:
        """Move the locked directory to ``aside`` and hold the lock of a fresh one at the old path (the old
        lock is released only then: a process waiting on it finds the new directory's lock held)."""
        old, self.fd = self.fd, None
        shutil.move(str(self.path.parent), str(aside))
        self.acquire()
        if old is not None:
            os.close(old)


@contextlib.contextmanager
def _db_plan_lock(rdb, name: str, study_dir: pathlib.Path, log: Callable[[str], None]):
    """Held while a study is planned, on the database side: planners that share a database but not a study
    directory (PostgreSQL/MySQL from several machines, or one SQLite file from several study directories)
    plan one at a time. PostgreSQL: an advisory lock; MySQL: ``GET_LOCK``; SQLite outside the study
    directory: a lock file beside the database. Other databases get no lock: there the plan marker and the
    slots, read again right before enqueueing, narrow the race to the moment between that read and the
    enqueueing (two planners started within it could enqueue a slot twice; a slot's latest trial then
    counts, the other stays WAITING and is run once more)."""
    import sqlalchemy as sa

    backend = rdb.engine.url.get_backend_name()
    key = int.from_bytes(hashlib.sha256(f"lstm_lab plan {name}".encode()).digest()[:8], "big", signed=True)
    if backend == "postgresql":
        with rdb.engine.connect() as conn:
            if not conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
                log(f"waiting for another process planning study {name!r} (a lock in the database)")
                conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            conn.commit()
            try:
                yield
            finally:
                try:
                    conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()
                except Exception:  # noqa: BLE001 - a lost connection released its locks
                    conn.invalidate()
        return
    if backend in ("mysql", "mariadb"):
        lock_name = f"lstm_lab_plan_{key & 0xFFFFFFFFFFFF:x}"
        with rdb.engine.connect() as conn:
            conn.execute(sa.text("SELECT GET_LOCK(:n, 3600)"), {"n": lock_name})
            try:
                yield
            finally:
                try:
                    conn.execute(sa.text("SELECT RELEASE_LOCK(:n)"), {"n": lock_name})
                except Exception:  # noqa: BLE001
                    conn.invalidate()
        return
    path = db.sqlite_path(rdb.url) if backend == "sqlite" else None
    if path is not None and path.absolute().parent != study_dir.absolute():
        with _FileLock(path.absolute().with_name(path.name + PLAN_LOCK), log=log, what=f"study {name!r}"):
            yield
        return
    yield  # the study directory's lock covers its own study.db


def _plan_digest(plan: list[dict]) -> str:
    return hashlib.sha256("\n".join(sorted(p["slot"] for p in plan)).encode()).hexdigest()[:16]


def prepare_study(study: Study, study_dir, *, storage: str | None = None, force: bool = False,
                  log: Callable[[str], None] = print):
    """Create (or reopen) the study in its directory and database; enqueue every planned trial not yet there.

    Planning happens once, however many processes start at the same moment: it runs under a lock on the
    study directory (``.plan.lock``) and one on the database side (:func:`_db_plan_lock`), and ends with
    the plan's digest stored on the study (``lstm_lab_planned``); a planner that finds its own plan's digest
    there enqueues nothing (a plan that grew is compared slot by slot and only the new slots are enqueued).

    Refuses a directory or database that holds a different study unless ``force`` (a directory is then moved
    aside; a database study deleted), and a study directory whose database was emptied (unless ``force``).
    Nothing is written when the storage cannot be reached. study.json never holds a password.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db.quiet_optuna()
    sd = pathlib.Path(study_dir)
    record, fp = study.record(), study.fingerprint()
    rdb = None
    if storage is not None:  # an explicit URL: reach it before writing anything
        storage = db.absolute_sqlite(storage)
        rdb = db.connect(storage)
    with _FileLock(sd / PLAN_LOCK, log=log, what=f"study {study.name!r} in {sd}") as lock:
        existing = sd / "study.json"
        if existing.exists():
            old = db.study_dir_info(sd)
            if old.get("fingerprint") != fp:
                diff = sorted(k for k in set(record) | set(old.get("study", {}))
                              if json.dumps(record.get(k), sort_keys=True, default=str)
                              != json.dumps(old.get("study", {}).get(k), sort_keys=True, default=str))
                if not force:
                    raise db.StudyConflictError(
                        f"{str(sd)!r} holds study {old.get('study', {}).get('name')!r} from "
                        f"{old.get('source')!r}, which differs in {', '.join(diff)}. Use another --dir, or --force "
                        f"to move the old study aside.")
                aside = sd.with_name(f"{sd.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
                lock.move_dir_aside(aside)
                log(f"moved the previous study (it differed in {', '.join(diff)}) to {aside}")
            elif storage is None:
                storage = old["storage"]
                try:
                    db.check_schema(storage)  # study.json says the study is there: never plan into an emptied database
                except db.StorageError:
                    if not force:
                        raise
                    bad = db.sqlite_path(storage)
                    if bad is not None and bad.exists():  # --force: start over; the broken file is kept aside
                        aside = bad.with_name(f"{bad.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
                        bad.rename(aside)
                        log(f"moved the empty or broken database aside to {aside}")
        url = storage or db.default_url(sd)
        if rdb is None or storage != url:
            rdb = db.connect(url)
        with _db_plan_lock(rdb, study.name, sd, log):
            ostudy = _plan(study, sd, rdb, url, record, fp, force, log)
    return ostudy


def _plan(study: Study, sd: pathlib.Path, rdb, url: str, record: dict, fp: str, force: bool, log):
    import optuna

    try:
        ostudy = optuna.create_study(study_name=study.name, storage=rdb, direction=study.direction,
                                     sampler=study.sampler(), load_if_exists=True)
    except optuna.exceptions.StorageInternalError as e:
        raise db.StorageError(f"storage {db.masked_url(url)!r}: {db.first_line(e.__cause__ or e)}") from None
    stored = ostudy.user_attrs.get("lstm_lab_fingerprint")
    if stored is not None and stored != fp:
        if not force:
            raise db.StudyConflictError(f"storage {db.masked_url(url)!r} already has a study named {study.name!r} "
                                        f"from a different study file (fingerprint {stored} != {fp}). Rename the "
                                        f"study or use --force.")
        optuna.delete_study(study_name=study.name, storage=rdb)
        ostudy = optuna.create_study(study_name=study.name, storage=rdb, direction=study.direction,
                                     sampler=study.sampler())
        stored = None
    if stored is None:
        ostudy.set_user_attr("lstm_lab_source", study.source)  # for information only: never read back as code
        ostudy.set_user_attr("lstm_lab_population", study.population)
        ostudy.set_user_attr("lstm_lab_fingerprint", fp)
        ostudy.set_user_attr("lstm_lab_study", json.loads(json.dumps(record, default=str)))
        ostudy.set_user_attr("lstm_lab_params", study.describe_params())
    atomic_json(sd / "study.json", {"format": db.STUDY_JSON_FORMAT, "fingerprint": fp,
                                    "storage": db.url_for_disk(url, sd), "source": study.source,
                                    "population": study.population, "study": record,
                                    "params": study.describe_params()})
    plan = study.plan()
    digest = _plan_digest(plan)
    if ostudy.user_attrs.get(PLAN_ATTR) == digest:
        return ostudy  # planned already (by this command earlier, or by another process a moment ago)
    have = {t.user_attrs.get("slot") for t in ostudy.get_trials(deepcopy=False)}  # read again, under the locks
    todo = [p for p in plan if p["slot"] not in have]
    for p in todo:
        ostudy.enqueue_trial(p["params"], user_attrs={"slot": p["slot"], "variant": p["variant"],
                                                      "seed": p["seed"], "index": p["index"]})
    ostudy.set_user_attr(PLAN_ATTR, digest)
    if todo:
        log(f"study {study.name!r}: planned {len(todo)} trials in {db.masked_url(url)}")
    return ostudy


def attach_study(study: Study, study_dir, storage: str, log: Callable[[str], None] = print) -> None:
    """A worker joining a study that ``lstm-lab sweep`` planned in ``storage`` from another machine:
    check the stored study is this one and write the local ``study.json`` (without the password).
    Plans nothing."""
    info = db.info_from_db(study.name, storage)
    if info["fingerprint"] != study.fingerprint():
        raise db.StudyConflictError(f"storage {db.masked_url(storage)!r}: study {study.name!r} was planned from a "
                                    f"different study file ({info.get('source')}); this worker's {study.source} "
                                    f"differs. Workers must run the same study file.")
    sd = pathlib.Path(study_dir)
    sd.mkdir(parents=True, exist_ok=True)
    atomic_json(sd / "study.json", {**info, "format": db.STUDY_JSON_FORMAT, "storage": db.url_for_disk(storage, sd)})
    log(f"joined study {study.name!r} in {db.masked_url(storage)}")
