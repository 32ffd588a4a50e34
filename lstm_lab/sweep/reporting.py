"""Odyssey-style report of a hyperparameter study over LSTM variants.

Greff et al. (2017), "LSTM: A Search Space Odyssey", compared the vanilla LSTM
with eight single-change variants (no input gate, no forget gate, coupled
input/forget gate, no peepholes, ...) by running an independent random search
over the same hyperparameters (learning rate, hidden size, momentum, input noise)
for every variant and task, then asking three questions of the results:

1. **Does a variant do better or worse than the vanilla LSTM?**  Box plots of the
   test metric over all trials and over the best 10% of each variant (their
   Fig. 3), with Welch's t-test of every variant against the baseline
   (unequal variances; significance at p < 0.05).  The top-10% view asks how a
   variant does when well tuned, the all-trials view how forgiving it is.
2. **Which hyperparameters matter?**  fANOVA (Hutter et al., 2014) fits a random
   forest to (hyperparameters -> metric) and splits the metric's variance into the
   share explained by each hyperparameter; computed over all trials
   (with the variant as one more factor) and per variant.
3. **How does the metric depend on each hyperparameter?**  The metric against
   each hyperparameter, per variant, with a smoothed trend (the empirical
   counterpart of their fANOVA marginal plots).

``build_report`` reproduces that analysis for one study, plus learning curves of
each variant's best trial.  It is pure: it takes the study's data, writes
``report.md`` and ``report.html`` (the same blocks rendered twice), the figures
(PNG files, referenced by relative paths from ``report.md``; embedded in
``report.html`` as data URIs, so the HTML page is one file to share) and
``trials.csv`` (linked from both) into ``out_dir``, and returns the path of
``report.md``.  Nothing here runs or changes a study.

Figures are drawn on :class:`matplotlib.figure.Figure` objects directly (never
``pyplot``), so no GUI backend is touched, no global figure registry fills up,
and reports can be built from several threads.  matplotlib, scipy, optuna and
pandas are imported inside the functions that need them: importing
``lstm_lab.sweep`` does not require them.

Statistics use the trials whose status is ``"complete"`` and whose metric is
finite; the others are only counted.  "Top 10%" of a variant is its best
``ceil(n / 10)`` trials (at least one) in the study's direction.

fANOVA cost grows faster than linearly with the number of trials (optuna's
implementation walks every tree in Python), so each analysis uses at most
:data:`FANOVA_MAX_TRIALS` trials (a seeded random subsample, stated in the
report), and the per-variant analyses share :data:`FANOVA_PER_VARIANT_BUDGET`
trials.  Categorical factors (the variant, ``choice`` hyperparameters) enter the
forest as an integer index rather than optuna's one-hot encoding, whose
marginalisation is exponential in the number of categories (20 variants x 200
trials did not finish in minutes; as an index it takes about two seconds).  The
forest splits an index between neighbouring codes, i.e. between categories, and
fANOVA's uniform measure over the index weighs every category the same, so the
variance split is still that of the categories.
"""

from __future__ import annotations

import dataclasses
import html
import math
import pathlib
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pandas as pd

__all__ = ["FANOVA_MAX_TRIALS", "FANOVA_MIN_TRIALS", "FANOVA_PER_VARIANT_BUDGET", "build_report"]

#: Statuses in the order the summary lists them (others follow alphabetically).
STATUS_ORDER = ("complete", "failed", "diverged", "interrupted", "running", "waiting")
#: Fewest complete trials an fANOVA analysis runs on.
FANOVA_MIN_TRIALS = 4
#: Most trials one fANOVA analysis uses (a seeded random subsample beyond that).
FANOVA_MAX_TRIALS = 300
#: Trials shared by all per-variant fANOVA analyses (each gets at least FANOVA_PER_VARIANT_MIN).
FANOVA_PER_VARIANT_BUDGET = 600
FANOVA_PER_VARIANT_MIN = 40
#: Significance level of the Welch tests.
ALPHA = 0.05

_LOG_KINDS = frozenset({"log_uniform", "int_log_uniform", "one_minus_log_uniform"})
_INT_KINDS = frozenset({"int_log_uniform", "int_uniform"})
_DASH = "–"
_DPI = 110


# --------------------------------------------------------------------------------------------
# Report blocks, rendered once to Markdown and once to HTML.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Heading:
    text: str
    level: int = 2


@dataclasses.dataclass
class Paragraph:
    text: str


@dataclasses.dataclass
class Link:
    """A link to a file next to the report (a bullet list item)."""
    href: str
    text: str = ""


@dataclasses.dataclass
class BulletList:
    items: list  # str or Link + description: (Link, str)


@dataclasses.dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    #: Per column: "left" or "right" (numbers).  Defaults to the first column left, the rest right.
    align: list[str] | None = None

    def alignment(self) -> list[str]:
        return self.align or ["left"] + ["right"] * (len(self.columns) - 1)


@dataclasses.dataclass
class Image:
    path: str  # relative to the report
    alt: str
    caption: str = ""


Block = Heading | Paragraph | BulletList | Table | Image


def _md_cell(text: str) -> str:
    return str(text).replace("\n", " ").replace("|", "\\|")


def _md_item(item) -> str:
    if isinstance(item, tuple):
        return "".join(_md_item(x) for x in item)
    if isinstance(item, Link):
        return f"[{item.text or item.href}]({item.href})"
    return str(item)


def _html_item(item) -> str:
    if isinstance(item, tuple):
        return "".join(_html_item(x) for x in item)
    if isinstance(item, Link):
        return f'<a href="{html.escape(item.href)}">{html.escape(item.text or item.href)}</a>'
    return html.escape(str(item))


def _data_uri(path: pathlib.Path) -> str | None:
    import base64

    try:
        data = path.read_bytes()
    except OSError:
        return None
    kind = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg"}.get(path.suffix.lower(),
                                                                                   "application/octet-stream")
    return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"


def to_markdown(blocks: Sequence[Block]) -> str:
    """Render blocks as GitHub-flavoured Markdown."""
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Paragraph):
            out.append(b.text)
        elif isinstance(b, BulletList):
            out.append("\n".join(f"- {_md_item(item)}" for item in b.items))
        elif isinstance(b, Table):
            rule = ["---:" if a == "right" else ":---" for a in b.alignment()]
            lines = ["| " + " | ".join(_md_cell(c) for c in b.columns) + " |", "| " + " | ".join(rule) + " |"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
        elif isinstance(b, Image):
            out.append(f"![{b.alt}]({b.path})" + (f"\n\n{b.caption}" if b.caption else ""))
        else:  # pragma: no cover - programming error
            raise TypeError(f"unknown block {b!r}")
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; max-width: 1150px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #eee; padding-bottom: .15em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; }
th { background: #f2f2f2; }
td.right, th.right { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .92em; }
"""


def to_html(blocks: Sequence[Block], title: str, base_dir: str | pathlib.Path | None = None) -> str:
    """Render blocks as one self-contained HTML page: inline CSS, and each image embedded as a base64 data URI
    (read from ``base_dir``; an image not found there stays a relative link)."""
    esc = html.escape
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{esc(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            body.append(f"<p>{esc(b.text)}</p>")
        elif isinstance(b, BulletList):
            body.append("<ul>\n" + "\n".join(f"<li>{_html_item(i)}</li>" for i in b.items) + "\n</ul>")
        elif isinstance(b, Table):
            al = b.alignment()
            head = "".join(f'<th class="{a}">{esc(str(c))}</th>' for c, a in zip(b.columns, al))
            rows = "\n".join("<tr>" + "".join(f'<td class="{a}">{esc(str(c))}</td>' for c, a in zip(row, al))
                             + "</tr>" for row in b.rows)
            body.append(f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>")
        elif isinstance(b, Image):
            cap = f"\n<figcaption>{esc(b.caption)}</figcaption>" if b.caption else ""
            src = _data_uri(pathlib.Path(base_dir) / b.path) if base_dir is not None else None
            body.append(f'<figure><img src="{esc(src or b.path)}" alt="{esc(b.alt)}">{cap}</figure>')
        else:  # pragma: no cover - programming error
            raise TypeError(f"unknown block {b!r}")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{esc(title)}</title>\n'
            f"<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def fmt(x: Any) -> str:
    """A number with 4 significant digits; integers as integers; missing as a dash."""
    if x is None:
        return _DASH
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        if not math.isfinite(x):
            return _DASH if math.isnan(x) else str(float(x))
        return f"{float(x):.4g}"
    return str(x)


def fmt_p(p: float) -> str:
    """A p-value: ``0.0123`` down to 1e-3, then ``3.2e-05``."""
    if p is None or not math.isfinite(p):
        return _DASH
    if p == 0.0:
        return "<1e-300"
    return f"{p:.3g}" if p >= 1e-3 else f"{p:.1e}"


def _fmt_param(value: Any, kind: str) -> str:
    if kind in _INT_KINDS and _finite(value):
        return str(round(float(value)))
    return fmt(value) if isinstance(value, (float, np.floating, int, np.integer)) or value is None else str(value)


def _strip_section(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def display_name(name: str) -> str:
    """``"optim.learning_rate"`` -> ``"learning_rate"``; ``"1-optim.momentum"`` -> ``"1 - momentum"``."""
    if name.startswith("1-"):
        return "1 - " + _strip_section(name[2:])
    return _strip_section(name)


# --------------------------------------------------------------------------------------------
# The study's data, cleaned once
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Study:
    name: str
    task: str
    metric: str
    direction: str
    sign: float  # +1: smaller is better; -1: larger is better
    baseline: str | None
    params: dict[str, dict[str, Any]]
    display: dict[str, str]  # column -> short name
    trials: pd.DataFrame  # all rows, normalised status/variant/value
    done: pd.DataFrame  # complete with a finite value
    variants: list[str]  # display order: info's list, then any others seen
    present: list[str]  # variants with >= 1 complete trial, same order
    values: dict[str, np.ndarray]
    top: dict[str, np.ndarray]
    colors: dict[str, Any]
    log_y: bool

    def better(self, diff: float) -> bool:
        return self.sign * diff < 0


def _top_fraction(values: np.ndarray, sign: float) -> np.ndarray:
    """The best ceil(n / 10) values (at least one) in the study's direction."""
    k = max(1, -(-len(values) // 10))
    return values[np.argsort(sign * values, kind="stable")[:k]]


def _palette(variants: Sequence[str], baseline: str | None) -> dict[str, Any]:
    from matplotlib import colormaps

    others = [v for v in variants if v != baseline]
    cmap = colormaps["tab10" if len(others) <= 10 else "tab20"]
    colors = {v: cmap(i % cmap.N) for i, v in enumerate(others)}
    if baseline is not None:
        colors[baseline] = (0.1, 0.1, 0.1, 1.0)
    return colors


def _load(info: dict[str, Any], trials: pd.DataFrame) -> _Study:
    import pandas as pd

    metric = str(info.get("metric", "value"))
    direction = str(info.get("direction", "minimize")).lower()
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"info['direction'] must be 'minimize' or 'maximize', not {direction!r}")
    df = trials.reset_index(drop=True)  # a copy, with unique labels for idxmin/loc
    df["status"] = df["status"].astype(str).str.lower() if "status" in df else "complete"
    df["variant"] = df["variant"].fillna("?").astype(str) if "variant" in df else "?"
    df["value"] = pd.to_numeric(df["value"], errors="coerce") if "value" in df else np.nan
    done = df[(df["status"] == "complete") & np.isfinite(df["value"].to_numpy(dtype=float))]
    if done.empty:
        raise ValueError(f"build_report: no completed trials with a finite {metric} "
                         f"(status == 'complete') among {len(df)} trials")
    baseline = info.get("baseline")
    variants = [str(v) for v in info.get("variants") or []]
    variants += [v for v in dict.fromkeys(df["variant"]) if v not in variants]
    sign = 1.0 if direction == "minimize" else -1.0
    values = {v: done.loc[done["variant"] == v, "value"].to_numpy(dtype=float) for v in variants}
    present = [v for v in variants if len(values[v])]
    params = {str(k): dict(v) for k, v in (info.get("params") or {}).items()}
    short = {col: _strip_section(col) for col in params}
    clash = {s for s in short.values() if list(short.values()).count(s) > 1}
    display = {col: (col if s in clash else s) for col, s in short.items()}
    all_values = done["value"].to_numpy(dtype=float)
    lossy = any(w in metric.lower() for w in ("loss", "perplexity", "bpc", "error"))
    return _Study(
        name=str(info.get("name", "study")), task=str(info.get("task", "")), metric=metric,
        direction=direction, sign=sign, baseline=None if baseline is None else str(baseline),
        params=params, display=display, trials=df, done=done, variants=variants, present=present,
        values=values, top={v: _top_fraction(values[v], sign) for v in present},
        colors=_palette(variants, None if baseline is None else str(baseline)),
        log_y=bool(lossy and np.all(all_values > 0)))


# --------------------------------------------------------------------------------------------
# Plot helpers
# --------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: pathlib.Path) -> None:
    fig.savefig(path, dpi=_DPI)
    fig.clear()  # Figure objects are not registered anywhere: clearing frees the artists now


def _log_axis(axis, lo: float, hi: float) -> None:
    """Readable ticks on a log axis whatever its span: decades, 1-2-5, or plain linear ticks."""
    from matplotlib import ticker

    if lo > 0 and not hi > lo * 1.01:  # (nearly) one value: give the axis some room around it
        lo, hi = lo / 1.25, hi * 1.25
        (axis.axes.set_xlim if axis.axis_name == "x" else axis.axes.set_ylim)(lo, hi)
    decades = math.log10(hi / lo) if lo > 0 and hi > lo else 0.0
    if decades > 2.5:
        axis.set_major_locator(ticker.LogLocator(base=10))
    elif decades > 0.8:
        axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    else:  # less than a decade: plain evenly spaced values read best
        axis.set_major_locator(ticker.MaxNLocator(nbins=8, steps=[1, 2, 2.5, 5, 10]))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.4g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _set_log_y(ax, values: np.ndarray) -> None:
    ax.set_yscale("log")
    v = values[np.isfinite(values) & (values > 0)]
    if len(v):
        _log_axis(ax.yaxis, float(v.min()), float(v.max()))


def _jitter(n: int, width: float, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(-width, width, n) if n > 1 else np.zeros(n)


def _point_size(n: int) -> float:
    return 18.0 if n < 100 else 9.0 if n < 500 else 4.0


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def _status_counts(statuses: pd.Series) -> dict[str, int]:
    counts = statuses.value_counts()
    order = [s for s in STATUS_ORDER if s in counts] + sorted(s for s in counts.index if s not in STATUS_ORDER)
    return {s: int(counts[s]) for s in order}


def _summary(st: _Study) -> list[Block]:
    counts = _status_counts(st.trials["status"])
    n_bad = int((st.trials["status"] == "complete").sum()) - len(st.done)
    best_row = st.done.loc[(st.sign * st.done["value"]).idxmin()]
    hps = ", ".join(f"{st.display[c]} = {_fmt_param(best_row[c], spec.get('kind', ''))}"
                    for c, spec in st.params.items() if c in best_row.index)
    extra = [c for c in st.trials.columns if c.startswith(("valid.", "test.")) and c != st.metric
             and c in best_row.index and isinstance(best_row[c], (float, int, np.number))]
    others = ", ".join(f"{c} = {fmt(best_row[c])}" for c in extra)
    seed = f", seed {int(best_row['seed'])}" if "seed" in best_row.index and _finite(best_row["seed"]) else ""
    lines = [
        f"Study {st.name}" + (f" on task {st.task}" if st.task else "")
        + f": {len(st.trials)} trials ({', '.join(f'{n} {s}' for s, n in counts.items())}). "
        f"Metric: {st.metric} ({st.direction}); baseline variant: {st.baseline or _DASH}; "
        f"{len(st.present)} of {len(st.variants)} variants have complete trials.",
        f"Best trial overall: #{int(best_row['number']) if 'number' in best_row.index else '?'} "
        f"({best_row['variant']}{seed}) with {st.metric} = {fmt(best_row['value'])}"
        + (f" ({others})" if others else "") + (f"; hyperparameters: {hps}." if hps else "."),
    ]
    if n_bad:
        lines.append(f"{n_bad} trial(s) marked complete have no finite {st.metric} and are left out of "
                     "the statistics.")
    return [Heading(f"{st.name}: LSTM variant study", 1), Paragraph(" ".join(lines))]


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _variants_section(st: _Study) -> list[Block]:
    rows = []
    for v in st.variants:
        sub = st.trials[st.trials["variant"] == v]
        vals = st.values[v]
        failed = int((sub["status"] == "failed").sum())
        diverged = int((sub["status"] == "diverged").sum())
        label = f"{v} (baseline)" if v == st.baseline else v
        if len(vals):
            done = st.done[st.done["variant"] == v]
            best = done.loc[(st.sign * done["value"]).idxmin()]
            best_no = f"#{int(best['number'])}" if "number" in best.index else _DASH
            top = st.top[v]
            rows.append([label, str(len(vals)), str(failed), str(diverged), fmt(best["value"]), best_no,
                         fmt(float(np.median(vals))), f"{fmt(float(top.mean()))} (n={len(top)})",
                         fmt(float(vals.mean()))])
        else:
            rows.append([label, "0", str(failed), str(diverged)] + [_DASH] * 5)
    return [
        Heading("Variants"),
        Paragraph(f"{st.metric} per variant over its complete trials ({st.direction}). "
                  "Top 10% is the mean of the best ceil(n/10) trials of the variant."),
        Table(["variant", "complete", "failed", "diverged", "best", "best trial", "median", "top 10% mean",
               "mean"], rows),
    ]


def _distributions(st: _Study, out: pathlib.Path) -> list[Block]:
    present = st.present
    nv = len(present)
    stacked = nv > 6
    width = max(6.0, 0.55 * nv + 2.0) if stacked else max(9.0, 1.1 * nv * 2 + 2.0)
    fig = _figure(width, 8.0 if stacked else 4.6)
    axes = fig.subplots(2, 1, sharex=True) if stacked else fig.subplots(1, 2)  # own y scale: top 10% is narrow
    rng = np.random.default_rng(0)
    for ax, (title, data) in zip(axes, [("All complete trials", st.values), ("Top 10% of each variant", st.top)]):
        series = [data[v] for v in present]
        pos = np.arange(nv)
        boxes = ax.boxplot(series, positions=pos, widths=0.6, whis=(0, 100), patch_artist=True, showmeans=True,
                           medianprops={"color": "black", "linewidth": 1.6},
                           meanprops={"marker": "D", "markerfacecolor": "tab:red", "markeredgecolor": "white",
                                      "markersize": 6, "zorder": 5})
        for v, patch in zip(present, boxes["boxes"]):
            base = v == st.baseline
            patch.set_facecolor((0.85, 0.85, 0.85, 1.0) if base else (1, 1, 1, 0))
            patch.set_edgecolor("black" if base else "0.35")
            patch.set_linewidth(2.0 if base else 1.0)
        for i, v in enumerate(present):
            y = data[v]
            ax.scatter(i + _jitter(len(y), 0.18, rng), y, s=_point_size(len(y)), color=st.colors[v],
                       alpha=0.65, edgecolors="none", zorder=3)
        if st.baseline in present:
            ax.axhline(float(np.median(data[st.baseline])), color="black", linestyle=":", linewidth=1.0,
                       zorder=1, label=f"{st.baseline} median")
            ax.legend(loc="best", fontsize=8, frameon=False)
        ax.set_title(title)
        ax.set_xticks(pos)
        ax.set_xticklabels([f"{v}\nn={len(data[v])}" if nv <= 8 else v for v in present],
                           rotation=0 if nv <= 8 else 45, ha="center" if nv <= 8 else "right")
        for lbl, v in zip(ax.get_xticklabels(), present):
            if v == st.baseline:
                lbl.set_fontweight("bold")
        ax.grid(axis="y", alpha=0.3)
        if st.log_y:
            _set_log_y(ax, np.concatenate(series))
    for ax in axes:
        ax.set_ylabel(st.metric)
    _save(fig, out / "distributions.png")
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


@dataclasses.dataclass
class _Welch:
    variant: str
    n: int
    mean: float
    base_mean: float
    diff: float
    t: float | None
    p: float | None
    mark: str
    ci: tuple[float, float] | None


def _welch(st: _Study, a: np.ndarray, b: np.ndarray, variant: str) -> _Welch:
    from scipy import stats

    mean = float(a.mean()) if len(a) else math.nan
    base = float(b.mean()) if len(b) else math.nan
    res = _Welch(variant, len(a), mean, base, mean - base, None, None, "n/a (n < 2)", None)
    if len(a) < 2 or len(b) < 2:
        return res
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        res.mark = "n/a (no variance)"
        return res
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = stats.ttest_ind(a, b, equal_var=False)
        try:
            ci = r.confidence_interval(1 - ALPHA)
            res.ci = (float(ci.low), float(ci.high))
        except Exception:  # noqa: BLE001 - older scipy, or a degenerate case
            res.ci = None
    t, p = float(r.statistic), float(r.pvalue)
    if not (math.isfinite(t) and math.isfinite(p)):
        res.mark = "n/a (no variance)"
        return res
    res.t, res.p = t, p
    res.mark = (("better" if st.better(res.diff) else "worse") + " *") if p < ALPHA else "n.s."
    return res


def _welch_section(st: _Study, out: pathlib.Path, numbers: dict | None = None) -> list[Block]:
    blocks: list[Block] = [Heading("Welch's t-test against the baseline")]
    if st.baseline is None or st.baseline not in st.present:
        why = "no baseline is set" if st.baseline is None else f"the baseline {st.baseline} has no complete trials"
        return blocks + [Paragraph(f"Skipped: {why}.")]
    others = [v for v in st.variants if v != st.baseline]
    if not others:
        return blocks + [Paragraph("Skipped: the study has no variant besides the baseline.")]
    empty = np.zeros(0)
    results = {
        "all": [_welch(st, st.values[v], st.values[st.baseline], v) for v in others],
        "top": [_welch(st, st.top.get(v, empty), st.top[st.baseline], v) for v in others],
    }
    better = "lower" if st.sign > 0 else "higher"
    blocks.append(Paragraph(
        f"Each variant's {st.metric} against the baseline {st.baseline} with Welch's unequal-variance t-test "
        f"(scipy.stats.ttest_ind, equal_var=False); {better} is better; * marks p < {ALPHA}. "
        f"Difference = variant mean - baseline mean. Baseline: n = {len(st.values[st.baseline])} (all), "
        f"{len(st.top[st.baseline])} (top 10%)."))
    cols = ["variant", "n", "mean", "baseline mean", "difference", "t", "p-value", "result"]
    for key, title in (("all", "All complete trials"), ("top", "Top 10% of each variant")):
        rows = [[r.variant, str(r.n), fmt(r.mean), fmt(r.base_mean), fmt(r.diff),
                 _DASH if r.t is None else f"{r.t:.3g}", _DASH if r.p is None else fmt_p(r.p), r.mark]
                for r in results[key]]
        blocks += [Heading(title, 3), Table(cols, rows, ["left"] + ["right"] * 6 + ["left"])]
    if numbers is not None:
        numbers["welch"] = {r.variant: {"n": r.n, "mean": r.mean, "difference": r.diff, "t": r.t, "p_value": r.p,
                                        "result": r.mark} for r in results["all"]}
    _welch_figure(st, results, out / "welch.png")
    blocks.append(Image("welch.png", "mean difference against the baseline",
                        f"Mean difference to {st.baseline} with the 95% Welch confidence interval; "
                        "green: significantly better, red: significantly worse, grey: not significant or "
                        "not testable."))
    return blocks


def _welch_figure(st: _Study, results: dict[str, list[_Welch]], path: pathlib.Path) -> None:
    from matplotlib.patches import Patch

    names = [r.variant for r in results["all"]]
    n = len(names)
    fig = _figure(10.0, max(2.6, 0.42 * n + 1.6))
    axes = fig.subplots(1, 2, sharey=True)
    colors = {"better *": "tab:green", "worse *": "tab:red"}
    for ax, (key, title) in zip(axes, (("all", "All complete trials"), ("top", "Top 10% of each variant"))):
        ys = np.arange(n)[::-1]
        for y, r in zip(ys, results[key]):
            if not math.isfinite(r.diff):
                ax.text(0, y, "  no trials", va="center", fontsize=8, color="0.4")
                continue
            ax.barh(y, r.diff, height=0.6, color=colors.get(r.mark, "0.7"))
            if r.ci is not None and all(math.isfinite(c) for c in r.ci):
                ax.errorbar(r.diff, y, xerr=[[r.diff - r.ci[0]], [r.ci[1] - r.diff]], fmt="none",
                            ecolor="0.2", capsize=3, linewidth=1)
            if r.mark.endswith("*"):
                hi = r.ci[1] if r.diff >= 0 and r.ci else r.ci[0] if r.ci else r.diff
                ax.annotate("*", (hi, y), xytext=(5 if r.diff >= 0 else -5, -4), textcoords="offset points",
                            ha="left" if r.diff >= 0 else "right", va="center", fontsize=13, fontweight="bold")
            elif r.mark.startswith("n/a"):
                ax.annotate(r.mark, (r.diff, y), xytext=(4 if r.diff >= 0 else -4, 0), textcoords="offset points",
                            ha="left" if r.diff >= 0 else "right", va="center", fontsize=7, color="0.4")
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_ylim(-0.6, n - 0.4)
        ax.set_yticks(ys)
        ax.set_yticklabels(names)
        ax.set_title(title)
        ax.set_xlabel(f"{st.metric}: variant mean - {st.baseline} mean")
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.15)
    handles = [Patch(color="tab:green", label=f"better (p < {ALPHA})"),
               Patch(color="tab:red", label=f"worse (p < {ALPHA})"), Patch(color="0.7", label="n.s. / n/a")]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, frameon=False, fontsize=9)
    _save(fig, path)


# --------------------------------------------------------------------------------------------
# fANOVA
# --------------------------------------------------------------------------------------------


def _unify(dists: list[Any]) -> Any:
    """One distribution covering every trial's (search spaces may have changed while a study ran)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    first = dists[0]
    if all(d == first for d in dists):
        return first
    if all(isinstance(d, CategoricalDistribution) for d in dists):
        return CategoricalDistribution(list(dict.fromkeys(c for d in dists for c in d.choices)))
    low = min(d.low for d in dists)
    high = max(d.high for d in dists)
    log = all(getattr(d, "log", False) for d in dists)
    if all(isinstance(d, IntDistribution) for d in dists):
        steps = {d.step for d in dists}
        return IntDistribution(int(low), int(high), log=log, step=steps.pop() if len(steps) == 1 and not log else 1)
    return FloatDistribution(float(low), float(high), log=log and low > 0)


@dataclasses.dataclass
class _Fanova:
    columns: list[str]  # "all" and the variants analysed
    params: list[str]  # optuna names, table order
    importance: dict[str, dict[str, float]]  # column -> param -> importance
    constant: dict[str, set[str]]  # column -> params that did not vary
    notes: list[str]


def _fanova(st: _Study, frozen_trials: Sequence[Any]) -> _Fanova:
    import optuna
    from optuna.distributions import CategoricalDistribution, IntDistribution
    from optuna.trial import TrialState

    res = _Fanova([], [], {}, {}, [])
    hp = {col: str(spec.get("optuna_name") or col) for col, spec in st.params.items()}
    names = list(hp.values())
    numeric = [hp[c] for c, spec in st.params.items() if spec.get("kind") != "choice"]
    usable = [t for t in frozen_trials or []
              if t.state == TrialState.COMPLETE and t.value is not None and _finite(t.value)
              and all(n in t.params for n in names)]
    if not names:
        res.notes.append("Skipped: the study declares no hyperparameters.")
        return res
    if len(usable) < FANOVA_MIN_TRIALS:
        res.notes.append(f"Skipped: {len(usable)} complete trial(s) carry all hyperparameters "
                         f"({', '.join(names)}); fANOVA needs at least {FANOVA_MIN_TRIALS}.")
        return res

    by_number = dict(zip(st.trials["number"], st.trials["variant"])) if "number" in st.trials else {}

    def variant_of(t) -> str | None:
        if "variant" in t.params:
            return str(t.params["variant"])
        if "variant" in t.user_attrs:
            return str(t.user_attrs["variant"])
        v = by_number.get(t.number)
        return None if v is None else str(v)

    use_variant = "variant" not in names and any(
        isinstance(t.distributions.get("variant"), CategoricalDistribution) for t in usable)
    # Search spaces (categoricals as an index: see the module docstring).
    dists: dict[str, Any] = {}
    codes: dict[str, dict[Any, int]] = {}
    for n in names:
        d = _unify([t.distributions[n] for t in usable])
        if isinstance(d, CategoricalDistribution):
            codes[n] = {c: i for i, c in enumerate(d.choices)}
            d = IntDistribution(0, max(len(d.choices) - 1, 0))
        dists[n] = d
    if use_variant:
        seen = list(dict.fromkeys(str(t.params["variant"]) for t in usable if "variant" in t.params))
        order = [v for v in st.variants if v in seen] + [v for v in seen if v not in st.variants]
        codes["variant"] = {v: i for i, v in enumerate(order)}
        dists["variant"] = IntDistribution(0, max(len(order) - 1, 0))
    rows = []  # (variant, value, encoded params)
    for t in usable:
        p = {n: codes[n][t.params[n]] if n in codes else t.params[n] for n in names}
        if use_variant:
            if "variant" not in t.params:
                continue
            p["variant"] = codes["variant"][str(t.params["variant"])]
        rows.append((variant_of(t), float(t.value), p))

    rng = np.random.default_rng(0)
    subsampled: dict[str, int] = {}  # column -> trials before subsampling

    def analyse(column: str, subset: list[tuple], params: list[str], cap: int) -> None:
        label = "all trials" if column == "all" else f"variant {column}"
        if len(subset) < FANOVA_MIN_TRIALS:
            res.notes.append(f"{label}: skipped, {len(subset)} complete trial(s) (need {FANOVA_MIN_TRIALS}).")
            return
        values = np.array([r[1] for r in subset])
        if np.ptp(values) == 0:
            res.notes.append(f"{label}: skipped, all {len(subset)} trials have the same {st.metric}.")
            return
        varying = [n for n in params if len({r[2][n] for r in subset}) > 1]
        res.constant[column] = set(params) - set(varying)
        if not varying:
            res.notes.append(f"{label}: skipped, no hyperparameter takes two distinct values.")
            return
        if len(subset) > cap:
            keep = np.sort(rng.choice(len(subset), cap, replace=False))
            subsampled[column] = len(subset)
            subset = [subset[i] for i in keep]
        try:
            study = optuna.create_study(direction=st.direction)
            study.add_trials([optuna.trial.create_trial(
                state=TrialState.COMPLETE, value=value,
                params={n: p[n] for n in varying}, distributions={n: dists[n] for n in varying})
                for _, value, p in subset])
            imp = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), params=varying)
        except Exception as e:  # noqa: BLE001 - a failed analysis is reported, never fatal
            res.notes.append(f"{label}: fANOVA failed ({type(e).__name__}: {e}).")
            return
        res.columns.append(column)
        res.importance[column] = {k: float(v) for k, v in imp.items()}

    all_params = names + (["variant"] if use_variant else [])
    groups = {v: [r for r in rows if r[0] == v] for v in st.present}
    groups = {v: g for v, g in groups.items() if g}
    cap = min(FANOVA_MAX_TRIALS, max(FANOVA_PER_VARIANT_MIN, FANOVA_PER_VARIANT_BUDGET // max(1, len(groups))))
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        analyse("all", rows, all_params, FANOVA_MAX_TRIALS)
        if numeric:
            for v, g in groups.items():
                analyse(v, g, numeric, cap)
        else:
            res.notes.append("Per-variant analyses skipped: no numeric hyperparameters.")
    finally:
        optuna.logging.set_verbosity(verbosity)
    if "all" in subsampled:
        res.notes.append(f"all trials: fANOVA on a random subsample of {FANOVA_MAX_TRIALS} of "
                         f"{subsampled['all']} trials (to bound its run time).")
    per = {c: n for c, n in subsampled.items() if c != "all"}
    if per:
        res.notes.append(f"Per variant: fANOVA on a random subsample of {cap} trials for "
                         + ", ".join(f"{c} (of {n})" for c, n in per.items()) + ".")
    res.params = all_params
    if "all" in res.importance:  # table order: overall importance, then declaration order
        res.params = sorted(all_params, key=lambda n: -res.importance["all"].get(n, -1.0))
    return res


def _param_label(st: _Study, optuna_name: str) -> str:
    if optuna_name == "variant":
        return "variant"
    for col, spec in st.params.items():
        if str(spec.get("optuna_name") or col) == optuna_name:
            short = st.display[col]
            return f"1 - {short}" if spec.get("kind") == "one_minus_log_uniform" else short
    return display_name(optuna_name)


def _importance_section(st: _Study, out: pathlib.Path, frozen_trials: Sequence[Any],
                        numbers: dict | None = None) -> list[Block]:
    blocks: list[Block] = [Heading("Hyperparameter importance (fANOVA)")]
    try:
        fa = _fanova(st, frozen_trials)
    except Exception as e:  # noqa: BLE001 - e.g. optuna missing: the report goes on
        return blocks + [Paragraph(f"Skipped: {type(e).__name__}: {e}")]
    blocks.append(Paragraph(
        "Share of the variance of the metric explained by each hyperparameter alone (fANOVA main effects, "
        "optuna's FanovaImportanceEvaluator(seed=0), normalised to sum to 1 per column), over all complete "
        "trials (with the variant as one more factor) and per variant (numeric hyperparameters only). "
        "const.: the hyperparameter did not vary in those trials."))
    if numbers is not None and "all" in fa.importance:
        numbers["importance"] = {_param_label(st, n): float(v) for n, v in fa.importance["all"].items()}
    if fa.columns:
        rows = []
        for n in fa.params:
            row = [_param_label(st, n)]
            for c in fa.columns:
                if n in fa.importance[c]:
                    row.append(fmt(fa.importance[c][n]))
                else:
                    row.append("const." if n in fa.constant.get(c, ()) else _DASH)
            rows.append(row)
        blocks.append(Table(["hyperparameter"] + fa.columns, rows))
        _importance_figure(st, fa, out / "importance.png")
        blocks.append(Image("importance.png", "fANOVA hyperparameter importance"))
    else:
        blocks.append(Paragraph("No importance could be computed:" if fa.notes else "No importance computed."))
    if fa.notes:
        blocks.append(BulletList(fa.notes))
    return blocks


def _importance_figure(st: _Study, fa: _Fanova, path: pathlib.Path) -> None:
    """Bars for the overall analysis; a heatmap (variants x hyperparameters) for the per-variant ones."""
    per_variant = [c for c in fa.columns if c != "all"]
    has_all = "all" in fa.columns
    hp = [n for n in fa.params if n != "variant" and any(n in fa.importance[c] for c in per_variant)]
    bars_w, heat_w = (5.0 if has_all else 0.0), (max(3.5, 1.0 * len(hp) + 2.5) if per_variant else 0.0)
    height = max(3.0, 0.45 * len(fa.params) + 1.6 if has_all else 0.0,
                 0.32 * len(per_variant) + 1.9 if per_variant else 0.0)
    fig = _figure(bars_w + heat_w, height)
    ratios = [r for r in (bars_w, heat_w) if r]
    axes = np.atleast_1d(fig.subplots(1, len(ratios), width_ratios=ratios if len(ratios) > 1 else None))
    if has_all:
        ax = axes[0]
        names = [n for n in fa.params if n in fa.importance["all"]][::-1]
        vals = [fa.importance["all"][n] for n in names]
        ax.barh(np.arange(len(names)), vals, color="tab:blue", height=0.6)
        for y, v in enumerate(vals):
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
        ax.set_yticks(np.arange(len(names)))
        ax.set_yticklabels([_param_label(st, n) for n in names])
        ax.set_xlim(0, 1.1)
        ax.set_xlabel("importance (share of variance)")
        ax.set_title("All trials")
        ax.grid(axis="x", alpha=0.3)
    if per_variant:
        ax = axes[-1]
        grid = np.array([[fa.importance[c].get(n, np.nan) for n in hp] for c in per_variant])
        im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_facecolor("0.85")  # masked: the hyperparameter did not vary in that variant
        ax.set_xticks(np.arange(len(hp)))
        ax.set_xticklabels([_param_label(st, n) for n in hp], rotation=30 if len(hp) > 3 else 0,
                           ha="right" if len(hp) > 3 else "center")
        ax.set_yticks(np.arange(len(per_variant)))
        ax.set_yticklabels(per_variant)
        for lbl, v in zip(ax.get_yticklabels(), per_variant):
            if v == st.baseline:
                lbl.set_fontweight("bold")
        if len(hp) <= 10:
            for i in range(grid.shape[0]):
                for j in range(grid.shape[1]):
                    if np.isfinite(grid[i, j]):
                        ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8,
                                color="white" if grid[i, j] < 0.6 else "black")
        ax.set_title("Per variant")
        fig.colorbar(im, ax=ax, label="importance", shrink=0.9)
    _save(fig, path)


# --------------------------------------------------------------------------------------------
# Metric against each hyperparameter
# --------------------------------------------------------------------------------------------


def _kernel_trend(x: np.ndarray, y: np.ndarray, min_bandwidth: float, n_grid: int = 80
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Nadaraya-Watson (Gaussian-kernel weighted mean) of y on a grid over x's range.

    Bandwidth by Scott's rule, ``1.06 * std(x) * n ** -0.2``, at least ``min_bandwidth``.
    """
    bandwidth = max(1.06 * float(np.std(x)) * len(x) ** -0.2, min_bandwidth)
    grid = np.linspace(x.min(), x.max(), n_grid)
    w = np.exp(-0.5 * ((grid[:, None] - x[None, :]) / bandwidth) ** 2)
    return grid, (w @ y) / np.maximum(w.sum(axis=1), 1e-300)


def _hyperparams(st: _Study, out: pathlib.Path) -> list[Block]:
    import pandas as pd

    blocks: list[Block] = [Heading("Metric against each hyperparameter")]
    cols = [c for c in st.params if c in st.done.columns]
    missing = [c for c in st.params if c not in st.done.columns]
    if not cols:
        return blocks + [Paragraph("Skipped: the trials table has no hyperparameter column.")]
    ncols = min(3, len(cols))
    nrows = -(-len(cols) // ncols)
    fig = _figure(4.6 * ncols, 3.7 * nrows + 0.3 + 0.25 * (-(-len(st.present) // 6)))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharey=True, squeeze=False)).ravel()
    rng = np.random.default_rng(0)
    y_all = st.done["value"].to_numpy(dtype=float)
    ty = np.log if st.log_y else (lambda a: a)
    ity = np.exp if st.log_y else (lambda a: a)
    notes: list[str] = []
    for ax, col in zip(axes, cols):
        spec = st.params[col]
        kind = spec.get("kind", "uniform")
        short = st.display[col]
        if kind == "choice":
            choices = list(spec.get("choices") or [])
            seen = list(dict.fromkeys(st.done[col].dropna()))
            cats = [c for c in choices if c in seen] + [c for c in seen if c not in choices]
            pos = {c: i for i, c in enumerate(cats)}
            off = np.linspace(-0.25, 0.25, len(st.present)) if len(st.present) > 1 else np.zeros(1)
            for k, v in enumerate(st.present):
                d = st.done[(st.done["variant"] == v) & st.done[col].notna()]
                if d.empty:
                    continue
                x = d[col].map(pos).to_numpy(dtype=float) + off[k]
                y = d["value"].to_numpy(dtype=float)
                ax.scatter(x + _jitter(len(x), 0.04, rng), y, s=_point_size(len(y_all)), color=st.colors[v],
                           alpha=0.5, edgecolors="none")
                means = d.groupby(col, sort=False)["value"].apply(lambda s: float(ity(ty(s.to_numpy()).mean())))
                ax.scatter([pos[c] + off[k] for c in means.index], means.to_numpy(), marker="_", s=260,
                           linewidths=2.5, color=st.colors[v], zorder=4)
            ax.set_xticks(range(len(cats)))
            ax.set_xticklabels([str(c) for c in cats])
            ax.set_xlim(-0.6, len(cats) - 0.4)
            ax.set_xlabel(short)
        else:
            raw = pd.to_numeric(st.done[col], errors="coerce").to_numpy(dtype=float)
            xs = 1.0 - raw if kind == "one_minus_log_uniform" else raw
            log = kind in _LOG_KINDS
            ok = np.isfinite(xs) & (xs > 0 if log else True)
            if (~ok & np.isfinite(raw)).any():
                notes.append(f"{short}: {int((~ok & np.isfinite(raw)).sum())} value(s) outside the log axis left out.")
            axis_x = np.log10(np.where(ok, xs, 1.0)) if log else xs
            span = float(np.ptp(axis_x[ok])) if ok.any() else 0.0
            for v in st.present:
                m = ok & (st.done["variant"] == v).to_numpy()
                if not m.any():
                    continue
                ax.scatter(xs[m], y_all[m], s=_point_size(len(y_all)), color=st.colors[v], alpha=0.5,
                           edgecolors="none")
                if m.sum() >= 3 and np.ptp(axis_x[m]) > 0 and span > 0:
                    g, tr = _kernel_trend(axis_x[m], ty(y_all[m]), 0.05 * span)
                    ax.plot(10 ** g if log else g, ity(tr), color=st.colors[v], linewidth=2.0,
                            linestyle="--" if v == st.baseline else "-")
            if log:
                ax.set_xscale("log")
                if ok.any():
                    _log_axis(ax.xaxis, float(xs[ok].min()), float(xs[ok].max()))
            ax.set_xlabel(f"1 - {short}" if kind == "one_minus_log_uniform" else short)
        ax.grid(alpha=0.3)
    for ax in axes[len(cols):]:
        ax.set_visible(False)
    for r in range(nrows):
        axes[r * ncols].set_ylabel(st.metric)
    if st.log_y:
        _set_log_y(axes[0], y_all)  # shared y
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=st.colors[v], marker="o", linewidth=2.0,
                      linestyle="--" if v == st.baseline else "-",
                      label=f"{v} (baseline)" if v == st.baseline else v) for v in st.present]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(6, len(handles)), frameon=False, fontsize=9)
    _save(fig, out / "hyperparams.png")
    blocks += [
        Paragraph(f"{st.metric} of every complete trial against each hyperparameter, coloured by variant, with a "
                  "Gaussian-kernel weighted mean per variant (bandwidth by Scott's rule on the plotted "
                  "scale: log for log-uniform hyperparameters; the baseline's trend dashed). Categorical "
                  "hyperparameters show the mean per category as a bar."),
        Image("hyperparams.png", "metric against each hyperparameter"),
    ]
    if missing:
        notes.append(f"No column in the trials table for: {', '.join(missing)}.")
    if notes:
        blocks.append(BulletList(notes))
    return blocks


# --------------------------------------------------------------------------------------------
# Learning curves
# --------------------------------------------------------------------------------------------


def _curves(st: _Study, out: pathlib.Path, curves: pd.DataFrame | None) -> list[Block]:
    import pandas as pd

    blocks: list[Block] = [Heading("Learning curves")]
    need = {"number", "step", "split", "loss"}
    if curves is None or len(curves) == 0 or not need <= set(curves.columns) or "number" not in st.done:
        return blocks + [Paragraph("No learning curves were recorded for this study.")]
    best = {}
    for v in st.present:
        d = st.done[st.done["variant"] == v]
        best[v] = int(d.loc[(st.sign * d["value"]).idxmin(), "number"])
    cv = curves[curves["number"].isin(list(best.values()))].copy()
    cv["loss"] = pd.to_numeric(cv["loss"], errors="coerce")
    cv = cv[np.isfinite(cv["loss"].to_numpy(dtype=float))]
    plotted = [v for v in st.present if (cv["number"] == best[v]).any()]
    without = [v for v in st.present if v not in plotted]
    if not plotted:
        return blocks + [Paragraph("No learning curves were recorded for the best trials of the variants.")]
    fig = _figure(8.5, 4.8)
    ax = fig.subplots()
    from matplotlib.lines import Line2D

    handles = []
    for v in plotted:
        d = cv[cv["number"] == best[v]].sort_values("step")
        for split, style, alpha, lw in (("train", "--", 0.45, 1.2), ("valid", "-", 1.0, 1.8)):
            s = d[d["split"] == split]
            if len(s):
                ax.plot(s["step"], s["loss"], linestyle=style, color=st.colors[v], alpha=alpha, linewidth=lw,
                        marker="o" if len(s) <= 12 and split == "valid" else None, markersize=3)
        handles.append(Line2D([], [], color=st.colors[v], linewidth=1.8, label=f"{v} (#{best[v]})"))
    handles += [Line2D([], [], color="0.3", linewidth=1.8, label="valid"),
                Line2D([], [], color="0.3", linewidth=1.2, linestyle="--", alpha=0.6, label="train")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
    losses = cv["loss"].to_numpy(dtype=float)
    if np.all(losses > 0):
        _set_log_y(ax, losses)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"Best trial of each variant (by {st.metric})")
    ax.grid(alpha=0.3)
    _save(fig, out / "curves.png")
    blocks += [Paragraph("Validation loss (solid) and training loss (dashed, lighter) against the training step "
                         "for the best trial of each variant."),
               Image("curves.png", "learning curves of the best trial per variant")]
    if without:
        blocks.append(Paragraph(f"No curves recorded for the best trial of: {', '.join(without)}."))
    return blocks


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _write_numbers(st: _Study, numbers: dict, path: pathlib.Path) -> None:
    """``report.json``: the report's numbers for scripts (``scripts/readme_results.py``): per variant the
    complete count, best, mean and Welch's test against the baseline (all trials); fANOVA importance over all
    trials (the variant included). The same values the tables show, computed once."""
    import json

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


def build_report(
    out_dir: str | pathlib.Path,
    info: dict[str, Any],
    trials: pd.DataFrame,
    curves: pd.DataFrame | None,
    frozen_trials: Sequence[Any],
) -> pathlib.Path:
    """Write the Odyssey-style report of a study into ``out_dir`` and return the path of ``report.md``.

    Args:
        out_dir: created if missing; receives ``report.md``, ``report.html``, ``report.json`` (the numbers),
            ``trials.csv`` and the
            figures (``distributions.png``, ``welch.png``, ``importance.png``, ``hyperparams.png``,
            ``curves.png``; a figure whose section is skipped is not written).
        info: the study: ``name``, ``task``, ``metric``, ``direction`` ("minimize"/"maximize"),
            ``baseline`` (a variant), ``variants`` (display order) and ``params`` (column ->
            ``{"kind", "low", "high", "choices", "optuna_name"}``).
        trials: one row per trial (``number``, ``variant``, ``status``, ``value``, the hyperparameter
            columns with their actual values, ...).  Rows with status ``"complete"`` and a finite
            ``value`` enter the statistics.
        curves: long-form learning curves (``number``, ``variant``, ``step``, ``split``, ``loss``); may be
            empty or None.
        frozen_trials: the study's optuna trials (any state), for fANOVA.

    Raises:
        ValueError: no trial is complete with a finite value.
    """
    st = _load(info, trials)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    blocks: list[Block] = []
    blocks += _summary(st)
    blocks += _variants_section(st)
    blocks += _distributions(st, out)
    numbers: dict[str, Any] = {}
    blocks += _welch_section(st, out, numbers)
    blocks += _importance_section(st, out, frozen_trials, numbers)
    blocks += _hyperparams(st, out)
    blocks += _curves(st, out, curves)
    trials.to_csv(out / "trials.csv", index=False)
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
