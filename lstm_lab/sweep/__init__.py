"""Sweeps: ablation studies over cell variants x hyperparameters x seeds, stored in an Optuna database.

    lstm-lab sweep experiments/quick.py                 # plan, run (resumable), report
    lstm-lab sweep experiments/odyssey_copy.py --workers 4 --population 16
    lstm-lab status studies/quick [--json]
    lstm-lab report studies/quick                       # lstm_lab.analysis.report

From Python::

    from lstm_lab import sweep
    sweep.run("experiments/quick.py")                   # the same as the command
    df = sweep.trials("studies/quick")                  # one row per trial (pandas)
    curves = sweep.curves("studies/quick")              # learning curves, long form

The package, in the order of the data: :mod:`~.space` (distributions), :mod:`~.study` (study files, the plan,
planning it into the database), :mod:`~.storage` (URLs, retries, liveness, Optuna's internals),
:mod:`~.worker` (popping and running trials), :mod:`~.results` (status, trials, curves). The report and the
statistics are :mod:`lstm_lab.analysis`, which reads :mod:`~.results`; nothing here imports it.

Optuna, pandas and matplotlib are imported only when a function needs them,
so ``import lstm_lab`` stays free of them.
"""

from __future__ import annotations

import pathlib

from lstm_lab.sweep.space import (ODYSSEY_SPACE, ODYSSEY_SPACE_POPULATION, Choice, IntLogUniform, IntUniform,
                                  LogUniform, OneMinusLogUniform, StudyError, Uniform)
from lstm_lab.sweep.study import ODYSSEY_BASE, ODYSSEY_VARIANTS, Study, load_study

__all__ = ["Study", "StudyError", "LogUniform", "Uniform", "OneMinusLogUniform", "IntLogUniform", "IntUniform",
           "Choice", "ODYSSEY_VARIANTS", "ODYSSEY_SPACE", "ODYSSEY_SPACE_POPULATION", "ODYSSEY_BASE", "load_study",
           "run", "trials", "curves", "status", "default_dir", "worker_study"]

_MOVED = {name: f"lstm_lab.analysis.report.{name}" for name in ("report", "report_is_current", "REPORT_STATE")}


def __getattr__(name: str):
    if name in _MOVED:  # (never imported from here: the analysis reads the sweep, not the other way)
        raise AttributeError(f"lstm_lab.sweep.{name} moved to {_MOVED[name]}")
    raise AttributeError(f"module 'lstm_lab.sweep' has no attribute {name!r}")


def default_dir(study: Study) -> pathlib.Path:
    """``studies/<name>`` under the current directory."""
    return pathlib.Path("studies") / study.name


def run(study, study_dir=None, *, workers: int = 1, population: int = 1, storage: str | None = None,
        force: bool = False, log=print) -> dict:
    """Plan (or reopen) a study and run every trial not yet done; returns :func:`status`."""
    from lstm_lab.sweep.worker import sweep

    study = load_study(study) if not isinstance(study, Study) else study
    return sweep(study, study_dir or default_dir(study), workers=workers, population=population, storage=storage,
                 force=force, log=log)


def worker_study(arg, study_dir=None, storage: str | None = None) -> tuple[Study, pathlib.Path]:
    """What ``lstm-lab worker ARG`` runs: ``ARG`` is a study file (executed: it is the user's own Python), a
    study directory, or, with ``storage``, the name of a study in that database. For a directory or a name
    the study is rebuilt as data from its stored record (the resolved base config, the variants, the
    distributions, the search; :meth:`Study.from_record`), never by executing a file or text it names, and
    must have the stored fingerprint. Returns the study and its directory."""
    from lstm_lab.sweep.storage import info_from_db, study_dir_info

    path = pathlib.Path(arg)
    if path.is_file():
        study = load_study(path)
        return study, pathlib.Path(study_dir) if study_dir else default_dir(study)
    if (path / "study.json").is_file():
        info, sd = study_dir_info(path, storage), path
    elif storage is not None and not path.exists():
        info, sd = info_from_db(path.name, storage), None
    else:
        raise FileNotFoundError(f"{arg!r} is neither a study file nor a study directory"
                                + ("" if storage else " (a study name needs --storage URL)") + ".")
    study = Study.from_record(info["study"], source=info.get("source") or "", population=info.get("population") or 1)
    if study.fingerprint() != info.get("fingerprint"):
        raise StudyError(f"{arg!r}: the stored study record does not rebuild the planned study (fingerprint "
                         f"{study.fingerprint()} != {info.get('fingerprint')}); pass the study file instead.")
    sd = pathlib.Path(study_dir) if study_dir else (sd or default_dir(study))
    return study, sd


def trials(study_dir, *, storage: str | None = None, all_attempts: bool = False):
    """A pandas DataFrame with one row per planned trial (see :func:`lstm_lab.sweep.results.load_trials`)."""
    from lstm_lab.sweep.results import load_trials

    return load_trials(study_dir, storage=storage, all_attempts=all_attempts)


def curves(study_dir, *, storage: str | None = None):
    """Learning curves of every trial: ``number, variant, slot, step, split, loss``."""
    from lstm_lab.sweep.results import load_curves

    return load_curves(study_dir, storage=storage)


def status(study_dir, *, storage: str | None = None) -> dict:
    """Per-variant and total counts, the best value, an ETA (see :func:`lstm_lab.sweep.results.study_status`)."""
    from lstm_lab.sweep.results import study_status

    return study_status(study_dir, storage=storage)
