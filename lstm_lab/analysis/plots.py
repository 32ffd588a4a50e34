"""The figures of an Odyssey-style study: data in, a :class:`matplotlib.figure.Figure` out.

Figures are drawn on :class:`~matplotlib.figure.Figure` objects directly (never ``pyplot``), so no GUI backend
is touched, no global figure registry fills up, and figures can be made from several threads; in a notebook
``display(fig)`` shows one. matplotlib is imported inside these functions only.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from lstm_lab.analysis import stats
from lstm_lab.sweep import space

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pandas as pd
    from matplotlib.figure import Figure

    from lstm_lab.analysis.data import StudyTable

__all__ = ["distributions", "welch", "importance", "hyperparams", "curves", "palette", "save"]

DPI = 110


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def palette(variants: Sequence[str], baseline: str | None) -> dict[str, Any]:
    """A colour per variant (the baseline near-black)."""
    from matplotlib import colormaps

    others = [v for v in variants if v != baseline]
    cmap = colormaps["tab10" if len(others) <= 10 else "tab20"]
    colors = {v: cmap(i % cmap.N) for i, v in enumerate(others)}
    if baseline is not None:
        colors[baseline] = (0.1, 0.1, 0.1, 1.0)
    return colors


def _log_y(st: StudyTable) -> bool:
    """A loss-like metric whose values are all positive is drawn on a log axis."""
    lossy = any(w in st.metric.lower() for w in ("loss", "perplexity", "bpc", "error"))
    return bool(lossy and np.all(st.done["value"].to_numpy(dtype=float) > 0))


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save(fig: Figure, path: pathlib.Path) -> None:
    """Write ``fig`` (PNG at the report's resolution) and free it."""
    fig.savefig(path, dpi=DPI)
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
# Figures
# --------------------------------------------------------------------------------------------
def distributions(st: StudyTable) -> Figure:
    """The metric per variant over all complete trials and over the top 10% of each (the Odyssey's Fig. 3):
    boxes (quartiles, median, mean, the whole range) and the trials as points; the baseline shaded, its
    median dotted."""
    present, colors, log_y = st.present, palette(st.variants, st.baseline), _log_y(st)
    top = {v: stats.top_fraction(st.values[v], st.direction) for v in present}
    nv = len(present)
    stacked = nv > 6
    width = max(6.0, 0.55 * nv + 2.0) if stacked else max(9.0, 1.1 * nv * 2 + 2.0)
    fig = _figure(width, 8.0 if stacked else 4.6)
    axes = fig.subplots(2, 1, sharex=True) if stacked else fig.subplots(1, 2)  # own y scale: top 10% is narrow
    rng = np.random.default_rng(0)
    for ax, (title, data) in zip(axes, [("All complete trials", st.values), ("Top 10% of each variant", top)]):
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
            ax.scatter(i + _jitter(len(y), 0.18, rng), y, s=_point_size(len(y)), color=colors[v],
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
        if log_y:
            _set_log_y(ax, np.concatenate(series))
    for ax in axes:
        ax.set_ylabel(st.metric)
    return fig


def welch(results: pd.DataFrame, top: pd.DataFrame, *, metric: str, baseline: str,
          alpha: float = stats.ALPHA) -> Figure:
    """Each variant's mean difference to the baseline with its Welch confidence interval, over all complete trials
    and over the top 10% (two :func:`~lstm_lab.analysis.stats.welch_vs_baseline` tables): green significantly
    better, red significantly worse, grey not significant or not testable."""
    from matplotlib.patches import Patch

    names = list(results.index)
    n = len(names)
    fig = _figure(10.0, max(2.6, 0.42 * n + 1.6))
    axes = fig.subplots(1, 2, sharey=True)
    colors = {"better *": "tab:green", "worse *": "tab:red"}
    for ax, (table, title) in zip(axes, ((results, "All complete trials"), (top, "Top 10% of each variant"))):
        ys = np.arange(n)[::-1]
        for y, (_, r) in zip(ys, table.iterrows()):
            diff, mark = float(r["difference"]), str(r["result"])
            ci = (float(r["ci_low"]), float(r["ci_high"]))
            ci = ci if all(math.isfinite(c) for c in ci) else None
            if not math.isfinite(diff):
                ax.text(0, y, "  no trials", va="center", fontsize=8, color="0.4")
                continue
            ax.barh(y, diff, height=0.6, color=colors.get(mark, "0.7"))
            if ci is not None:
                ax.errorbar(diff, y, xerr=[[diff - ci[0]], [ci[1] - diff]], fmt="none", ecolor="0.2", capsize=3,
                            linewidth=1)
            if mark.endswith("*"):
                hi = ci[1] if diff >= 0 and ci else ci[0] if ci else diff
                ax.annotate("*", (hi, y), xytext=(5 if diff >= 0 else -5, -4), textcoords="offset points",
                            ha="left" if diff >= 0 else "right", va="center", fontsize=13, fontweight="bold")
            elif mark.startswith("n/a"):
                ax.annotate(mark, (diff, y), xytext=(4 if diff >= 0 else -4, 0), textcoords="offset points",
                            ha="left" if diff >= 0 else "right", va="center", fontsize=7, color="0.4")
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_ylim(-0.6, n - 0.4)
        ax.set_yticks(ys)
        ax.set_yticklabels(names)
        ax.set_title(title)
        ax.set_xlabel(f"{metric}: variant mean - {baseline} mean")
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.15)
    handles = [Patch(color="tab:green", label=f"better (p < {alpha})"),
               Patch(color="tab:red", label=f"worse (p < {alpha})"), Patch(color="0.7", label="n.s. / n/a")]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, frameon=False, fontsize=9)
    return fig


def importance(imp: pd.DataFrame, *, labels: Callable[[str], str] = str, baseline: str | None = None) -> Figure:
    """fANOVA importance (a :func:`~lstm_lab.analysis.stats.fanova_importance` table): bars for the analysis over
    all trials, a heatmap (variants x hyperparameters) for the per-variant ones. ``labels``: a hyperparameter's
    name on the axes."""
    per_variant = [c for c in imp.columns if c != "all"]
    has_all = "all" in imp.columns
    hp = [n for n in imp.index if n != "variant" and imp.loc[n, per_variant].notna().any()] if per_variant else []
    bars_w, heat_w = (5.0 if has_all else 0.0), (max(3.5, 1.0 * len(hp) + 2.5) if per_variant else 0.0)
    height = max(3.0, 0.45 * len(imp.index) + 1.6 if has_all else 0.0,
                 0.32 * len(per_variant) + 1.9 if per_variant else 0.0)
    fig = _figure(bars_w + heat_w, height)
    ratios = [r for r in (bars_w, heat_w) if r]
    axes = np.atleast_1d(fig.subplots(1, len(ratios), width_ratios=ratios if len(ratios) > 1 else None))
    if has_all:
        ax = axes[0]
        names = [n for n in imp.index if np.isfinite(imp.loc[n, "all"])][::-1]
        vals = [float(imp.loc[n, "all"]) for n in names]
        ax.barh(np.arange(len(names)), vals, color="tab:blue", height=0.6)
        for y, v in enumerate(vals):
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
        ax.set_yticks(np.arange(len(names)))
        ax.set_yticklabels([labels(n) for n in names])
        ax.set_xlim(0, 1.1)
        ax.set_xlabel("importance (share of variance)")
        ax.set_title("All trials")
        ax.grid(axis="x", alpha=0.3)
    if per_variant:
        ax = axes[-1]
        grid = imp.loc[hp, per_variant].to_numpy(dtype=float).T
        im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_facecolor("0.85")  # masked: the hyperparameter did not vary in that variant
        ax.set_xticks(np.arange(len(hp)))
        ax.set_xticklabels([labels(n) for n in hp], rotation=30 if len(hp) > 3 else 0,
                           ha="right" if len(hp) > 3 else "center")
        ax.set_yticks(np.arange(len(per_variant)))
        ax.set_yticklabels(per_variant)
        for lbl, v in zip(ax.get_yticklabels(), per_variant):
            if v == baseline:
                lbl.set_fontweight("bold")
        if len(hp) <= 10:
            for i in range(grid.shape[0]):
                for j in range(grid.shape[1]):
                    if np.isfinite(grid[i, j]):
                        ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8,
                                color="white" if grid[i, j] < 0.6 else "black")
        ax.set_title("Per variant")
        fig.colorbar(im, ax=ax, label="importance", shrink=0.9)
    return fig


def _kernel_trend(x: np.ndarray, y: np.ndarray, min_bandwidth: float, n_grid: int = 80
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Nadaraya-Watson (Gaussian-kernel weighted mean) of y on a grid over x's range.

    Bandwidth by Scott's rule, ``1.06 * std(x) * n ** -0.2``, at least ``min_bandwidth``.
    """
    bandwidth = max(1.06 * float(np.std(x)) * len(x) ** -0.2, min_bandwidth)
    grid = np.linspace(x.min(), x.max(), n_grid)
    w = np.exp(-0.5 * ((grid[:, None] - x[None, :]) / bandwidth) ** 2)
    return grid, (w @ y) / np.maximum(w.sum(axis=1), 1e-300)


def hyperparams(st: StudyTable) -> Figure | None:
    """The metric of every complete trial against each hyperparameter (on its searched scale: log axes,
    ``1 - momentum``), coloured by variant, with a Gaussian-kernel weighted mean per variant (the baseline's
    dashed); a categorical hyperparameter shows the mean per category as a bar. None: the trials table has no
    hyperparameter column. Values a log axis cannot show are left out."""
    cols = [c for c in st.params if c in st.done.columns]
    if not cols:
        return None
    colors, log_y = palette(st.variants, st.baseline), _log_y(st)
    ncols = min(3, len(cols))
    nrows = -(-len(cols) // ncols)
    fig = _figure(4.6 * ncols, 3.7 * nrows + 0.3 + 0.25 * (-(-len(st.present) // 6)))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharey=True, squeeze=False)).ravel()
    rng = np.random.default_rng(0)
    y_all = st.done["value"].to_numpy(dtype=float)
    ty = np.log if log_y else (lambda a: a)
    ity = np.exp if log_y else (lambda a: a)
    for ax, col in zip(axes, cols):
        spec = st.params[col]
        kind = spec.get("kind", "uniform")
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
                ax.scatter(x + _jitter(len(x), 0.04, rng), y, s=_point_size(len(y_all)), color=colors[v],
                           alpha=0.5, edgecolors="none")
                means = d.groupby(col, sort=False)["value"].apply(lambda s: float(ity(ty(s.to_numpy()).mean())))
                ax.scatter([pos[c] + off[k] for c in means.index], means.to_numpy(), marker="_", s=260,
                           linewidths=2.5, color=colors[v], zorder=4)
            ax.set_xticks(range(len(cats)))
            ax.set_xticklabels([str(c) for c in cats])
            ax.set_xlim(-0.6, len(cats) - 0.4)
        else:
            xs = st.search_values(col)
            log = space.is_log(kind)
            ok = np.isfinite(xs) & (xs > 0 if log else True)
            axis_x = np.log10(np.where(ok, xs, 1.0)) if log else xs
            span = float(np.ptp(axis_x[ok])) if ok.any() else 0.0
            for v in st.present:
                m = ok & (st.done["variant"] == v).to_numpy()
                if not m.any():
                    continue
                ax.scatter(xs[m], y_all[m], s=_point_size(len(y_all)), color=colors[v], alpha=0.5,
                           edgecolors="none")
                if m.sum() >= 3 and np.ptp(axis_x[m]) > 0 and span > 0:
                    g, tr = _kernel_trend(axis_x[m], ty(y_all[m]), 0.05 * span)
                    ax.plot(10 ** g if log else g, ity(tr), color=colors[v], linewidth=2.0,
                            linestyle="--" if v == st.baseline else "-")
            if log:
                ax.set_xscale("log")
                if ok.any():
                    _log_axis(ax.xaxis, float(xs[ok].min()), float(xs[ok].max()))
        ax.set_xlabel(st.search_label(col))
        ax.grid(alpha=0.3)
    for ax in axes[len(cols):]:
        ax.set_visible(False)
    for r in range(nrows):
        axes[r * ncols].set_ylabel(st.metric)
    if log_y:
        _set_log_y(axes[0], y_all)  # shared y
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[v], marker="o", linewidth=2.0,
                      linestyle="--" if v == st.baseline else "-",
                      label=f"{v} (baseline)" if v == st.baseline else v) for v in st.present]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(6, len(handles)), frameon=False, fontsize=9)
    return fig


def curves(st: StudyTable, best: dict[str, int], curves: pd.DataFrame) -> Figure:
    """Validation (solid) and training (dashed, lighter) loss against the step for the trials ``best``
    (variant -> trial number) in ``curves`` (long form: ``number``, ``step``, ``split``, ``loss``)."""
    from matplotlib.lines import Line2D

    colors = palette(st.variants, st.baseline)
    fig = _figure(8.5, 4.8)
    ax = fig.subplots()
    handles = []
    for v, number in best.items():
        d = curves[curves["number"] == number].sort_values("step")
        for split, style, alpha, lw in (("train", "--", 0.45, 1.2), ("valid", "-", 1.0, 1.8)):
            s = d[d["split"] == split]
            if len(s):
                ax.plot(s["step"], s["loss"], linestyle=style, color=colors[v], alpha=alpha, linewidth=lw,
                        marker="o" if len(s) <= 12 and split == "valid" else None, markersize=3)
        handles.append(Line2D([], [], color=colors[v], linewidth=1.8, label=f"{v} (#{number})"))
    handles += [Line2D([], [], color="0.3", linewidth=1.8, label="valid"),
                Line2D([], [], color="0.3", linewidth=1.2, linestyle="--", alpha=0.6, label="train")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
    losses = curves[curves["number"].isin(list(best.values()))]["loss"].to_numpy(dtype=float)
    if len(losses) and np.all(losses > 0):
        _set_log_y(ax, losses)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"Best trial of each variant (by {st.metric})")
    ax.grid(alpha=0.3)
    return fig
