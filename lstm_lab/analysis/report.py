"""Odyssey-style report of a hyperparameter study over LSTM variants (``lstm-lab report``).

Greff et al. (2017), "LSTM: A Search Space Odyssey", compared the vanilla LSTM with eight single-change variants
(no input gate, no forget gate, coupled input/forget gate, no peepholes, ...) by running an independent random
search over the same hyperparameters (learning rate, hidden size, momentum, input noise) for every variant and
task, then asking three questions of the results:

1. **Does a variant do better or worse than the vanilla LSTM?**  Box plots of the test metric over all trials
   and over the best 10% of each variant (their Fig. 3), with Welch's t-test of every variant against the
   baseline (unequal variances; significance at p < 0.05).  The top-10% view asks how a variant does when well
   tuned, the all-trials view how forgiving it is.
2. **Which hyperparameters matter?**  fANOVA splits the metric's variance into the share explained by each
   hyperparameter; over all trials (with the variant as one more factor) and per variant.
3. **How does the metric depend on each hyperparameter?**  The metric against each hyperparameter, per variant,
   with a smoothed trend (the empirical counterpart of their fANOVA marginal plots).

After the fANOVA, "Beside the Odyssey's findings" sets the paper's answers beside this study's numbers
(:func:`~.odyssey.odyssey_comparison`, which notebook 03 shows too).

:func:`report` reproduces that analysis for one study directory, plus learning curves of each variant's best
trial: ``report.md`` and ``report.html`` (the same blocks rendered twice, :mod:`~.render`; the HTML page embeds
its figures: one file to share), the figures (:mod:`~.plots`), ``report.json`` (the numbers, for scripts) and
``trials.csv``. The numbers come from :mod:`~.stats`, which notebook 03 calls too. :func:`build_report` does the
same from data frames; nothing here runs or changes a study.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import TYPE_CHECKING, Any

import numpy as np

from lstm_lab.analysis import data as study_data
from lstm_lab.analysis import plots, stats
from lstm_lab.analysis.odyssey import odyssey_comparison
from lstm_lab.analysis.render import (DASH, Block, BulletList, Heading, Image, Link, Paragraph, Table, fmt, fmt_p,
                                      fmt_param, is_finite, to_html, to_markdown)
from lstm_lab.sweep import space

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pandas as pd

    from lstm_lab.analysis.data import StudyTable

__all__ = ["report", "report_is_current", "build_report", "write_report", "importance", "REPORT_STATE"]

REPORT_STATE = ".trials-digest"  # in the report directory: the trials the report was written from
#: Statuses in the order the summary lists them (others follow alphabetically).
STATUS_ORDER = ("complete", "failed", "diverged", "interrupted", "running", "waiting")


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def report(study_dir, out_dir=None, *, storage: str | None = None) -> pathlib.Path:
    """Write the report of a study directory (or, with ``storage``, of the study of that name in the database)
    into ``out_dir`` (default ``<study_dir>/report``); the path of ``report.md``. ``<out>/.trials-digest``
    records the trials it was written from (:func:`report_is_current`)."""
    from lstm_lab._io import atomic_json
    from lstm_lab.sweep import StudyError
    from lstm_lab.sweep.results import trials_digest

    digest = trials_digest(study_dir, storage=storage)  # before reading them: a trial finished since is a change
    try:
        st = study_data.load(study_dir, storage=storage)
    except ValueError as e:
        raise StudyError(f"{str(study_dir)!r}: {e}") from None
    out = pathlib.Path(out_dir) if out_dir else pathlib.Path(study_dir) / "report"
    path = write_report(out, st)
    atomic_json(out / REPORT_STATE, {"digest": digest, "trials": len(st.trials)})
    return path


def report_is_current(study_dir, out_dir=None, *, storage: str | None = None) -> bool:
    """Whether the report in ``out_dir`` (default ``<study_dir>/report``) was written from the study's trials as
    they are now (no trial added, finished or changed since)."""
    from lstm_lab.sweep.results import trials_digest

    out = pathlib.Path(out_dir) if out_dir else pathlib.Path(study_dir) / "report"
    try:
        state = json.loads((out / REPORT_STATE).read_text())
    except (OSError, ValueError):
        return False
    if not all((out / name).is_file() for name in ("report.md", "report.html")):
        return False
    return state.get("digest") == trials_digest(study_dir, storage=storage)


def build_report(out_dir: str | pathlib.Path, info: dict[str, Any], trials: pd.DataFrame,
                 curves: pd.DataFrame | None = None) -> pathlib.Path:
    """Write the report of a study given as data into ``out_dir`` and return the path of ``report.md``.

    Args:
        out_dir: created if missing; receives ``report.md``, ``report.html``, ``report.json`` (the numbers),
            ``trials.csv`` and the figures (``distributions.png``, ``welch.png``, ``importance.png``,
            ``hyperparams.png``, ``curves.png``; a figure whose section is skipped is not written).
        info: the study: ``name``, ``task``, ``metric``, ``direction`` ("minimize"/"maximize"), ``baseline`` (a
            variant), ``variants`` (display order) and ``params`` (column -> ``{"kind", "low", "high",
            "choices", "optuna_name"}``).
        trials: one row per trial (``number``, ``variant``, ``status``, ``value``, the hyperparameter columns
            with their actual values, ...).  Rows with status ``"complete"`` and a finite ``value`` enter the
            statistics.
        curves: long-form learning curves (``number``, ``variant``, ``step``, ``split``, ``loss``); may be
            empty or None.

    Raises:
        ValueError: no trial is complete with a finite value.
    """
    return write_report(out_dir, study_data.from_frames(info, trials, curves))


def write_report(out_dir: str | pathlib.Path, st: StudyTable) -> pathlib.Path:
    """Write the report of ``st`` into ``out_dir``; the path of ``report.md``."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    numbers: dict[str, Any] = {}
    tables: dict[str, pd.DataFrame] = {}  # the Welch (all trials) and fANOVA tables, for the Odyssey section
    blocks: list[Block] = []
    blocks += _summary(st)
    blocks += _variants_section(st)
    blocks += _distributions(st, out)
    blocks += _welch_section(st, out, numbers, tables)
    blocks += _importance_section(st, out, numbers, tables)
    blocks += _odyssey_section(st, tables)
    blocks += _hyperparams(st, out)
    blocks += _curves(st, out)
    (st.trials if st.raw is None else st.raw).to_csv(out / "trials.csv", index=False)
    blocks += [Heading("Files"),
               BulletList([(Link("trials.csv"), ": every trial of the study (all statuses), one row each."),
                           "report.md / report.html: this report (report.html embeds its figures: one file to "
                           "share)."])]
    _write_numbers(st, numbers, out / "report.json")
    title = f"{st.name}: LSTM variant study"
    (out / "report.html").write_text(to_html(blocks, title, base_dir=out), encoding="utf-8")
    path = out / "report.md"
    path.write_text(to_markdown(blocks), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
def _summary(st: StudyTable) -> list[Block]:
    counts = st.trials["status"].value_counts()
    order = [s for s in STATUS_ORDER if s in counts] + sorted(s for s in counts.index if s not in STATUS_ORDER)
    counts = {s: int(counts[s]) for s in order}
    n_bad = int((st.trials["status"] == "complete").sum()) - len(st.done)
    best_row = st.best()
    hps = ", ".join(f"{st.label(c)} = {fmt_param(best_row[c], spec.get('kind', ''))}"
                    for c, spec in st.params.items() if c in best_row.index)
    extra = [c for c in st.trials.columns if c.startswith(("valid.", "test.")) and c != st.metric
             and c in best_row.index and isinstance(best_row[c], (float, int, np.number))]
    others = ", ".join(f"{c} = {fmt(best_row[c])}" for c in extra)
    seed = f", seed {int(best_row['seed'])}" if "seed" in best_row.index and is_finite(best_row["seed"]) else ""
    lines = [
        f"Study {st.name}" + (f" on task {st.task}" if st.task else "")
        + f": {len(st.trials)} trials ({', '.join(f'{n} {s}' for s, n in counts.items())}). "
        f"Metric: {st.metric} ({st.direction}); baseline variant: {st.baseline or DASH}; "
        f"{len(st.present)} of {len(st.variants)} variants have complete trials.",
        f"Best trial overall: #{int(best_row['number']) if 'number' in best_row.index else '?'} "
        f"({best_row['variant']}{seed}) with {st.metric} = {fmt(best_row['value'])}"
        + (f" ({others})" if others else "") + (f"; hyperparameters: {hps}." if hps else "."),
    ]
    if n_bad:
        lines.append(f"{n_bad} trial(s) marked complete have no finite {st.metric} and are left out of "
                     "the statistics.")
    return [Heading(f"{st.name}: LSTM variant study", 1), Paragraph(" ".join(lines))]


def _variants_section(st: StudyTable) -> list[Block]:
    rows = []
    for v in st.variants:
        sub = st.trials[st.trials["variant"] == v]
        vals = st.values[v]
        failed = int((sub["status"] == "failed").sum())
        diverged = int((sub["status"] == "diverged").sum())
        label = f"{v} (baseline)" if v == st.baseline else v
        if len(vals):
            best = st.best(v)
            best_no = f"#{int(best['number'])}" if "number" in best.index else DASH
            top = stats.top_fraction(vals, st.direction)
            rows.append([label, str(len(vals)), str(failed), str(diverged), fmt(best["value"]), best_no,
                         fmt(float(np.median(vals))), f"{fmt(float(top.mean()))} (n={len(top)})",
                         fmt(float(vals.mean()))])
        else:
            rows.append([label, "0", str(failed), str(diverged)] + [DASH] * 5)
    return [
        Heading("Variants"),
        Paragraph(f"{st.metric} per variant over its complete trials ({st.direction}). "
                  "Top 10% is the mean of the best ceil(n/10) trials of the variant."),
        Table(["variant", "complete", "failed", "diverged", "best", "best trial", "median", "top 10% mean",
               "mean"], rows),
    ]


def _distributions(st: StudyTable, out: pathlib.Path) -> list[Block]:
    plots.save(plots.distributions(st), out / "distributions.png")
    return [
        Heading("Metric distributions"),
        Paragraph(f"Distribution of {st.metric} per variant over all complete trials and over the top 10% "
                  "of each variant (boxes: quartiles and median; red diamond: mean; whiskers: the whole range; points: "
                  "trials). "
                  f"The baseline ({st.baseline}) is shaded; the dotted line is its median. "
                  "This is the Odyssey's Fig. 3: the top-10% panel compares the variants when well tuned, "
                  "the all-trials panel shows how sensitive each one is to its hyperparameters."),
        Image("distributions.png", "metric distributions per variant"),
    ]


def _none_if_nan(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def _welch_section(st: StudyTable, out: pathlib.Path, numbers: dict, tables: dict) -> list[Block]:
    blocks: list[Block] = [Heading("Welch's t-test against the baseline")]
    if st.baseline is None or st.baseline not in st.present:
        why = "no baseline is set" if st.baseline is None else f"the baseline {st.baseline} has no complete trials"
        return blocks + [Paragraph(f"Skipped: {why}.")]
    if not [v for v in st.variants if v != st.baseline]:
        return blocks + [Paragraph("Skipped: the study has no variant besides the baseline.")]
    top = {v: stats.top_fraction(x, st.direction) for v, x in st.values.items()}
    results = {"all": stats.welch_vs_baseline(st.values, st.baseline, direction=st.direction),
               "top": stats.welch_vs_baseline(top, st.baseline, direction=st.direction)}
    tables["welch"] = results["all"]
    better = "lower" if st.sign > 0 else "higher"
    blocks.append(Paragraph(
        f"Each variant's {st.metric} against the baseline {st.baseline} with Welch's unequal-variance t-test "
        f"(scipy.stats.ttest_ind, equal_var=False); {better} is better; * marks p < {stats.ALPHA}. "
        f"Difference = variant mean - baseline mean. Baseline: n = {len(st.values[st.baseline])} (all), "
        f"{len(top[st.baseline])} (top 10%)."))
    cols = ["variant", "n", "mean", "baseline mean", "difference", "t", "p-value", "result"]
    for key, title in (("all", "All complete trials"), ("top", "Top 10% of each variant")):
        rows = [[v, str(int(r["n"])), fmt(r["mean"]), fmt(r["baseline_mean"]), fmt(r["difference"]),
                 DASH if math.isnan(r["t"]) else f"{r['t']:.3g}", fmt_p(r["p_value"]), r["result"]]
                for v, r in results[key].iterrows()]
        blocks += [Heading(title, 3), Table(cols, rows, ["left"] + ["right"] * 6 + ["left"])]
    numbers["welch"] = {v: {"n": int(r["n"]), "mean": r["mean"], "difference": r["difference"],
                            "t": _none_if_nan(r["t"]), "p_value": _none_if_nan(r["p_value"]), "result": r["result"]}
                        for v, r in results["all"].iterrows()}
    plots.save(plots.welch(results["all"], results["top"], metric=st.metric, baseline=st.baseline), out / "welch.png")
    blocks.append(Image("welch.png", "mean difference against the baseline",
                        f"Mean difference to {st.baseline} with the 95% Welch confidence interval; "
                        "green: significantly better, red: significantly worse, grey: not significant or "
                        "not testable."))
    return blocks


def importance(st: StudyTable) -> pd.DataFrame:
    """The report's fANOVA table of ``st`` (:func:`~lstm_lab.analysis.stats.fanova_importance` on its complete
    trials, the variants in the study's order)."""
    return stats.fanova_importance(st.done, st.params, direction=st.direction, variants=st.variants,
                                   metric=st.metric)


def _importance_section(st: StudyTable, out: pathlib.Path, numbers: dict, tables: dict) -> list[Block]:
    blocks: list[Block] = [Heading("Hyperparameter importance (fANOVA)")]
    try:
        imp = importance(st)
    except Exception as e:  # noqa: BLE001 - e.g. optuna missing: the report goes on
        return blocks + [Paragraph(f"Skipped: {type(e).__name__}: {e}")]
    tables["importance"] = imp
    blocks.append(Paragraph(
        "Share of the variance of the metric explained by each hyperparameter alone (fANOVA main effects, "
        "optuna's FanovaImportanceEvaluator(seed=0), normalised to sum to 1 per column), over all complete "
        "trials (with the variant as one more factor) and per variant (numeric hyperparameters only). "
        "const.: the hyperparameter did not vary in those trials."))
    notes, constant = imp.attrs["notes"], imp.attrs["constant"]
    if "all" in imp.columns:
        numbers["importance"] = {st.search_label(n): float(v) for n, v in imp["all"].items() if np.isfinite(v)}
    if len(imp.columns):
        rows = [[st.search_label(n)] + [fmt(imp.loc[n, c]) if np.isfinite(imp.loc[n, c])
                                        else "const." if n in constant.get(c, ()) else DASH for c in imp.columns]
                for n in imp.index]
        blocks.append(Table(["hyperparameter"] + list(imp.columns), rows))
        plots.save(plots.importance(imp, labels=st.search_label, baseline=st.baseline), out / "importance.png")
        blocks.append(Image("importance.png", "fANOVA hyperparameter importance"))
    else:
        blocks.append(Paragraph("No importance could be computed:" if notes else "No importance computed."))
    if notes:
        blocks.append(BulletList(notes))
    return blocks


def _odyssey_section(st: StudyTable, tables: dict) -> list[Block]:
    return [Heading("Beside the Odyssey's findings")] + odyssey_comparison(st, tables.get("welch"),
                                                                            tables.get("importance"))


def _hyperparams(st: StudyTable, out: pathlib.Path) -> list[Block]:
    blocks: list[Block] = [Heading("Metric against each hyperparameter")]
    fig = plots.hyperparams(st)
    if fig is None:
        return blocks + [Paragraph("Skipped: the trials table has no hyperparameter column.")]
    plots.save(fig, out / "hyperparams.png")
    blocks += [
        Paragraph(f"{st.metric} of every complete trial against each hyperparameter, coloured by variant, with a "
                  "Gaussian-kernel weighted mean per variant (bandwidth by Scott's rule on the plotted "
                  "scale: log for log-uniform hyperparameters; the baseline's trend dashed). Categorical "
                  "hyperparameters show the mean per category as a bar."),
        Image("hyperparams.png", "metric against each hyperparameter"),
    ]
    notes = []
    for col in st.params:
        if col in st.done.columns and st.kind(col) != "choice":
            xs = st.search_values(col)
            off = int((np.isfinite(xs) & ~(xs > 0)).sum()) if space.is_log(st.kind(col)) else 0
            if off:
                notes.append(f"{st.label(col)}: {off} value(s) outside the log axis left out.")
    missing = [c for c in st.params if c not in st.done.columns]
    if missing:
        notes.append(f"No column in the trials table for: {', '.join(missing)}.")
    if notes:
        blocks.append(BulletList(notes))
    return blocks


def _curves(st: StudyTable, out: pathlib.Path) -> list[Block]:
    import pandas as pd

    blocks: list[Block] = [Heading("Learning curves")]
    curves = st.curves
    need = {"number", "step", "split", "loss"}
    if curves is None or len(curves) == 0 or not need <= set(curves.columns) or "number" not in st.done:
        return blocks + [Paragraph("No learning curves were recorded for this study.")]
    best = {v: int(st.best(v)["number"]) for v in st.present}
    cv = curves[curves["number"].isin(list(best.values()))].copy()
    cv["loss"] = pd.to_numeric(cv["loss"], errors="coerce")
    cv = cv[np.isfinite(cv["loss"].to_numpy(dtype=float))]
    plotted = {v: n for v, n in best.items() if (cv["number"] == n).any()}
    without = [v for v in st.present if v not in plotted]
    if not plotted:
        return blocks + [Paragraph("No learning curves were recorded for the best trials of the variants.")]
    plots.save(plots.curves(st, plotted, cv), out / "curves.png")
    blocks += [Paragraph("Validation loss (solid) and training loss (dashed, lighter) against the training step "
                         "for the best trial of each variant."),
               Image("curves.png", "learning curves of the best trial per variant")]
    if without:
        blocks.append(Paragraph(f"No curves recorded for the best trial of: {', '.join(without)}."))
    return blocks


def _write_numbers(st: StudyTable, numbers: dict, path: pathlib.Path) -> None:
    """``report.json``: the report's numbers for scripts (``scripts/readme_results.py``): per variant the
    complete count, best, mean and Welch's test against the baseline (all trials); fANOVA importance over all
    trials (the variant included). The same values the tables show, computed once."""
    welch = numbers.get("welch", {})
    per_variant = int(st.trials.groupby("variant").size().max()) if len(st.trials) else 0
    variants = {}
    for v in st.variants:
        vals = st.values[v]
        w = welch.get(v, {})
        variants[v] = {"complete": int(len(vals)),
                       "best": float((vals[np.argmin(st.sign * vals)]) if len(vals) else math.nan),
                       "mean": float(vals.mean()) if len(vals) else None,
                       "p_value": w.get("p_value"), "result": w.get("result")}
    data = {"name": st.name, "metric": st.metric, "direction": st.direction, "baseline": st.baseline,
            "trials": int(len(st.trials)), "per_variant": per_variant, "variants": variants,
            "importance": numbers.get("importance", {})}
    path.write_text(json.dumps(data, indent=2, default=lambda o: None) + "\n", encoding="utf-8")
