"""lstm_lab.analysis: the Odyssey-style study report and its statistics, on small synthetic studies.

The synthetic metric depends strongly on the learning rate (a parabola in log
space), weakly on the rest, and NFG is 1.0 worse than the others, so the report
must find NFG significantly worse than the baseline and rank the learning rate
first in the fANOVA.
"""

from __future__ import annotations

import base64
import html
import math
import re

import numpy as np
import pytest

from lstm_lab.analysis import data, stats
from lstm_lab.analysis.odyssey import odyssey_comparison
from lstm_lab.analysis.render import display_name, fmt, fmt_p, to_markdown
from lstm_lab.analysis.report import build_report

pd = pytest.importorskip("pandas")
optuna = pytest.importorskip("optuna")
pytest.importorskip("matplotlib")
pytest.importorskip("scipy")
pytest.importorskip("sklearn")  # fANOVA's random forest
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ["distributions.png", "welch.png", "importance.png", "hyperparams.png", "curves.png"]
PARAMS = {
    "optim.learning_rate": {"kind": "log_uniform", "low": 1e-4, "high": 1e-1, "choices": None,
                            "optuna_name": "optim.learning_rate"},
    "model.hidden_size": {"kind": "int_log_uniform", "low": 8, "high": 64, "choices": None,
                          "optuna_name": "model.hidden_size"},
    "optim.momentum": {"kind": "one_minus_log_uniform", "low": 0.01, "high": 1.0, "choices": None,
                       "optuna_name": "1-optim.momentum"},
}


def make_study(variants=("vanilla", "NFG", "CIFG"), n_per=12, seed=0, listed=None, constant=None):
    """(info, trials, curves) of a synthetic random search; ``constant`` fixes every value."""
    rng = np.random.default_rng(seed)
    listed = list(listed or variants)
    rows, curve_rows = [], []
    number = 0
    for variant in variants:
        for i in range(n_per):
            lr = 10 ** rng.uniform(-4, -1)
            hidden = round(2 ** rng.uniform(3, 6))
            one_minus = 10 ** rng.uniform(-2, 0)
            value = (1.0 + (math.log10(lr) + 2.5) ** 2 + 0.05 * math.log10(hidden) + 0.05 * rng.normal()
                     + (1.0 if variant == "NFG" else 0.0))
            value = value if constant is None else constant
            rows.append({"number": number, "slot": f"{variant}/{i:04d}", "variant": variant, "seed": i,
                         "status": "complete", "value": value, "valid.loss": value + 0.01, "test.loss": value,
                         "wall_seconds": 1.0, "workdir": f"/tmp/w/{number}", "error": None,
                         "optim.learning_rate": lr, "model.hidden_size": hidden, "optim.momentum": 1 - one_minus})
            for step in range(0, 101, 20):
                decay = math.exp(-step / 40)
                curve_rows.append({"number": number, "variant": variant, "step": step, "split": "valid",
                                   "loss": value + 2 * decay})
                curve_rows.append({"number": number, "variant": variant, "step": step, "split": "train",
                                   "loss": value - 0.1 + 2 * decay})
            number += 1
    # Trials that never finished: counted, never analysed.
    for status, error in (("failed", "NaN loss\nat step 3"), ("diverged", "loss > 1e6"), ("running", None)):
        rows.append({"number": number, "slot": f"{variants[0]}/x{number}", "variant": variants[0], "seed": 99,
                     "status": status, "value": np.nan, "valid.loss": np.nan, "test.loss": np.nan,
                     "wall_seconds": 0.5, "workdir": f"/tmp/w/{number}", "error": error,
                     "optim.learning_rate": 0.5, "model.hidden_size": 8, "optim.momentum": 0.5})
        number += 1
    info = {"name": "synthetic", "metric": "test.loss", "direction": "minimize", "baseline": "vanilla",
            "variants": listed, "task": "toy", "params": PARAMS}
    return info, pd.DataFrame(rows), pd.DataFrame(curve_rows)


def md_tables(md: str) -> list[list[list[str]]]:
    """Every Markdown table as rows of cells (header first, alignment row dropped)."""
    tables, cur = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                cur.append(cells)
        elif cur:
            tables.append(cur)
            cur = []
    return tables


def section(md: str, heading: str) -> str:
    start = md.index(heading)
    end = md.find("\n## ", start + 1)
    return md[start:end if end > 0 else None]


def row(table: list[list[str]], first: str) -> dict[str, str]:
    (match,) = [r for r in table[1:] if r[0] == first]
    return dict(zip(table[0], match))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "nested" / "out"  # created by build_report
    info, trials, curves = make_study()
    path = build_report(out, info, trials, curves)
    return path, trials


def test_files(report):
    path, trials = report
    out = path.parent
    assert path.name == "report.md"
    for name in ["report.md", "report.html", "trials.csv"] + FIGURES:
        assert (out / name).is_file(), name
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name
    md = path.read_text()
    for name in FIGURES:
        assert f"]({name})" in md
    back = pd.read_csv(out / "trials.csv")
    assert len(back) == len(trials)
    assert list(back.columns) == list(trials.columns)


def test_summary_and_variants(report):
    md = report[0].read_text()
    for variant in ("vanilla", "NFG", "CIFG"):
        assert variant in md
    assert "39 trials (36 complete, 1 failed, 1 diverged, 1 running)" in md
    variants = md_tables(section(md, "## Variants"))[0]
    assert row(variants, "vanilla (baseline)")["failed"] == "1"
    nfg = row(variants, "NFG")
    assert nfg["complete"] == "12"
    assert nfg["top 10% mean"].endswith("(n=2)")  # ceil(12 / 10) = 2
    assert float(nfg["mean"]) > float(row(variants, "CIFG")["mean"]) + 0.5


def test_welch(report):
    md = report[0].read_text()
    all_trials, top = md_tables(section(md, "## Welch"))
    nfg = row(all_trials, "NFG")
    assert nfg["result"] == "worse *"
    assert float(nfg["p-value"]) < 0.05
    assert float(nfg["difference"]) > 0.5
    assert row(all_trials, "CIFG")["result"] == "n.s."
    assert set(row(top, "NFG")) == set(top[0])


def test_report_json_holds_the_numbers_the_tables_show(report):
    import json

    md = report[0].read_text()
    data = json.loads((report[0].parent / "report.json").read_text())
    assert data["baseline"] == "vanilla" and data["trials"] == 39
    all_trials, _ = md_tables(section(md, "## Welch"))
    for name, v in data["variants"].items():
        if name == "vanilla":
            assert v["p_value"] is None
            continue
        r = row(all_trials, display_name(name))
        assert r["result"] == v["result"] and r["p-value"] == fmt_p(v["p_value"])
    variants = md_tables(section(md, "## Variants"))[0]
    assert fmt(data["variants"]["NFG"]["best"]) == row(variants, "NFG")["best"]
    (table,) = md_tables(section(md, "## Hyperparameter importance"))
    assert {r[0]: r[1] for r in table[1:]} == {k: fmt(v) for k, v in data["importance"].items()}


def test_fanova_ranks_learning_rate_first(report):
    md = report[0].read_text()
    (table,) = md_tables(section(md, "## Hyperparameter importance"))
    assert table[0] == ["hyperparameter", "all", "vanilla", "NFG", "CIFG"]
    names = [r[0] for r in table[1:]]
    assert set(names) == {"learning_rate", "hidden_size", "1 - momentum", "variant"}
    overall = {r[0]: float(r[1]) for r in table[1:]}
    assert max(overall, key=overall.get) == "learning_rate"
    assert names[0] == "learning_rate"  # sorted by overall importance
    assert math.isclose(sum(overall.values()), 1.0, abs_tol=2e-3)
    for column in range(2, 5):  # per variant: the learning rate dominates too; no variant row
        per = {r[0]: float(r[column]) for r in table[1:] if r[0] != "variant"}
        assert max(per, key=per.get) == "learning_rate"
        assert row(table, "variant")[table[0][column]] == "–"


def bullet(md: str, start: str) -> str:
    (line,) = [ln for ln in md.splitlines() if ln.startswith(f"- *{start}")]
    return line


def test_odyssey_section(report):
    md = report[0].read_text()
    assert md.index("## Hyperparameter importance") < md.index("## Beside the Odyssey's findings") \
        < md.index("## Metric against each hyperparameter")
    sec = section(md, "## Beside the Odyssey's findings")
    assert "36 complete trials over 3 variants on toy" in sec
    # the verdicts follow the Welch table: NFG worse *, CIFG n.s., nothing better
    welch = md_tables(section(md, "## Welch"))[0]
    nfg = row(welch, "NFG")
    assert bullet(sec, "NFG significantly worse").endswith(
        f"mean {nfg['mean']} vs {nfg['baseline mean']} (vanilla), difference {nfg['difference']}, "
        f"p = {nfg['p-value']} (worse *): **agrees**.")
    cifg = bullet(sec, "CIFG not significantly worse")
    assert cifg.endswith(f"p = {row(welch, 'CIFG')['p-value']} (n.s.): **agrees**.")
    assert bullet(sec, "No variant significantly better").endswith("none of the 2 tested variants is significantly "
                                                                   "better than vanilla: **agrees**.")
    assert bullet(sec, "NOAF significantly worse").endswith("not in this study.")
    # ... and the ranks follow the fANOVA table (hyperparameters only, the variant left out)
    (imp,) = md_tables(section(md, "## Hyperparameter importance"))
    ranked = [r[0] for r in sorted(imp[1:], key=lambda r: -float(r[1])) if r[0] != "variant"]
    for name, want, start in (("learning_rate", 1, "The learning rate"), ("hidden_size", 2, "The hidden size")):
        rank = ranked.index(name) + 1
        verdict = "**agrees**" if rank == want else "**differs**"
        line = bullet(sec, start)
        assert f"ranks {rank} of 3 hyperparameters" in line and line.endswith(f": {verdict}.")
    assert f"{float(row(imp, 'learning_rate')['all']):.0%} of the variance" in bullet(sec, "The learning rate")
    # size and cost from the trials table: 12 a variant; wall_seconds 1.0 each
    assert "here 12 complete trials per variant (36 over 3 variants)" in bullet(sec, "Size")
    assert "1,800 x 1 s = 30 min on one worker" in bullet(sec, "Cost") and "30 min / N" in bullet(sec, "Cost")
    assert "JSB" not in sec.split("\n\n", 2)[2]  # no JSB panel for another task (the intro names the dataset)
    assert "Beside the Odyssey&#x27;s findings" in (report[0].parent / "report.html").read_text()


def test_odyssey_comparison_states_where_the_study_differs():
    # Known Welch outcomes: NFG = vanilla + 0.001 (n.s.), CIFG = vanilla - 1 (better *), NP = vanilla + 1
    # (worse *); on the music task (JSB Chorales): vanilla's and NFG's best 10% in 8.4-8.8, CIFG's below, NP's above.
    base = 8.5 + 0.1 * np.linspace(-1, 1, 20)
    values = {"vanilla": base, "NFG": base + 0.001, "CIFG": base - 1.0, "NP": base + 1.0}
    t0 = pd.Timestamp("2025-01-01 12:00:00")
    trials = pd.DataFrame([{"number": i, "variant": v, "status": "complete", "value": x, "population": 2,
                            "started": t0, "finished": t0 + pd.Timedelta(seconds=600), **{c: 0.01 for c in PARAMS}}
                           for i, (v, x) in enumerate((v, x) for v, xs in values.items() for x in xs)])
    info = {"name": "music", "task": "music", "metric": "test.loss", "direction": "minimize", "baseline": "vanilla",
            "variants": list(values), "params": PARAMS}
    st = data.from_frames(info, trials)
    welch = stats.welch_vs_baseline(st.values, st.baseline, direction=st.direction)
    assert list(welch["result"]) == ["n.s.", "better *", "worse *"]
    md = to_markdown(odyssey_comparison(st, welch, None))
    assert bullet(md, "No variant significantly better").endswith(": **differs**.") and "CIFG (difference -1," in md
    assert bullet(md, "NFG significantly worse").endswith("(n.s.): **differs**.")
    assert bullet(md, "CIFG not significantly worse").endswith("(better *): **agrees**.")
    assert bullet(md, "NP not significantly worse").endswith("(worse *): **differs**.")
    assert bullet(md, "The learning rate").endswith("fANOVA did not run: not testable here.")
    (table,) = md_tables(md)
    assert [row(table, v)["verdict"] for v in values] == ["agrees", "agrees", "differs (below)", "differs (above)"]
    assert row(table, "vanilla")["best 10% (n)"] == "2" and row(table, "vanilla")["best 10%: mean"] == fmt(8.405)
    assert "read off the figure" in bullet(md, "JSB Chorales") and bullet(md, "JSB Chorales").endswith("**differs**.")
    assert "20 complete trials per variant" in bullet(md, "Size")
    # 600 s for a population of 2: 300 s a trial; 1,800 of them 540,000 s
    assert "is 5 min (80 trials; a population" in bullet(md, "Cost") and "= 6.25 days" in bullet(md, "Cost")
    assert "JSB" not in to_markdown(odyssey_comparison(st, welch, None, dataset=None)).split("\n\n", 1)[1]
    with pytest.raises(ValueError, match="dataset"):
        odyssey_comparison(st, welch, None, dataset="timit")


def test_notebook_03_shows_the_same_comparison():
    """Notebook 03 calls odyssey_comparison rather than drawing its own conclusions (test_study_analysis runs it
    and compares its Markdown with the report's section)."""
    import json
    import pathlib

    nb = json.loads((pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "03_odyssey_study.ipynb").read_text())
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "odyssey_comparison(st, welch, imp)" in code
    assert "agrees" not in code and "differs" not in code


def test_html_has_the_same_content(report):
    path = report[0]
    md, page = path.read_text(), (path.parent / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    p_nfg = row(md_tables(section(md, "## Welch"))[0], "NFG")["p-value"]
    assert p_nfg in page
    for table in md_tables(md):
        for cells in table:
            for cell in cells:
                assert html.escape(cell.replace("\\|", "|")) in page, cell
    # one shareable file: every figure embedded as a data URI (the PNG's own bytes), none by relative path;
    # trials.csv linked
    srcs = re.findall(r'<img src="([^"]*)"', page)
    assert len(srcs) == len(FIGURES) and all(s.startswith("data:image/png;base64,") for s in srcs), [s[:40] for s in srcs]
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in srcs}
    assert embedded == {(path.parent / name).read_bytes() for name in FIGURES}
    assert '<a href="trials.csv">trials.csv</a>' in page and "[trials.csv](trials.csv)" in md


def test_small_and_degenerate_studies(tmp_path):
    # NIG: one complete trial; PNG: listed but never run; no curves; only 3 complete trials carry every
    # hyperparameter (too few for fANOVA).
    info, trials, _ = make_study(variants=("vanilla", "NFG", "NIG"), n_per=4,
                                 listed=["vanilla", "NFG", "NIG", "PNG"])
    trials = trials[~((trials["variant"] == "NIG") & (trials["number"] % 4 != 0))].copy()
    complete = trials.index[trials["status"] == "complete"]
    trials.loc[complete[3:], "optim.learning_rate"] = np.nan
    path = build_report(tmp_path / "small", info, trials, pd.DataFrame())
    md = path.read_text()
    all_trials, _ = md_tables(section(md, "## Welch"))
    assert row(all_trials, "NIG")["result"] == "n/a (n < 2)"
    assert row(all_trials, "PNG")["n"] == "0"
    assert "nan" not in md.lower()
    assert "No learning curves" in md and not (path.parent / "curves.png").exists()
    assert "fANOVA needs at least" in section(md, "## Hyperparameter importance")

    # Every value equal: no variance anywhere, and nothing crashes.
    info, trials, curves = make_study(n_per=3, constant=2.0)
    md = build_report(tmp_path / "flat", info, trials, curves).read_text()
    assert row(md_tables(section(md, "## Welch"))[0], "NFG")["result"] == "n/a (no variance)"
    assert "same test.loss" in section(md, "## Hyperparameter importance")


def test_no_completed_trials(tmp_path):
    info, trials, curves = make_study(n_per=2)
    trials["status"] = "failed"
    with pytest.raises(ValueError, match="no completed trials"):
        build_report(tmp_path / "none", info, trials, curves)
    trials["status"] = "complete"
    trials["value"] = np.nan
    with pytest.raises(ValueError, match="no completed trials"):
        build_report(tmp_path / "none", info, trials, curves)
    assert not (tmp_path / "none").exists()


def test_formatting():
    assert display_name("optim.learning_rate") == "learning_rate"
    assert display_name("1-optim.momentum") == "1 - momentum"
    assert fmt_p(3.21e-5) == "3.2e-05"
    assert fmt_p(0.04567) == "0.0457"
    assert fmt(1234.5678) == "1235" and fmt(0.000123456) == "0.0001235" and fmt(np.int64(7)) == "7"
    assert fmt(float("nan")) == "–"


def test_stats_are_tables_in_tables_out():
    # top 10%: ceil(n / 10) exactly (0.1 * 30 is 3.0000000000000004 in floating point), at least one, best first
    assert len(stats.top_fraction(np.arange(30.0))) == 3 and len(stats.top_fraction(np.arange(31.0))) == 4
    assert list(stats.top_fraction([3.0, 1.0, 2.0])) == [1.0]
    assert list(stats.top_fraction([3.0, 1.0, 2.0], "maximize")) == [3.0]
    assert len(stats.top_fraction([])) == 0
    info, trials, _ = make_study()
    done = trials[trials["status"] == "complete"]
    values = {v: done.loc[done["variant"] == v, "value"].to_numpy() for v in ("vanilla", "NFG", "CIFG")}
    w = stats.welch_vs_baseline(values, "vanilla")
    assert list(w.index) == ["NFG", "CIFG"] and w.loc["NFG", "result"] == "worse *" and w.loc["NFG", "p_value"] < 0.05
    assert w.loc["NFG", "ci_low"] < w.loc["NFG", "difference"] < w.loc["NFG", "ci_high"]
    one = stats.welch_vs_baseline({**values, "NFG": values["NFG"][:1]}, "vanilla")
    assert one.loc["NFG", "result"] == "n/a (n < 2)"
    imp = stats.fanova_importance(trials, PARAMS, variants=info["variants"], metric="test.loss")
    assert imp.index.name == "hyperparameter" and list(imp.columns) == ["all", "vanilla", "NFG", "CIFG"]
    assert imp.index[0] == "optim.learning_rate" and math.isclose(imp["all"].sum(), 1.0, abs_tol=2e-3)
    assert np.isnan(imp.loc["variant", "NFG"]) and imp.attrs["notes"] == []
    # the same table whatever other columns or rows come along (failed, running: left out)
    again = stats.fanova_importance(done[["variant", "value", *PARAMS]], PARAMS, variants=info["variants"])
    pd.testing.assert_frame_equal(imp, again)
