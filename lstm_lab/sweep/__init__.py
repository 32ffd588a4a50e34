"""Sweeps: ablation studies over cell variants x hyperparameters x seeds, stored in an Optuna database.

    lstm-lab sweep experiments/quick.py                 # plan, run (resumable), report
    lstm-lab sweep experiments/odyssey_copy.py --workers 4 --population 16
    lstm-lab status studies/quick [--json]
    lstm-lab report studies/quick

From Python::

    from lstm_lab import sweep
    sweep.run("experiments/quick.py")                   # the same as the command
    df = sweep.trials("studies/quick")                  # one row per trial (pandas)
    curves = sweep.curves("studies/quick")              # learning curves, long form

Optuna, pandas and matplotlib are imported only when a function needs them,
so ``import lstm_lab`` stays free of them.
"""

from __future__ import annotations

import pathlib

from lstm_lab.sweep.study import (ODYSSEY_BASE, ODYSSEY_SPACE, ODYSSEY_SPACE_POPULATION, ODYSSEY_VARIANTS, Choice, IntLogUniform, IntUniform,
                                  LogUniform, OneMinusLogUniform, Study, StudyError, Uniform, load_study)

__all__ = ["Study", "StudyError", "LogUniform", "Uniform", "OneMinusLogUniform", "IntLogUniform", "IntUniform",
           "Choice", "ODYSSEY_VARIANTS", "ODYSSEY_SPACE", "ODYSSEY_SPACE_POPULATION", "ODYSSEY_BASE", "load_study", "run", "trials", "curves",
           "status", "report", "report_is_current", "default_dir", "worker_study"]


def default_dir(study: Study) -> pathlib.Path:
    """``studies/<name>`` under the current directory."""
    return pathlib.Path("studies") / study.name


def run(study, study_dir=None, *, workers: int = 1, population: int = 1, storage: str | None = None,
        force: bool = False, log=print) -> dict:
    """Plan (or reopen) a study and run every trial not yet done; returns :func:`status`."""
    from lstm_lab.sweep.runner import sweep

    study = load_study(study) if not isinstance(study, Study) else study
    return sweep(study, study_dir or default_dir(study), workers=workers, population=population, storage=storage,
                 force=force, log=log)


def worker_study(arg, study_dir=None, storage: str | None = None) -> tuple[Study, pathlib.Path]:
    """What ``lstm-lab worker ARG`` runs: ``ARG`` is a study file (executed: it is the user's own Python), a
    study directory, or, with ``storage``, the name of a study in that database. For a directory or a name
    the study is rebuilt as data from its stored record (the resolved base config, the variants, the
    distributions, the search; :meth:`Study.from_record`), never by executing a file or text it names, and
    must have the stored fingerprint. Returns the study and its directory."""
    from lstm_lab.sweep.runner import _info_from_db, study_dir_info

    path = pathlib.Path(arg)
    if path.is_file():
        study = load_study(path)
        return study, pathlib.Path(study_dir) if study_dir else default_dir(study)
    if (path / "study.json").is_file():
        info, sd = study_dir_info(path, storage), path
    elif storage is not None and not path.exists():
        info, sd = _info_from_db(path.name, storage), None
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
    """A pandas DataFrame with one row per planned trial (see :func:`lstm_lab.sweep.runner.load_trials`)."""
    from lstm_lab.sweep.runner import load_trials

    return load_trials(study_dir, storage=storage, all_attempts=all_attempts)


def curves(study_dir, *, storage: str | None = None):
    """Learning curves of every trial: ``number, variant, slot, step, split, loss``."""
    from lstm_lab.sweep.runner import load_curves

    return load_curves(study_dir, storage=storage)


def status(study_dir, *, storage: str | None = None) -> dict:
    from lstm_lab.sweep.runner import study_status

    return study_status(study_dir, storage=storage)


REPORT_STATE = ".trials-digest"  # in the report directory: the trials the report was written from


def report(study_dir, out_dir=None, *, storage: str | None = None) -> pathlib.Path:
    """Write the Odyssey-style report (``report.md``, one-file ``report.html``, figures, ``trials.csv``); its
    path. ``<out>/.trials-digest`` records the trials it was written from (:func:`report_is_current`)."""
    import math

    from lstm_lab._io import atomic_json
    from lstm_lab.sweep.runner import load_curves, load_trials, open_study, study_dir_info, trials_digest

    info = study_dir_info(study_dir, storage)
    frozen = open_study(study_dir, storage).get_trials(deepcopy=False)
    df = load_trials(study_dir, storage=storage)
    complete = df[(df["status"] == "complete") & df["value"].map(lambda v: isinstance(v, float) and math.isfinite(v))]
    if complete.empty:
        counts = df["status"].value_counts().to_dict() if len(df) else {}
        raise StudyError(f"{str(study_dir)!r}: no completed trials to report on yet (trials by status: {counts}).")
    rec = info["study"]
    meta = {"name": rec["name"], "metric": rec["metric"], "direction": rec["direction"], "baseline": rec["baseline"],
            "variants": [v if isinstance(v, str) else v["name"] for v in rec["variants"]],
            "task": rec["base_config"]["task"]["name"], "params": info["params"]}
    from lstm_lab.sweep.reporting import build_report

    out = pathlib.Path(out_dir) if out_dir else pathlib.Path(study_dir) / "report"
    path = build_report(out, meta, df, load_curves(study_dir, storage=storage, trials=df), frozen)
    atomic_json(out / REPORT_STATE, {"digest": trials_digest(trials=frozen), "trials": len(frozen)})
    return path


def report_is_current(study_dir, out_dir=None, *, storage: str | None = None) -> bool:
    """Whether the report in ``out_dir`` (default ``<study_dir>/report``) was written from the study's trials as
    they are now (no trial added, finished or changed since)."""
    import json

    from lstm_lab.sweep.runner import open_study, trials_digest

    out = pathlib.Path(out_dir) if out_dir else pathlib.Path(study_dir) / "report"
    try:
        state = json.loads((out / REPORT_STATE).read_text())
    except (OSError, ValueError):
        return False
    if not all((out / name).is_file() for name in ("report.md", "report.html")):
        return False
    return state.get("digest") == trials_digest(open_study(study_dir, storage))
