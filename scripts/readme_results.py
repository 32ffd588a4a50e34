"""Regenerate every result the README quotes, each with the command that made it and the machine.

    python scripts/readme_results.py                          # the fast sections: demo, quick, population
    python scripts/readme_results.py --sections copy20,char_lm   # the long training runs (minutes each)
    python scripts/readme_results.py --sections jsb           # JSB Chorales: LSTM/GRU/tanh RNN x 3 seeds
    python scripts/readme_results.py --sections suite         # CI on a clean clone of HEAD, then the quick loop
    python scripts/readme_results.py --check                  # only check README.md against docs/readme_results.md

Each section runs the command the README names, in a fresh temporary directory (a study starts from nothing),
reads the numbers from what the command wrote (the study's ``report/report.json``, a run's ``summary.json``
and ``metrics.jsonl``, a benchmark's JSON), and writes:

* ``docs/readme_results.json``: per section the command, the machine, the wall time and the numbers;
* ``docs/readme_results.md``: per section the paragraph the README quotes, between markers
  ``<!-- readme_results:NAME -->`` ... ``<!-- /readme_results:NAME -->``;
* ``docs/quick_study_distributions.png``: the quick study's distribution figure.

``--update-readme`` also replaces each regenerated section's block in ``README.md``. The test suite
(``tests/test_readme.py``) checks that every block in the README equals the one in ``docs/readme_results.md``,
so a number edited by hand, or code changed without re-running this script, shows there.

Re-run the sections whose code changed: the cells, the layer, training, the tasks, the study runner or the
report (quick), populations (population), the demo (demo), and ``suite`` after committing a change to the
tests or their dependencies.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULTS_JSON = DOCS / "readme_results.json"
RESULTS_MD = DOCS / "readme_results.md"
FAST = ("demo", "quick", "population")
LONG = ("copy20", "copy50", "copy100", "char_lm", "jsb", "forecast", "classify")
BLOCK = re.compile(r"<!-- readme_results:(\w+) -->\n(.*?)<!-- /readme_results:\1 -->", re.S)


# ---------------------------------------------------------------------------
# the machine
# ---------------------------------------------------------------------------
def machine() -> dict:
    """CPU model, cores, the vector extensions that decide XLA's and oneDNN's kernels, versions."""
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "flags": []}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        info["cpu"] = fields.get("Model name", info["cpu"]).strip()
        flags = set(fields.get("Flags", "").split())
        info["flags"] = sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "fma") if f in flags)
    except (OSError, subprocess.SubprocessError):
        pass
    import jax

    info.update(python=platform.python_version(), jax=jax.__version__)
    return info


def describe(m: dict) -> str:
    flags = "+".join(f for f in m["flags"] if f in ("avx2", "avx512f")) or "no AVX2"
    return f"{m['cpu']}, {m['cores']} cores ({flags}), jax {m['jax']}"


def run(cmd: list[str], cwd: pathlib.Path, log, env=None) -> tuple[float, subprocess.CompletedProcess]:
    log(f"$ {' '.join(cmd)}    (in {cwd})")
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"readme_results: {' '.join(cmd)} exited {out.returncode}\n{out.stdout[-3000:]}\n"
                         f"{out.stderr[-3000:]}")
    log(f"  {wall:.1f} s")
    return wall, out


def minutes(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s} s"


# ---------------------------------------------------------------------------
# sections: each returns (numbers, paragraph)
# ---------------------------------------------------------------------------
def section_demo(tmp: pathlib.Path, m: dict, log):
    cmd = ["lstm-lab", "demo"]
    wall, out = run(cmd, tmp, log)
    last = out.stdout.strip().splitlines()[-1]
    valid = float(last.split()[3])
    nums = {"wall_seconds": round(wall, 1), "valid_mse": valid, "closing_line": last}
    text = (f"`lstm-lab demo` is the smallest thing to try: one LSTM-32 on the adding problem (T = 30, 400 "
            f"steps), {minutes(wall)} for the whole command on {describe(m)}; it ends with the validation MSE "
            f"against the baseline (this run: {valid:.4f}, {100 * valid / (1 / 6):.1f}% of 0.167).\n")
    return nums, text


def section_quick(tmp: pathlib.Path, m: dict, log):
    study_dir = tmp / "studies" / "quick"
    cmd = ["lstm-lab", "sweep", str(ROOT / "experiments" / "quick.py"), "--dir", str(study_dir)]
    wall, _ = run(cmd, tmp, log)
    again, out2 = run(cmd, tmp, log)
    rep = json.loads((study_dir / "report" / "report.json").read_text())
    shutil.copyfile(study_dir / "report" / "distributions.png", DOCS / "quick_study_distributions.png")
    variants = rep["variants"]
    base = rep["baseline"]
    parts = []
    for name, v in variants.items():
        if name == base:
            continue
        p = v.get("p_value")
        sig = p is not None and p < 0.05
        verdict = (f"{'worse' if v['mean'] > variants[base]['mean'] else 'better'}, p = {p:.3f}" if sig
                   else (f"p = {p:.2f}" if p is not None else "no test"))
        parts.append((sig, f"{name.upper()} {v['best']:.2g} ({verdict})"))
    sig_parts = [t for s, t in parts if s]
    other = [t for s, t in parts if not s]
    imp = sorted(rep["importance"].items(), key=lambda kv: -kv[1])
    imp_text = ", ".join(f"{k} {v:.2f}" for k, v in imp)
    nothing = "nothing left to do" in (out2.stdout + out2.stderr)
    nums = {"wall_seconds": round(wall, 1), "rerun_seconds": round(again, 1), "rerun_nothing_left": nothing,
            "variants": variants, "importance": rep["importance"], "baseline": base, "trials": rep["trials"]}
    text = (f"**The quick study** (`lstm-lab sweep experiments/quick.py`, {rep['trials']} trials; "
            f"{minutes(wall)} for the whole command on {describe(m)}; run again, it has nothing left to do "
            f"({minutes(again)})): test MSE on the adding problem (T = 50, baseline 0.167), best of "
            f"{rep['per_variant']} trials per variant, and Welch's t-test of all {rep['per_variant']} against "
            f"{base}'s (p < 0.05 marked): {base} {variants[base]['best']:.2g}; "
            + ("; ".join(sig_parts) + "; " if sig_parts else "")
            + ", ".join(other) + " (not significant). "
            f"fANOVA importance: {imp_text}. Six trials per variant are far from the Odyssey's 200 — "
            f"`experiments/odyssey_copy.py` is that protocol.\n")
    return nums, text


def section_population(tmp: pathlib.Path, m: dict, log):
    out_json = tmp / "population.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "population_throughput.py"), "--population", "16",
           "--out", str(out_json)]
    wall, _ = run(cmd, tmp, log)
    row = json.loads(out_json.read_text())
    nums = {k: row[k] for k in ("sequential_trials_per_min", "population_trials_per_min", "speedup")}
    text = (f"**Population throughput** (`python benchmarks/population_throughput.py --population 16`, the quick "
            f"study's shape on the copy task: LSTM-32, batch 32, 300 steps, compilation and evaluation included, "
            f"{describe(m)}): sequential {row['sequential_trials_per_min']:.1f} trials/min, population of 16 "
            f"{row['population_trials_per_min']:.1f} trials/min, **{row['speedup']:.2f}x**.\n")
    return nums, text


def _train_section(tmp: pathlib.Path, m: dict, log, exp: str, sets: list[str]):
    """One `lstm-lab train` run: its summary and its validation curve (at most 10 columns)."""
    wd = tmp / "run"
    cmd = ["lstm-lab", "train", str(ROOT / "experiments" / exp), "--workdir", str(wd), "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    wall, _ = run(cmd, tmp, log)
    summary = json.loads((wd / "summary.json").read_text())
    records = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines() if line.strip()]
    valid = [r for r in records if r.get("kind") == "valid"]
    stride = -(-len(valid) // 10)
    shown_curve = [r for i, r in enumerate(valid) if (i + 1) % stride == 0 or i == len(valid) - 1]
    shown = " ".join(["lstm-lab train", f"experiments/{exp}"] + [f"--set {s}" for s in sets])
    nums = {"wall_seconds": round(wall, 1), "summary": summary, "valid_curve": valid}
    return wd, shown, wall, summary, shown_curve, nums


def _table(curve: list[dict], rows: dict) -> str:
    out = ["| step | " + " | ".join(str(r["step"]) for r in curve) + " |", "|---|" + "---|" * len(curve)]
    out += [f"| {label} | " + " | ".join(fmt(r) for r in curve) + " |" for label, fmt in rows.items()]
    return "\n".join(out) + "\n"


def _copy_section(tmp, m, log, T: int, sets: list[str]):
    wd, shown, wall, s, curve, nums = _train_section(tmp, m, log, "copy.py", sets)
    t, base = s["test"], s["baseline"]["loss"]
    text = (f"**Copy task, T = {T}** (`{shown}`, {describe(m)}): test cross-entropy {t['loss']:.4f} = "
            f"{100 * t['loss_over_baseline']:.1f}% of the memoryless baseline {base:.4f}, accuracy on the last 10 "
            f"steps {100 * t['accuracy_last10']:.1f}%, {s['steps']} steps in {minutes(s['wall_seconds'])} of "
            f"training ({minutes(wall)} for the whole command). Validation curve:\n\n"
            + _table(curve, {"CE / baseline": lambda r: f"{100 * r['loss_over_baseline']:.1f}%",
                             "accuracy last 10": lambda r: f"{100 * r['accuracy_last10']:.1f}%"}))
    return nums, text


def section_copy20(tmp, m, log):
    return _copy_section(tmp, m, log, 20, [])


def section_copy50(tmp, m, log):
    return _copy_section(tmp, m, log, 50, ["task.options.T=50", "model.chrono_init=70.0"])


def section_copy100(tmp, m, log):
    return _copy_section(tmp, m, log, 100, ["task.options.T=100", "model.chrono_init=120.0"])


def section_char_lm(tmp, m, log):
    wd, shown, wall, s, curve, nums = _train_section(tmp, m, log, "char_lm.py", [])
    sample_cmd = ["lstm-lab", "sample", str(wd), "--prompt", "ROMEO:", "--length", "240", "--temperature", "0.8"]
    _, out = run(sample_cmd, tmp, log)
    nums["sample"] = out.stdout
    v, t = s["valid"], s["test"]
    text = (f"**Character-level Tiny Shakespeare** (`{shown}`, {describe(m)}): validation {v['loss']:.4f} "
            f"nats/char ({v['bits_per_char']:.3f} bits/char), test (the file's last 5%) {t['loss']:.4f} nats/char, "
            f"{s['steps']} steps in {minutes(s['wall_seconds'])} of training ({minutes(wall)} for the whole "
            f"command{'; ' + s['reason'] if s.get('reason') else ''}). The unigram baseline is "
            f"{s['baseline']['loss']:.2f} nats/char. Validation loss (nats/char):\n\n"
            + _table(curve, {"valid": lambda r: f"{r['loss']:.3f}"})
            + "\n`lstm-lab sample runs/char_lm --prompt \"ROMEO:\" --length 240 --temperature 0.8`:\n\n```\n"
            + out.stdout.rstrip("\n") + "\n```\n")
    return nums, text




JSB_CELLS = (("lstm", 36, 8.67), ("gru", 46, 8.54), ("rnn", 100, 8.82))  # Chung et al. 2014's sizes and test NLL
JSB_SEEDS = (0, 1, 2)


def section_jsb(tmp, m, log):
    """experiments/jsb.py for the LSTM, the GRU and the tanh RNN at Chung et al.'s sizes, 3 seeds each."""
    rows, nums = [], {}
    for cell, hidden, published in JSB_CELLS:
        runs = []
        for seed in JSB_SEEDS:
            sets = [f"model.cell={cell}", f"model.hidden_size={hidden}", f"train.seed={seed}"]
            (tmp / f"{cell}-{seed}").mkdir()
            wd, shown, wall, s, _, _ = _train_section(tmp / f"{cell}-{seed}", m, log, "jsb.py", sets)
            runs.append({"seed": seed, "test_nll": s["test"]["loss"], "valid_nll": s["valid"]["loss"],
                         "steps": s["steps"], "best_step": s["best_step"], "train_seconds": s["wall_seconds"],
                         "parameters": s["parameters"]})
        test = [r["test_nll"] for r in runs]
        mean = sum(test) / len(test)
        nums[cell] = {"hidden_size": hidden, "runs": runs, "test_mean": mean, "published": published,
                      "command": "lstm-lab train experiments/jsb.py " + " ".join(f"--set {x}" for x in sets[:2])}
        rows.append(f"| {cell} | {hidden} | {runs[0]['parameters']:,} | {mean:.3f} ({min(test):.3f}-{max(test):.3f}) "
                    f"| {published:.2f} | {mean - published:+.3f} | "
                    f"{sum(r['train_seconds'] for r in runs) / len(runs):.0f} s |")
    text = (f"**JSB Chorales** (`lstm-lab train experiments/jsb.py --set model.cell=CELL --set "
            f"model.hidden_size=H --set train.seed=S`, seeds {', '.join(map(str, JSB_SEEDS))}; {describe(m)}): "
            f"test NLL per predicted step (nats), Adam, early stopping on the validation NLL; Chung et al. (2014) "
            f"trained with RMSProp and weight noise at about 20k parameters (the table counts ours, the "
            f"88-output layer included). The memoryless baseline (each key at its training frequency) scores "
            f"10.99 on valid.\n\n"
            "| cell | hidden | parameters | test NLL, mean (min-max of 3 seeds) | Chung et al. 2014 | "
            "difference | training time per run |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    near = [c for c, v in nums.items() if abs(v["test_mean"] - v["published"]) <= 0.15]
    far = [f"{c} ({nums[c]['test_mean'] - nums[c]['published']:+.3f})" for c in nums if c not in near]
    text += (f"\nWithin 0.15 of the published number: {', '.join(near) or 'none'}"
             + (f"; not: {', '.join(far)} (REFERENCES.md: Chung et al.'s LSTM and tanh RNN numbers are as commonly "
                f"quoted, not checked against the paper)" if far else "") + ".\n")
    return nums, text


FORECAST_CELLS = ("lstm", "gru", "vanilla")
SEEDS = (0, 1, 2)


def _three_seeds(tmp, m, log, exp: str, cell: str, metrics: tuple[str, ...]):
    """`lstm-lab train experiments/EXP --set model.cell=CELL --set train.seed=S` for the three seeds: the runs'
    test metrics, their mean, and the baseline the first run reported."""
    runs = []
    for seed in SEEDS:
        (tmp / f"{cell}-{seed}").mkdir()
        _, _, wall, s, _, _ = _train_section(tmp / f"{cell}-{seed}", m, log, exp,
                                             [f"model.cell={cell}", f"train.seed={seed}"])
        runs.append({"seed": seed, **{k: s["test"][k] for k in metrics}, "steps": s["steps"],
                     "best_step": s["best_step"], "train_seconds": s["wall_seconds"], "parameters": s["parameters"]})
    mean = {k: sum(r[k] for r in runs) / len(runs) for k in metrics}
    return runs, mean, s["baseline"]


def section_forecast(tmp, m, log):
    """experiments/forecast.py (CO2, 12 months ahead) for lstm, gru and vanilla, 3 seeds each, against the
    baselines on the same test windows."""
    keys = ("mae", "rmse", "mase", "smape")
    nums, rows = {}, []
    for cell in FORECAST_CELLS:
        runs, mean, base = _three_seeds(tmp, m, log, "forecast.py", cell, keys)
        nums[cell] = {"runs": runs, "test_mean": mean}
        lo, hi = min(r["mae"] for r in runs), max(r["mae"] for r in runs)
        rows.append(f"| {cell} (`--set model.cell={cell}`) | {mean['mae']:.3f} ({lo:.3f}-{hi:.3f}) | "
                    f"{mean['rmse']:.3f} | {mean['mase']:.3f} | {mean['smape']:.3f} |")
    nums["baselines"] = base
    for name, label in (("", "naive (last value)"), ("seasonal_naive_", "seasonal naive (12 months back)"),
                        ("linear_ar_", "linear AR of the same 36-month context (least squares)")):
        rows.append(f"| *{label}* | {base[name + 'mae']:.3f} | {base[name + 'rmse']:.3f} | {base[name + 'mase']:.3f} "
                    f"| {base[name + 'smape']:.3f} |")
    best_rnn = min(FORECAST_CELLS, key=lambda c: nums[c]["test_mean"]["mae"])
    beats = nums[best_rnn]["test_mean"]["mae"] < base["linear_ar_mae"]
    text = (f"**Forecasting** (`lstm-lab train experiments/forecast.py --set model.cell=CELL --set train.seed=S`, "
            f"seeds {', '.join(map(str, SEEDS))}; {describe(m)}): Mauna Loa CO2 (statsmodels' copy, monthly, "
            f"1958-2001), 12 months ahead from the last 36, hidden size 32, Adam, early stopping on the validation "
            f"loss; the test split starts 1995-06, so its 32 windows forecast 1998-06 .. 2001-12; MAE and RMSE in ppm; "
            f"mean (min-max) of the 3 seeds, and the baselines on the same windows:\n\n"
            "| model | MAE | RMSE | MASE | sMAPE % |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
            + ("Every recurrent model beats" if all(nums[c]["test_mean"]["mae"] < min(base["mae"],
                                                                                       base["seasonal_naive_mae"])
                                                    for c in FORECAST_CELLS) else "Not every recurrent model beats")
            + f" the naive and seasonal-naive forecasts; the best of them ({best_rnn}) "
            + ("also beats" if beats else "does **not** beat")
            + " the linear autoregressive model of the same context.\n")
    return nums, text


def section_classify(tmp, m, log):
    """experiments/classify.py (JapaneseVowels) for lstm, gru and vanilla, 3 seeds each, against the baselines."""
    keys = ("accuracy", "macro_f1")
    nums, rows = {}, []
    for cell in FORECAST_CELLS:
        runs, mean, base = _three_seeds(tmp, m, log, "classify.py", cell, keys)
        nums[cell] = {"runs": runs, "test_mean": mean}
        lo, hi = min(r["accuracy"] for r in runs), max(r["accuracy"] for r in runs)
        rows.append(f"| {cell} (`--set model.cell={cell}`) | {100 * mean['accuracy']:.1f}% ({100 * lo:.1f}-"
                    f"{100 * hi:.1f}) | {mean['macro_f1']:.3f} |")
    nums["baselines"] = base
    rows.append(f"| *majority class of train* | {100 * base['accuracy']:.1f}% (balanced "
                f"{100 * base['balanced_accuracy']:.1f}%) | {base['macro_f1']:.3f} |")
    rows.append(f"| *logistic regression on each coefficient's mean and std and the length* | "
                f"{100 * base['logreg_accuracy']:.1f}% | {base['logreg_macro_f1']:.3f} |")
    text = (f"**Sequence classification** (`lstm-lab train experiments/classify.py --set model.cell=CELL --set "
            f"train.seed=S`, seeds {', '.join(map(str, SEEDS))}; {describe(m)}): JapaneseVowels (UEA/UCR, sktime's "
            f"copy: 9 speakers, 12 coefficients, 7-29 frames; 216 train, 54 valid, 370 test), hidden size 32, "
            f"Adam, early stopping on the validation loss, the label from the last frame's logits; test accuracy, "
            f"mean (min-max) of the 3 seeds, and macro-F1, beside two baselines:\n\n"
            "| model | test accuracy | macro-F1 |\n|---|---|---|\n" + "\n".join(rows) + "\n")
    return nums, text


def _pytest_totals(text: str) -> dict:
    """Counts and seconds from pytest's last line, e.g. '== 380 passed, 5 skipped, 2 deselected in 512.3s =='."""
    line = [ln for ln in text.splitlines() if re.search(r" in [\d.]+s", ln) and "passed" in ln][-1]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", line)}
    counts["seconds"] = float(re.search(r" in ([\d.]+)s", line).group(1))
    if counts.get("failed") or counts.get("error") or counts.get("errors"):
        raise SystemExit(f"readme_results: the suite failed: {line}")
    return counts


def section_suite(tmp: pathlib.Path, m: dict, log):
    """CI as CI runs it: a clean clone of HEAD with ../shared beside it, `CI=true bash .ci/run` (a fresh virtual
    environment, PostgreSQL). Then the quick loop, `pytest -n auto -m "not integration"`, in this checkout."""
    clone = tmp / "main"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    (tmp / "shared").symlink_to(ROOT.parent / "shared")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True,
                            text=True).stdout.strip()
    wall, out = run(["bash", ".ci/run"], clone, log, env={**os.environ, "CI": "true"})
    full = _pytest_totals(out.stdout + out.stderr)
    qwall, qout = run([sys.executable, "-m", "pytest", "-n", "auto", "-m", "not integration", "-p",
                       "no:cacheprovider", "-q"], ROOT, log)
    quick = _pytest_totals(qout.stdout + qout.stderr)
    nums = {"commit": commit, "ci_run_seconds": round(wall, 1), "full": full, "quick": quick}
    text = (f"The suite (`git clone . /tmp/ci-check && cd /tmp/ci-check && CI=true bash .ci/run`, commit {commit}: "
            f"a fresh virtual environment, a PostgreSQL server, one pytest-xdist worker per core) on {describe(m)}: "
            f"{full['passed']} passed, {full.get('skipped', 0)} skipped (the `slow` test left out), "
            f"{minutes(full['seconds'])} of pytest, {minutes(wall)} for all of `.ci/run` with the install "
            f"from pip's cache. The quick loop `pytest -n auto -m \"not integration\"`: {quick['passed']} passed in "
            f"{minutes(quick['seconds'])}.\n")
    return nums, text


SECTIONS = {name: globals()[f"section_{name}"] for name in FAST + LONG + ("suite",)}


# ---------------------------------------------------------------------------
# README blocks
# ---------------------------------------------------------------------------
def blocks(text: str) -> dict[str, str]:
    return {name: body for name, body in BLOCK.findall(text)}


def render(name: str, body: str) -> str:
    return f"<!-- readme_results:{name} -->\n{body}<!-- /readme_results:{name} -->"


def update_readme(md: dict[str, str], names: list[str], log) -> None:
    """Replace the blocks ``names`` in README.md with ``md``'s (a block the README lacks is reported)."""
    readme = (ROOT / "README.md").read_text()
    for name in names:
        pat = re.compile(rf"<!-- readme_results:{name} -->\n.*?<!-- /readme_results:{name} -->", re.S)
        if pat.search(readme):
            readme = pat.sub(lambda _m: render(name, md[name]), readme)
        else:
            log(f"README.md has no block for {name}: add '<!-- readme_results:{name} -->' "
                f"'<!-- /readme_results:{name} -->' where it belongs, then --sync")
    (ROOT / "README.md").write_text(readme)


def check_readme() -> list[str]:
    """The README blocks that differ from (or are missing in) docs/readme_results.md."""
    want = blocks(RESULTS_MD.read_text()) if RESULTS_MD.exists() else {}
    have = blocks((ROOT / "README.md").read_text())
    return [name for name in sorted(set(want) | set(have)) if want.get(name) != have.get(name)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(FAST),
                    help=f"comma-separated, from {', '.join(SECTIONS)} (default: {','.join(FAST)}); 'all' for every one")
    ap.add_argument("--update-readme", action="store_true", help="replace the regenerated blocks in README.md")
    ap.add_argument("--check", action="store_true", help="only compare README.md with docs/readme_results.md")
    ap.add_argument("--sync", action="store_true",
                    help="run nothing: put every block of docs/readme_results.md into README.md where its markers are")
    a = ap.parse_args(argv)
    if a.check:
        bad = check_readme()
        print("README.md matches docs/readme_results.md" if not bad else f"README.md differs in: {', '.join(bad)}")
        return 1 if bad else 0
    if a.sync:
        md = blocks(RESULTS_MD.read_text()) if RESULTS_MD.exists() else {}
        update_readme(md, list(md), lambda msg: print(msg, file=sys.stderr))
        return 0
    names = list(SECTIONS) if a.sections == "all" else [s.strip() for s in a.sections.split(",") if s.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; expected some of {', '.join(SECTIONS)}")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    m = machine()
    log(f"machine: {describe(m)}; flags {' '.join(m['flags'])}")
    results = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    md = blocks(RESULTS_MD.read_text()) if RESULTS_MD.exists() else {}
    DOCS.mkdir(exist_ok=True)
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"readme_{name}_") as tmp:
            nums, text = SECTIONS[name](pathlib.Path(tmp), m, log)
        results[name] = {"machine": m, "date": datetime.date.today().isoformat(), **nums}
        md[name] = text
        print(f"\n[{name}] on {describe(m)}\n{text}")
        RESULTS_JSON.write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
        RESULTS_MD.write_text("# Results quoted by README.md\n\nWritten by `python scripts/readme_results.py`; "
                              "do not edit by hand.\n\n" + "\n\n".join(render(k, md[k]) for k in sorted(md)) + "\n")
    if a.update_readme:
        update_readme(md, names, log)
    bad = check_readme()
    if bad:
        log(f"README.md differs from docs/readme_results.md in: {', '.join(bad)} (--update-readme replaces them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
