"""A study beside the findings of Greff et al. (2017), "LSTM: A Search Space Odyssey": :func:`odyssey_comparison`,
the report's section "Beside the Odyssey's findings" and notebook 03's last cell (one function, so the two say
the same).

The paper ran 9 variants x 200 random-search trials on each of TIMIT, IAM Online and JSB Chorales and found: no
variant significantly better than the vanilla LSTM; NFG and NOAF significantly worse on every dataset; CIFG and
NP not significantly worse; in fANOVA the learning rate by far the most important hyperparameter, then the
hidden size. Each finding is set beside this study's own numbers with a verdict (agrees / differs / not
testable here); nothing is fitted toward the paper's answer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from lstm_lab.analysis import stats
from lstm_lab.analysis.render import DASH, Block, BulletList, Paragraph, Table, fmt, fmt_p

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pandas as pd

    from lstm_lab.analysis.data import StudyTable

__all__ = ["odyssey_comparison", "PAPER_VARIANTS", "PAPER_TRIALS_PER_VARIANT", "PAPER_PANELS"]

#: The paper's grid: 9 variants (vanilla and 8 single changes) x 200 random-search trials on each dataset.
PAPER_VARIANTS = 9
PAPER_TRIALS_PER_VARIANT = 200
PAPER_DATASETS = ("TIMIT", "IAM Online", "JSB Chorales")
#: The paper's Fig. 3 panels this module compares with: the range of the best 10% of the trials of each variant,
#: READ OFF THE FIGURE (the paper prints no table of them), hence approximate; the task whose study it applies to.
PAPER_PANELS = {
    "jsb": {"name": "JSB Chorales", "task": "music", "top10": (8.4, 8.8), "unit": "nats per step"},
}

AGREES, DIFFERS, UNTESTABLE = "**agrees**", "**differs**", "not testable here"


def odyssey_comparison(st: StudyTable, welch: pd.DataFrame | None, importance: pd.DataFrame | None, *,
                       dataset: str | None = "auto") -> list[Block]:
    """The paper's findings beside this study's numbers: a paragraph, one bullet per finding (what the paper
    says, what this study shows, **agrees** / **differs** / not testable here), and for a study on one of the
    paper's datasets a table of the best 10% of each variant beside the paper's Fig. 3 panel.

    Args:
        st: the study.
        welch: :func:`~lstm_lab.analysis.stats.welch_vs_baseline` of all complete trials (``st.values``)
            against ``st.baseline``; None when there is none (no baseline).
        importance: :func:`~lstm_lab.analysis.stats.fanova_importance` of ``st.done`` (the report's
            :func:`~lstm_lab.analysis.report.importance`); None when it did not run.
        dataset: a key of :data:`PAPER_PANELS` (``"jsb"``); ``"auto"``: JSB Chorales for a study of the
            ``music`` task (the Odyssey's music dataset, experiments/odyssey_jsb.py's), none otherwise;
            None: no panel.

    Render with :func:`~lstm_lab.analysis.render.to_markdown` (notebook 03) or as a report section.
    """
    if dataset == "auto":
        dataset = next((k for k, p in PAPER_PANELS.items() if p["task"] == st.task), None)
    if dataset is not None and dataset not in PAPER_PANELS:
        raise ValueError(f"dataset must be 'auto', None or one of {sorted(PAPER_PANELS)}, not {dataset!r}")
    panel = PAPER_PANELS.get(dataset) if dataset else None
    base = st.baseline or DASH
    per_dataset = PAPER_VARIANTS * PAPER_TRIALS_PER_VARIANT
    intro = (f"The paper: {PAPER_VARIANTS} variants x {PAPER_TRIALS_PER_VARIANT} random-search trials on each of "
             f"{', '.join(PAPER_DATASETS[:-1])} and {PAPER_DATASETS[-1]} ({per_dataset:,} per dataset). "
             f"This study: {st.name}, {len(st.done)} complete trials over {len(st.present)} variants"
             + (f" on {st.task}" if st.task else "") + f" ({st.metric}, {st.direction}). "
             "Each finding: what the paper says, what this study shows, and whether the two agree. "
             f"Significance here: Welch's t-test of all complete trials against the baseline {base}, "
             f"p < {stats.ALPHA}" + ("" if (st.baseline or "").lower() == "vanilla"
                                     else " (the paper's baseline is the vanilla LSTM)") + ".")
    items = [_none_better(st, welch)]
    items += [_variant(st, welch, v, worse=True) for v in ("nfg", "noaf")]
    items += [_variant(st, welch, v, worse=False) for v in ("cifg", "np")]
    items += _ranks(st, importance)
    table: list[Block] = []
    if panel is not None:
        item, table = _panel(st, panel)
        items.append(item)
    items += [_size(st), _cost(st)]
    return [Paragraph(intro), BulletList(items)] + table


# --------------------------------------------------------------------------------------------
# The findings, one bullet each
# --------------------------------------------------------------------------------------------
def _lookup(welch: pd.DataFrame | None, name: str):
    """The Welch row of variant ``name`` (any case): (the study's name, the row), or None."""
    if welch is None:
        return None
    for v in welch.index:
        if str(v).lower() == name:
            return str(v), welch.loc[v]
    return None


def _no_welch(st: StudyTable) -> str:
    if st.baseline is None:
        return "no baseline is set"
    if st.baseline not in st.present:
        return f"the baseline {st.baseline} has no complete trials"
    return "the study has no variant besides the baseline"


def _testable(r) -> bool:
    return not str(r["result"]).startswith("n/a")


def _none_better(st: StudyTable, welch: pd.DataFrame | None) -> str:
    head = "*No variant significantly better than vanilla* — paper: none on any dataset; here "
    if welch is None or not len(welch):
        return head + f"{_no_welch(st)}: {UNTESTABLE}."
    tested = [v for v in welch.index if _testable(welch.loc[v])]
    better = [v for v in tested if str(welch.loc[v, "result"]).startswith("better")]
    if not tested:
        return head + f"no variant has two complete trials with some spread: {UNTESTABLE}."
    if better:
        return head + ", ".join(f"{v} (difference {fmt(welch.loc[v, 'difference'])}, p = "
                                f"{fmt_p(welch.loc[v, 'p_value'])})" for v in better) \
            + f" significantly better than {st.baseline}: {DIFFERS}."
    return head + f"none of the {len(tested)} tested variants is significantly better than {st.baseline}: {AGREES}."


def _variant(st: StudyTable, welch: pd.DataFrame | None, name: str, *, worse: bool) -> str:
    paper = "significantly worse on every dataset" if worse else "not significantly worse"
    head = f"*{name.upper()} {'significantly worse' if worse else 'not significantly worse'}* — paper: {paper}; "
    found = _lookup(welch, name)
    if found is None:
        return head + (f"here {_no_welch(st)}: {UNTESTABLE}." if welch is None else "not in this study.")
    v, r = found
    if not _testable(r):
        return head + f"here {v}: {r['result']}: {UNTESTABLE}."
    is_worse = str(r["result"]).startswith("worse")
    verdict = AGREES if is_worse == worse else DIFFERS
    return head + (f"here {v} mean {fmt(r['mean'])} vs {fmt(r['baseline_mean'])} ({st.baseline}), difference "
                   f"{fmt(r['difference'])}, p = {fmt_p(r['p_value'])} ({r['result']}): {verdict}.")


def _find_param(st: StudyTable, short: str) -> str | None:
    return next((c for c in st.params if c.rsplit(".", 1)[-1] == short), None)


def _ranks(st: StudyTable, importance: pd.DataFrame | None) -> list[str]:
    heads = {"learning_rate": ("*The learning rate is the most important hyperparameter*",
                               "by far, on every dataset (fANOVA)", 1),
             "hidden_size": ("*The hidden size comes second*", "the second most important", 2)}
    ok = importance is not None and "all" in importance.columns
    ranked = importance["all"][[n for n in importance.index if n in st.params]].dropna() if ok else None
    if ranked is not None and len(ranked):
        ranked = ranked.sort_values(ascending=False, kind="stable")
    out = []
    for short, (head, paper, want) in heads.items():
        text = f"{head} — paper: {paper}; here "
        col = _find_param(st, short)
        if ranked is None or not len(ranked):
            notes = "; ".join(importance.attrs.get("notes", [])) if importance is not None else ""
            out.append(text + "fANOVA did not run" + (f" ({notes})" if notes else "") + f": {UNTESTABLE}.")
        elif col is None:
            out.append(text + f"the {short.replace('_', ' ')} was not searched: {UNTESTABLE}.")
        elif col not in ranked.index:
            out.append(text + f"the {short.replace('_', ' ')} did not vary in the analysed trials: {UNTESTABLE}.")
        else:
            rank = list(ranked.index).index(col) + 1
            first = ranked.index[0]
            lead = "" if rank == 1 else f"; {st.search_label(first)} first with {ranked.iloc[0]:.0%}"
            out.append(text + f"{st.search_label(col)} explains {ranked[col]:.0%} of the variance and ranks {rank} of "
                       f"{len(ranked)} hyperparameters{lead}" + (_variant_share(importance) if want == 1 else "")
                       + f": {AGREES if rank == want else DIFFERS}.")
    return out


def _variant_share(importance: pd.DataFrame) -> str:
    if "variant" in importance.index and np.isfinite(importance.loc["variant", "all"]):
        return f" (the variant itself: {importance.loc['variant', 'all']:.0%})"
    return ""


def _panel(st: StudyTable, panel: dict) -> tuple[str, list[Block]]:
    """The paper's Fig. 3 panel (best 10% of each variant) beside this study's: a bullet and a table."""
    lo, hi = panel["top10"]
    paper = f"{lo:g}–{hi:g}"
    head = (f"*{panel['name']}: the best 10% of each variant at about {paper} {panel['unit']}* — paper: Fig. 3, "
            f"read off the figure (approximate); here ({st.metric}) ")
    rows, off = [], []
    for v in st.present:
        top = stats.top_fraction(st.values[v], st.direction)
        mean = float(top.mean())
        side = "below" if mean < lo else "above" if mean > hi else ""
        if side:
            off.append(f"{v} {fmt(mean)} ({side})")
        rows.append([v, str(len(st.values[v])), str(len(top)), f"{fmt(float(top.min()))}–{fmt(float(top.max()))}",
                     fmt(mean), paper, f"differs ({side})" if side else "agrees"])
    if not rows:
        return head + f"no variant has complete trials: {UNTESTABLE}.", []
    inside = len(rows) - len(off)
    item = head + (f"the best-10% mean of {inside} of {len(rows)} variants falls in that range"
                   + (f"; outside: {', '.join(off)}" if off else "") + f": {DIFFERS if off else AGREES}.")
    table = Table(["variant", "complete", "best 10% (n)", "best 10%: range", "best 10%: mean",
                   "paper (Fig. 3, read off)", "verdict"], rows,
                  ["left", "right", "right", "right", "right", "right", "left"])
    caption = Paragraph(f"{panel['name']}, best 10% of each variant (the best ceil(n/10) complete trials), beside "
                        f"the paper's Fig. 3 as read off the figure; agrees: the mean falls in {paper}. (For a study "
                        f"of the {panel['task']} task the data is taken to be {panel['name']}, as in "
                        "experiments/odyssey_jsb.py.)")
    return item, [caption, table]


def _size(st: StudyTable) -> str:
    counts = [len(st.values[v]) for v in st.present]
    lo, hi = min(counts), max(counts)
    per = f"{lo}" if lo == hi else f"{lo}–{hi}"
    text = (f"*Size* — paper: {PAPER_TRIALS_PER_VARIANT} trials per variant on each dataset; here {per} complete "
            f"trials per variant ({sum(counts)} over {len(counts)} variants). The fewer the trials, the larger an "
            "effect must be to reach significance")
    b = st.values.get(st.baseline) if st.baseline else None
    if b is not None and len(b) >= 2 and np.ptp(b) > 0:
        from scipy import stats as sps

        n, sd = len(b), float(np.std(b, ddof=1))
        mdd = float(sps.t.ppf(1 - stats.ALPHA / 2, 2 * n - 2)) * sd * math.sqrt(2 / n)
        text += (f": with the baseline's spread (sd {fmt(sd)}) and {n} trials a side, a difference of the means "
                 f"below about {fmt(mdd)} cannot reach p < {stats.ALPHA}")
    return text + "; a difference the paper found can go undetected here."


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.3g} min"
    if seconds < 172800:
        return f"{seconds / 3600:.3g} h"
    return f"{seconds / 86400:.3g} days"


def _trial_seconds(st: StudyTable) -> tuple[np.ndarray, bool]:
    """The wall time of each complete trial: its run's ``wall_seconds`` (else ``finished - started``) divided by
    its population size (a population of K trials trains as one: each counts 1/K, as ``lstm-lab status``'s ETA
    does); whether any trial ran in a population."""
    import pandas as pd

    d = st.done
    pop = (pd.to_numeric(d["population"], errors="coerce").fillna(1).clip(lower=1).to_numpy(dtype=float)
           if "population" in d else np.ones(len(d)))
    secs = np.full(len(d), np.nan)
    if "wall_seconds" in d:
        secs = pd.to_numeric(d["wall_seconds"], errors="coerce").to_numpy(dtype=float)
    if "started" in d and "finished" in d:
        span = (pd.to_datetime(d["finished"], errors="coerce")
                - pd.to_datetime(d["started"], errors="coerce")).dt.total_seconds().to_numpy(dtype=float)
        secs = np.where(np.isfinite(secs), secs, span)
    secs = secs / pop
    ok = np.isfinite(secs) & (secs > 0)
    return secs[ok], bool((pop[ok] > 1).any())


def _cost(st: StudyTable) -> str:
    total = PAPER_VARIANTS * PAPER_TRIALS_PER_VARIANT
    head = (f"*Cost* — the paper's {total:,} trials of one dataset ({PAPER_VARIANTS} variants x "
            f"{PAPER_TRIALS_PER_VARIANT}); here ")
    secs, pooled = _trial_seconds(st)
    if not len(secs):
        return head + "no wall time was recorded for the complete trials."
    mean = float(secs.mean())
    whole = _duration(total * mean)
    return head + (f"the mean wall time per complete trial is {_duration(mean)} ({len(secs)} trials"
                   + ("; a population of K trials counts 1/K of its wall time to each" if pooled else "")
                   + f"), so {total:,} trials would take {total:,} x {_duration(mean)} = {whole} "
                   f"on one worker at this rate; with `--workers N` on one machine {whole} / N at best "
                   "(if each of the N processes kept this rate; they share the machine's cores, so the time per "
                   "trial grows once the cores are busy).")
