"""The statistics of an Odyssey-style study (Greff et al. 2017, "LSTM: A Search Space Odyssey"): arrays and
tables in, tables out. The report and notebook 03 both call these, so they print the same numbers.

* :func:`top_fraction`: a variant's best 10% ("how does it do when well tuned").
* :func:`welch_vs_baseline`: Welch's unequal-variance t-test of every variant against the baseline.
* :func:`fanova_importance`: fANOVA (Hutter et al., 2014): a random forest fitted to (hyperparameters ->
  metric) splits the metric's variance into the share each hyperparameter explains alone; over all trials
  (with the variant as one more factor) and per variant.

fANOVA cost grows faster than linearly with the number of trials (optuna's implementation walks every tree in
Python), so each analysis uses at most :data:`FANOVA_MAX_TRIALS` trials (a seeded random subsample, stated in
the notes), and the per-variant analyses share :data:`FANOVA_PER_VARIANT_BUDGET` trials. Categorical factors
(the variant, ``choice`` hyperparameters) enter the forest as an integer index rather than optuna's one-hot
encoding, whose marginalisation is exponential in the number of categories (20 variants x 200 trials did not
finish in minutes; as an index it takes about two seconds). The forest splits an index between neighbouring
codes, i.e. between categories, and fANOVA's uniform measure over the index weighs every category the same, so
the variance split is still that of the categories. Numeric hyperparameters enter on the scale they were
searched on (:mod:`lstm_lab.sweep.space`: log scales, ``1 - momentum``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from lstm_lab.sweep import space

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pandas as pd

__all__ = ["ALPHA", "FANOVA_MIN_TRIALS", "FANOVA_MAX_TRIALS", "FANOVA_PER_VARIANT_BUDGET", "FANOVA_PER_VARIANT_MIN",
           "top_fraction", "welch_vs_baseline", "fanova_importance"]

#: Significance level of the Welch tests.
ALPHA = 0.05
#: Fewest complete trials an fANOVA analysis runs on.
FANOVA_MIN_TRIALS = 4
#: Most trials one fANOVA analysis uses (a seeded random subsample beyond that).
FANOVA_MAX_TRIALS = 300
#: Trials shared by all per-variant fANOVA analyses (each gets at least FANOVA_PER_VARIANT_MIN).
FANOVA_PER_VARIANT_BUDGET = 600
FANOVA_PER_VARIANT_MIN = 40


def _sign(direction: str) -> float:
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction must be 'minimize' or 'maximize', not {direction!r}")
    return 1.0 if direction == "minimize" else -1.0


def top_fraction(values, direction: str = "minimize", fraction: float = 0.1) -> np.ndarray:
    """The best ``ceil(fraction * n)`` values (at least one; none of none) in the study's direction, best first."""
    values = np.asarray(values, dtype=float)
    k = max(1, math.ceil(round(len(values) * fraction, 9)))
    return values[np.argsort(_sign(direction) * values, kind="stable")[:k]]


def _welch(a: np.ndarray, b: np.ndarray, sign: float, alpha: float) -> dict:
    from scipy import stats

    mean = float(a.mean()) if len(a) else math.nan
    base = float(b.mean()) if len(b) else math.nan
    res = {"n": len(a), "mean": mean, "baseline_mean": base, "difference": mean - base, "t": math.nan,
           "p_value": math.nan, "ci_low": math.nan, "ci_high": math.nan, "result": "n/a (n < 2)"}
    if len(a) < 2 or len(b) < 2:
        return res
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return {**res, "result": "n/a (no variance)"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = stats.ttest_ind(a, b, equal_var=False)
        try:
            ci = r.confidence_interval(1 - alpha)
            res.update(ci_low=float(ci.low), ci_high=float(ci.high))
        except Exception:  # noqa: BLE001 - older scipy, or a degenerate case
            pass
    t, p = float(r.statistic), float(r.pvalue)
    if not (math.isfinite(t) and math.isfinite(p)):
        return {**res, "result": "n/a (no variance)"}
    better = sign * res["difference"] < 0
    return {**res, "t": t, "p_value": p, "result": (("better" if better else "worse") + " *") if p < alpha else "n.s."}


def welch_vs_baseline(values: Mapping[str, Any], baseline: str, *, direction: str = "minimize",
                      alpha: float = ALPHA) -> pd.DataFrame:
    """Welch's t-test (``scipy.stats.ttest_ind(equal_var=False)``) of each variant's values against the
    baseline's. ``values``: variant -> its values (e.g. complete trials, or their :func:`top_fraction`).

    One row per variant but the baseline, in ``values``' order (index ``variant``): ``n``, ``mean``,
    ``baseline_mean``, ``difference`` (variant mean - baseline mean), ``t``, ``p_value``, the ``1 - alpha``
    confidence interval of the difference (``ci_low``, ``ci_high``; NaN where not computed) and ``result``:
    ``"better *"`` / ``"worse *"`` (p < alpha, in the study's direction), ``"n.s."``, ``"n/a (n < 2)"`` or
    ``"n/a (no variance)"``."""
    import pandas as pd

    sign = _sign(direction)
    b = np.asarray(values[baseline], dtype=float)
    rows = {v: _welch(np.asarray(x, dtype=float), b, sign, alpha) for v, x in values.items() if v != baseline}
    cols = ["n", "mean", "baseline_mean", "difference", "t", "p_value", "ci_low", "ci_high", "result"]
    return pd.DataFrame.from_dict(rows, orient="index", columns=cols).rename_axis("variant")


def fanova_importance(trials: pd.DataFrame, params: Mapping[str, Mapping[str, Any]], *, direction: str = "minimize",
                      variants: Sequence[str] | None = None, metric: str = "value", include_variant: bool = True,
                      max_trials: int = FANOVA_MAX_TRIALS, per_variant_budget: int = FANOVA_PER_VARIANT_BUDGET,
                      per_variant_min: int = FANOVA_PER_VARIANT_MIN, seed: int = 0) -> pd.DataFrame:
    """fANOVA importance (optuna's ``FanovaImportanceEvaluator(seed=seed)``: main effects, normalised to sum to 1
    per column) over all trials and per variant.

    Args:
        trials: one row per trial: ``value`` (the metric), ``variant`` and a column per hyperparameter (actual
            values, as :func:`lstm_lab.sweep.trials` gives them). Rows whose ``status`` (if there is one) is not
            ``complete``, whose value is not finite or that miss a hyperparameter are left out.
        params: hyperparameter column -> its distribution's description (``kind``, ``low``, ``high``,
            ``choices``), as the study stores it.
        direction: the study's direction.
        variants: the order in which the variants are coded and analysed (default: as first seen); variants not
            listed follow as first seen.
        metric: the metric's name, for the notes.
        include_variant: the variant as one more factor of the all-trials analysis.

    Returns a table: one row per hyperparameter (index ``hyperparameter``: the column names, and ``variant``),
    sorted by the all-trials importance (else in ``params``' order); a column ``all`` and one per variant
    analysed (numeric hyperparameters only); NaN where a hyperparameter did not enter an analysis.
    ``.attrs["constant"]``: column -> the hyperparameters that did not vary there; ``.attrs["notes"]``: what was
    skipped or subsampled, in words.
    """
    import optuna
    import pandas as pd
    from optuna.distributions import IntDistribution
    from optuna.trial import TrialState

    _sign(direction)  # (a bad direction is an error here too)
    names = list(params)
    notes: list[str] = []
    importance: dict[str, dict[str, float]] = {}
    constant: dict[str, list[str]] = {}

    def table(order: list[str]) -> pd.DataFrame:
        df = pd.DataFrame({c: {n: importance[c].get(n, np.nan) for n in order} for c in importance},
                          index=pd.Index(order, name="hyperparameter"), columns=list(importance), dtype=float)
        df.attrs.update(constant=constant, notes=notes)
        return df

    if not names:
        notes.append("Skipped: the study declares no hyperparameters.")
        return table([])
    df = trials
    ok = np.isfinite(pd.to_numeric(df["value"], errors="coerce").to_numpy(dtype=float))
    if "status" in df:
        ok &= (df["status"].astype(str).str.lower() == "complete").to_numpy()
    if all(n in df for n in names):
        ok &= df[names].notna().all(axis=1).to_numpy()
    else:
        ok[:] = False
    use_variant = include_variant and "variant" in df and "variant" not in names
    df = df[ok]
    if len(df) < FANOVA_MIN_TRIALS:
        notes.append(f"Skipped: {len(df)} complete trial(s) carry all hyperparameters ({', '.join(names)}); fANOVA "
                     f"needs at least {FANOVA_MIN_TRIALS}.")
        return table(names)

    # the search space (categoricals as an index: see the module docstring) and each row's coded values
    dists: dict[str, Any] = {}
    coded: dict[str, np.ndarray] = {}
    for n in names:
        spec = params[n]
        if spec.get("kind") == "choice":
            seen = list(dict.fromkeys(df[n]))
            cats = list(spec.get("choices") or []) + [c for c in seen if c not in (spec.get("choices") or [])]
            codes = {c: i for i, c in enumerate(cats)}
            dists[n] = IntDistribution(0, max(len(cats) - 1, 0))
            coded[n] = df[n].map(codes).to_numpy(dtype=int)
        else:
            d = space.optuna_distribution(spec)
            x = space.to_search(spec.get("kind", ""), pd.to_numeric(df[n]).to_numpy(dtype=float))
            x = np.clip(x, d.low, d.high)  # (1 - (1 - x) can leave the range by a rounding)
            dists[n], coded[n] = d, (np.rint(x).astype(int) if isinstance(d, IntDistribution) else x)
    variant_col = df["variant"].astype(str).to_numpy() if "variant" in df else np.full(len(df), "?")
    seen = list(dict.fromkeys(variant_col))
    order = [v for v in (variants or []) if v in seen] + [v for v in seen if v not in (variants or [])]
    if use_variant:
        dists["variant"] = IntDistribution(0, max(len(order) - 1, 0))
        coded["variant"] = np.array([order.index(v) for v in variant_col], dtype=int)
    values = pd.to_numeric(df["value"]).to_numpy(dtype=float)
    rows = [(variant_col[i], float(values[i]), {n: coded[n][i].item() for n in coded}) for i in range(len(df))]

    # the forest's features in Optuna's order of parameter names ("1-optim.momentum" for a OneMinusLogUniform),
    # as in the study's database: the same names give the same forest
    oname = {n: str(params[n].get("optuna_name") or n) for n in names}
    oname["variant"] = "variant"
    rng = np.random.default_rng(seed)
    subsampled: dict[str, int] = {}  # column -> trials before subsampling

    def analyse(column: str, subset: list[tuple], factors: list[str], cap: int) -> None:
        label = "all trials" if column == "all" else f"variant {column}"
        if len(subset) < FANOVA_MIN_TRIALS:
            notes.append(f"{label}: skipped, {len(subset)} complete trial(s) (need {FANOVA_MIN_TRIALS}).")
            return
        vals = np.array([r[1] for r in subset])
        if np.ptp(vals) == 0:
            notes.append(f"{label}: skipped, all {len(subset)} trials have the same {metric}.")
            return
        varying = [n for n in factors if len({r[2][n] for r in subset}) > 1]
        constant[column] = [n for n in factors if n not in varying]
        if not varying:
            notes.append(f"{label}: skipped, no hyperparameter takes two distinct values.")
            return
        if len(subset) > cap:
            keep = np.sort(rng.choice(len(subset), cap, replace=False))
            subsampled[column] = len(subset)
            subset = [subset[i] for i in keep]
        try:
            study = optuna.create_study(direction=direction)
            study.add_trials([optuna.trial.create_trial(
                state=TrialState.COMPLETE, value=value,
                params={oname[n]: p[n] for n in varying}, distributions={oname[n]: dists[n] for n in varying})
                for _, value, p in subset])
            imp = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed),
                params=[oname[n] for n in varying])
        except Exception as e:  # noqa: BLE001 - a failed analysis is reported, never fatal
            notes.append(f"{label}: fANOVA failed ({type(e).__name__}: {e}).")
            return
        importance[column] = {n: float(imp[oname[n]]) for n in sorted(varying, key=lambda n: -imp[oname[n]])}

    factors = names + (["variant"] if use_variant else [])
    numeric = [n for n in names if params[n].get("kind") != "choice"]
    groups = {v: [r for r in rows if r[0] == v] for v in order}
    groups = {v: g for v, g in groups.items() if g}
    cap = min(max_trials, max(per_variant_min, per_variant_budget // max(1, len(groups))))
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        analyse("all", rows, factors, max_trials)
        if numeric:
            for v, g in groups.items():
                analyse(v, g, numeric, cap)
        else:
            notes.append("Per-variant analyses skipped: no numeric hyperparameters.")
    finally:
        optuna.logging.set_verbosity(verbosity)
    if "all" in subsampled:
        notes.append(f"all trials: fANOVA on a random subsample of {max_trials} of {subsampled['all']} trials (to "
                     f"bound its run time).")
    per = {c: n for c, n in subsampled.items() if c != "all"}
    if per:
        notes.append(f"Per variant: fANOVA on a random subsample of {cap} trials for "
                     + ", ".join(f"{c} (of {n})" for c, n in per.items()) + ".")
    if "all" in importance:  # overall importance first, then declaration order
        factors = sorted(factors, key=lambda n: -importance["all"].get(n, -1.0))
    return table(factors)
