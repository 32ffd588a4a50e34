"""The study's trials as one typed table: :class:`StudyTable` (what :mod:`~.stats`, :mod:`~.plots` and the
report read), from a study directory (:func:`load`, through :mod:`lstm_lab.sweep.results`) or from data frames
(:func:`from_frames`).

Statistics use the trials whose status is ``"complete"`` and whose metric is finite (:attr:`StudyTable.done`);
the others are only counted.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from lstm_lab.sweep import space

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pandas as pd

__all__ = ["StudyTable", "from_frames", "load"]


@dataclasses.dataclass
class StudyTable:
    """One study's trials and what the analysis needs of its record.

    ``trials`` has one row per trial (``number``, ``variant``, ``status``, ``value``, a column per hyperparameter
    with its actual value, ``valid.*``/``test.*``, ...), with ``status`` (lower case), ``variant`` (a string)
    and ``value`` (a float) normalised; ``raw`` is the table as given. ``params``: hyperparameter column -> the
    distribution's description (``kind``, ``low``, ``high``, ``choices``, ``optuna_name``)."""

    name: str
    task: str
    metric: str
    direction: str
    baseline: str | None
    params: dict[str, dict[str, Any]]
    variants: list[str]  # display order: the study's, then any others seen
    trials: pd.DataFrame
    curves: pd.DataFrame | None = None
    raw: pd.DataFrame | None = None
    sign: float = dataclasses.field(init=False)  # +1: smaller is better; -1: larger is better
    done: pd.DataFrame = dataclasses.field(init=False)  # complete, with a finite value
    present: list[str] = dataclasses.field(init=False)  # variants with >= 1 complete trial, display order
    values: dict[str, np.ndarray] = dataclasses.field(init=False)  # variant -> its complete trials' values
    _short: dict[str, str] = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        if self.direction not in ("minimize", "maximize"):
            raise ValueError(f"info['direction'] must be 'minimize' or 'maximize', not {self.direction!r}")
        self.sign = 1.0 if self.direction == "minimize" else -1.0
        df = self.trials
        self.done = df[(df["status"] == "complete") & np.isfinite(df["value"].to_numpy(dtype=float))]
        self.values = {v: self.done.loc[self.done["variant"] == v, "value"].to_numpy(dtype=float)
                       for v in self.variants}
        self.present = [v for v in self.variants if len(self.values[v])]
        short = {col: col.rsplit(".", 1)[-1] for col in self.params}
        clash = {s for s in short.values() if list(short.values()).count(s) > 1}
        self._short = {col: (col if s in clash else s) for col, s in short.items()}

    def kind(self, col: str) -> str:
        return str(self.params.get(col, {}).get("kind", ""))

    def label(self, col: str) -> str:
        """A hyperparameter's short name: ``optim.learning_rate`` -> ``learning_rate`` (the full key where two
        would read the same)."""
        return self._short.get(col, col)

    def search_label(self, col: str) -> str:
        """The name of the searched value: ``1 - momentum`` for a ``OneMinusLogUniform`` momentum."""
        return space.search_label(self.kind(col), self.label(col))

    def search_values(self, col: str, rows: pd.DataFrame | None = None) -> np.ndarray:
        """A numeric hyperparameter of ``rows`` (default: :attr:`done`) on its searched scale (``1 - momentum``)."""
        import pandas as pd

        rows = self.done if rows is None else rows
        return space.to_search(self.kind(col), pd.to_numeric(rows[col], errors="coerce").to_numpy(dtype=float))

    def best(self, variant: str | None = None) -> pd.Series:
        """The best complete trial (of ``variant``)."""
        d = self.done if variant is None else self.done[self.done["variant"] == variant]
        return d.loc[(self.sign * d["value"]).idxmin()]


def from_frames(info: dict[str, Any], trials: pd.DataFrame, curves: pd.DataFrame | None = None) -> StudyTable:
    """A :class:`StudyTable` from the study's ``info`` (``name``, ``task``, ``metric``, ``direction``, ``baseline``,
    ``variants``, ``params``; see :func:`lstm_lab.sweep.results.study_meta`), its trials table and its learning
    curves. Raises ValueError when no trial is complete with a finite value."""
    import pandas as pd

    metric = str(info.get("metric", "value"))
    df = trials.reset_index(drop=True)  # a copy, with unique labels for idxmin/loc
    df["status"] = df["status"].astype(str).str.lower() if "status" in df else "complete"
    df["variant"] = df["variant"].fillna("?").astype(str) if "variant" in df else "?"
    df["value"] = pd.to_numeric(df["value"], errors="coerce") if "value" in df else np.nan
    variants = [str(v) for v in info.get("variants") or []]
    variants += [v for v in dict.fromkeys(df["variant"]) if v not in variants]
    st = StudyTable(name=str(info.get("name", "study")), task=str(info.get("task", "")), metric=metric,
                    direction=str(info.get("direction", "minimize")).lower(),
                    baseline=None if info.get("baseline") is None else str(info["baseline"]),
                    params={str(k): dict(v) for k, v in (info.get("params") or {}).items()}, variants=variants,
                    trials=df, curves=curves, raw=trials)
    if st.done.empty:
        counts = df["status"].value_counts().to_dict() if len(df) else {}
        raise ValueError(f"no completed trials with a finite {metric} yet (trials by status: {counts})")
    return st


def load(study_dir, *, storage: str | None = None, curves: bool = True) -> StudyTable:
    """The :class:`StudyTable` of a study directory (or, with ``storage``, of the study of that name in the
    database): its trials (latest attempt of each slot) and, with ``curves``, its learning curves."""
    from lstm_lab.sweep import results

    info = results.study_meta(study_dir, storage=storage)
    trials = results.load_trials(study_dir, storage=storage)
    cv = results.load_curves(study_dir, storage=storage, trials=trials) if curves else None
    return from_frames(info, trials, cv)
