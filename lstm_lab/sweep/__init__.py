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
           "status", "report", "default_dir", "worker_study"]


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
    """What ``lstm-lab worker ARG`` runs: ``ARG`` is a study file, a study directory (its ``study.json``
    names the file; its stored text is used when the file is not on this machine), or, with
    ``storage``, the name of a study in that database. Returns the study and its directory."""
    import tempfile

    from lstm_lab.sweep.runner import _info_from_db, study_dir_info

    path = pathlib.Path(arg)
    if path.is_file():
        study = load_study(path)
        return study, pathlib.Path(study_dir) if study_dir else default_dir(study)
    if (path / "study.json").is_file():
        info, sd = study_dir_info(path), path
    elif storage is not None and not path.exists():
        info, sd = _info_from_db(path.name, storage), None
    else:
        raise FileNotFoundError(f"{arg!r} is neither a study file nor a study directory"
                                + ("" if storage else " (a study name needs --storage URL)") + ".")
    src = info.get("source")
    if src and pathlib.Path(src).is_file():
        study = load_study(src)
    elif info.get("source_text"):
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="lstm_lab_study_")) / pathlib.Path(src or "study.py").name
        tmp.write_text(info["source_text"])
        study = load_study(tmp)
    else:
        raise FileNotFoundError(f"{arg!r}: the study file {src!r} is not on this machine and its text was not "
                                f"stored; pass the study file instead.")
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


def report(study_dir, out_dir=None, *, storage: str | None = None) -> pathlib.Path:
    """Write the Odyssey-style report (``report.md``, ``report.html``, figures, ``trials.csv``); its path."""
    import math

    from lstm_lab.sweep.runner import load_curves, load_trials, open_study, study_dir_info

    info = study_dir_info(study_dir, storage)
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

    frozen = open_study(study_dir, storage).get_trials(deepcopy=False)
    out = pathlib.Path(out_dir) if out_dir else pathlib.Path(study_dir) / "report"
    return build_report(out, meta, df, load_curves(study_dir, storage=storage, trials=df), frozen)
