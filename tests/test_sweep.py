"""Sweeps: study files, the plan, the database, resume after SIGKILL, workers, populations, status, report."""

from __future__ import annotations

import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lstm_lab import sweep
from lstm_lab.sweep import storage as db
from lstm_lab.sweep.results import format_status
from lstm_lab.sweep.study import prepare_study
from lstm_lab.sweep import Choice, LogUniform, OneMinusLogUniform, Study, StudyError, Uniform

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = {"task.name": "copy", "task.options": {"T": 2}, "model.hidden_size": 8, "optim.name": "sgd",
        "train.batch_size": 8, "train.steps": 20, "train.eval_every": 10, "train.log_every": 5,
        "train.eval_batch_size": 100, "train.keep_checkpoints": 1}


def write_study(path: pathlib.Path, **kw) -> pathlib.Path:
    args = dict(name="tiny", base=TINY, variants=("vanilla", "nfg"),
                space={"optim.learning_rate": "LogUniform(1e-2, 1e-1)",
                       "optim.momentum": "OneMinusLogUniform(0.05, 1)"},
                trials_per_variant=2)
    args.update(kw)
    space = "{" + ", ".join(f"{k!r}: {v}" for k, v in args.pop("space").items()) + "}"
    body = ", ".join(f"{k}={v!r}" for k, v in args.items())
    path.write_text(textwrap.dedent(f"""\
        from lstm_lab.sweep import *
        study = Study({body}, space={space})
        """))
    return path


def sigint_default():
    """A child's SIGINT as a terminal's (a CI runner may start the tests with SIGINT ignored, which children inherit
    and Python then leaves ignored: the Ctrl-C tests would send a signal nobody hears)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(*args, env=None, check=True):
    e = {**os.environ, **(env or {})}
    out = subprocess.run([sys.executable, "-m", "lstm_lab.cli", *map(str, args)], capture_output=True, text=True,
                         env=e, cwd=ROOT, preexec_fn=sigint_default)
    if check and out.returncode != 0:
        raise AssertionError(f"lstm-lab {' '.join(map(str, args))} exited {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def slot_outcomes(study_dir):
    """slot -> the statuses of its attempts, in trial order."""
    df = sweep.trials(study_dir, all_attempts=True)
    out: dict = {}
    for r in df.itertuples():
        out.setdefault(r.slot, []).append(r.status)
    return out


# ---------------------------------------------------------------------------
# Study files and the plan
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kw, needle", [
    (dict(variants=("vanilla", "nfgg")), "nfgg"),
    (dict(space={"optim.learning_rate": LogUniform(1e-1, 1e-2)}), "low < high"),
    (dict(space={"optim.learning_rate": Uniform(0.5, 0.5)}), "low=0.5, high=0.5"),
    (dict(space={"optim.learnin_rate": LogUniform(1e-3, 1e-2)}), "optim.learning_rate"),
    (dict(baseline="lstm"), "baseline 'lstm'"),
    (dict(search="bayes"), "search 'bayes'"),
    (dict(metric="loss"), "metric"),
    (dict(space={"optim.momentum": OneMinusLogUniform(0.01, 2.0)}), "high <= 1"),
    (dict(trials_per_variant=0), "trials_per_variant"),
])
def test_bad_study_is_a_clear_error(kw, needle):
    with pytest.raises(StudyError, match=None) as e:
        Study(**{"name": "x", "base": TINY, "variants": ("vanilla", "nfg"), **kw})
    assert needle in str(e.value)


def test_random_plan_is_deterministic_and_in_range():
    s = Study(name="p", base=TINY, variants=sweep.ODYSSEY_VARIANTS, space=sweep.ODYSSEY_SPACE, trials_per_variant=50,
              seeds=2)
    plan = s.plan()
    assert plan == s.plan() and len(plan) == 9 * 50 * 2 and len({p["slot"] for p in plan}) == len(plan)
    lr = np.array([p["params"]["optim.learning_rate"] for p in plan])
    hid = np.array([p["params"]["model.hidden_size"] for p in plan])
    mom = np.array([s.hyper_from_params(p["params"])["optim.momentum"] for p in plan])
    assert lr.min() >= 1e-6 and lr.max() <= 1e-2 and hid.min() >= 20 and hid.max() <= 200
    assert 0.0 <= mom.min() and mom.max() <= 0.99 + 1e-12 and np.median(mom) > 0.8  # 1 - log-uniform: dense near 1
    # log-uniform: about half the draws below the geometric midpoint
    assert 0.35 < np.mean(lr < 1e-4) < 0.65
    # a sample's seeds share hyperparameters; the seeds differ
    a, b = plan[0], plan[1]
    assert a["params"] == b["params"] and a["seed"] != b["seed"]


def test_grid_plan_covers_the_grid():
    s = Study(name="g", base=TINY, variants=("vanilla",), search="grid", grid_points=3,
              space={"optim.learning_rate": LogUniform(1e-3, 1e-1), "model.hidden_size": Choice(8, 16)})
    plan = s.plan()
    got = sorted((round(p["params"]["optim.learning_rate"], 8), p["params"]["model.hidden_size"]) for p in plan)
    assert got == sorted((lr, h) for lr in (1e-3, 1e-2, 1e-1) for h in (8, 16))


def test_study_file_relative_base(tmp_path):
    (tmp_path / "exp.py").write_text("overrides = {'task.name': 'adding', 'model.hidden_size': 12}\n")
    write_study(tmp_path / "s.py", base="exp.py")
    s = sweep.load_study(tmp_path / "s.py")
    assert s.base_config().model.hidden_size == 12 and s.base_config().task.name == "adding"
    assert s.config_for("nfg", {"optim.learning_rate": 0.05}, 3).train.seed == 3


# ---------------------------------------------------------------------------
# Storage and study directories
# ---------------------------------------------------------------------------
@pytest.mark.integration  # lstm-lab processes
def test_unreachable_storage_writes_nothing(tmp_path):
    study = sweep.load_study(write_study(tmp_path / "s.py"))
    for url in (f"sqlite:///{tmp_path}/no/such/dir/x.db", "nosuchdialect://x/y"):
        with pytest.raises(db.StorageError, match="storage"):
            prepare_study(study, tmp_path / "st", storage=url)
        assert not (tmp_path / "st").exists()
    out = cli("sweep", tmp_path / "s.py", "--dir", tmp_path / "st", "--storage", "nosuchdialect://x", check=False)
    assert out.returncode == 2 and "nosuchdialect" in out.stderr and not (tmp_path / "st").exists()


def test_different_study_in_dir_is_refused(tmp_path):
    a = sweep.load_study(write_study(tmp_path / "a.py"))
    b = sweep.load_study(write_study(tmp_path / "b.py", trials_per_variant=3))
    prepare_study(a, tmp_path / "st", log=lambda m: None)
    with pytest.raises(db.StudyConflictError, match="trials_per_variant"):
        prepare_study(b, tmp_path / "st", log=lambda m: None)
    prepare_study(b, tmp_path / "st", force=True, log=lambda m: None)
    assert sweep.status(tmp_path / "st")["planned"] == 6
    assert list(tmp_path.glob("st.replaced-*"))  # the old one moved aside, not deleted


@pytest.mark.integration  # lstm-lab processes
def test_report_without_completed_trials_fails(tmp_path):
    study = sweep.load_study(write_study(tmp_path / "s.py"))
    prepare_study(study, tmp_path / "st", log=lambda m: None)
    st = sweep.status(tmp_path / "st")
    assert st["planned"] == 4 and st["waiting"] == 4 and st["complete"] == 0
    out = cli("report", tmp_path / "st", check=False)
    assert out.returncode == 2 and "no completed trials" in out.stderr
    js = json.loads(cli("status", tmp_path / "st", "--json").stdout)
    assert js["planned"] == 4 and js["waiting"] == 4 and js["complete"] == 0 and js["failed"] == 0
    assert set(js["variants"]) == {"vanilla", "nfg"} and js["variants"]["nfg"]["planned"] == 2


# ---------------------------------------------------------------------------
# Running: SIGKILL + resume, failures, workers and populations
# ---------------------------------------------------------------------------
@pytest.mark.integration  # lstm-lab processes
def test_sigkill_mid_sweep_then_rerun_completes_each_trial_once(tmp_path):
    f = write_study(tmp_path / "s.py")
    sd = tmp_path / "st"
    # the worker SIGKILLs itself at step 15 of its 2nd trial (checkpoint at step 10)
    out = cli("sweep", f, "--dir", sd, "--no-report", env={"LSTM_LAB_DEBUG_SIGKILL_TRIAL": "1:15"}, check=False)
    assert out.returncode == -9, out.stderr
    st = sweep.status(sd)
    # the killed worker's trial is still RUNNING in the database, but its pid is gone: shown as dead, not running
    assert st["complete"] == 1 and st["running"] == 0 and st["dead"] == 1, st
    assert [d["slot"] for d in st["dead_trials"]] == ["vanilla/0001"] and "is gone" in st["dead_trials"][0]["why"]
    assert st["eta_seconds"] is not None
    shown = cli("status", sd).stdout
    assert "vanilla/0001: running (worker dead): worker pid" in shown and " dead " in shown.splitlines()[1], shown
    out = cli("sweep", f, "--dir", sd, "--no-report")
    assert "vanilla/0001): its worker (pid" in out.stderr and "died; enqueued again" in out.stderr
    outcomes = slot_outcomes(sd)
    assert len(outcomes) == 4
    assert all(v.count("complete") == 1 for v in outcomes.values()), outcomes
    retried = [v for v in outcomes.values() if len(v) > 1]
    assert retried == [["interrupted", "complete"]]
    df = sweep.trials(sd)
    killed = df[df["retry_of"].notna()].iloc[0]
    # the retry resumed from the checkpoint of the killed attempt
    metrics = (pathlib.Path(killed.workdir) / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in metrics if json.loads(x)["kind"] == "valid"]
    assert steps == [10, 20], steps  # 10 before the kill, 20 after resuming at 10: no step evaluated twice
    # a third run has nothing left to do
    st = sweep.run(f, sd, population=2, log=lambda m: None)
    assert len(sweep.trials(sd, all_attempts=True)) == 5
    assert st["planned"] == 4 and st["complete"] == 4 and st["failed"] == 0 and st["done"] == 4
    assert st["variants"]["nfg"]["complete"] == 2 and st["variants"]["vanilla"]["planned"] == 2


@pytest.mark.integration  # lstm-lab processes
def test_sigkill_of_a_population_sweep_resumes_it_bitwise(tmp_path):
    """A population of 2 trials SIGKILLed at step 15 (checkpoints at 10) is retried from its members' step-10
    checkpoints and ends with bitwise the results of a sweep that was never killed."""
    f = write_study(tmp_path / "s.py", variants=("vanilla",))
    cli("sweep", f, "--dir", tmp_path / "a", "--no-report", "--population", "2")
    out = cli("sweep", f, "--dir", tmp_path / "b", "--no-report", "--population", "2",
              env={"LSTM_LAB_DEBUG_SIGKILL_TRIAL": "0:15"}, check=False)
    assert out.returncode == -9, out.stderr
    cli("sweep", f, "--dir", tmp_path / "b", "--no-report", "--population", "2")
    assert all(v[-1] == "complete" and len(v) == 2 for v in slot_outcomes(tmp_path / "b").values())
    a, b = (sweep.trials(tmp_path / d).set_index("slot").sort_index() for d in ("a", "b"))
    assert list(a.index) == list(b.index) == ["vanilla/0000", "vanilla/0001"]
    assert list(a["value"]) == list(b["value"])  # bitwise
    for wd in b["workdir"]:
        valid = [json.loads(x)["step"] for x in (pathlib.Path(wd) / "metrics.jsonl").read_text().splitlines()
                 if json.loads(x)["kind"] == "valid"]
        assert valid == [10, 20], valid  # resumed at 10: no step evaluated twice


@pytest.mark.integration  # lstm-lab processes
def test_workers_populations_failures_and_report(tmp_path):
    # lr 1e38 without clipping diverges; a task that is not registered raises when the trial starts (a valid
    # config: the study accepts it): each is recorded, the sweep goes on; the two learning rates of one
    # (variant, task) train as a population of 2
    f = write_study(tmp_path / "s.py", search="grid", overrides={"optim.clip_norm": 0.0},
                    space={"optim.learning_rate": "Choice(0.05, 1e38)", "task.name": "Choice('copy', 'nosuchtask')"})
    sd = tmp_path / "st"
    out = cli("sweep", f, "--dir", sd, "--workers", "2", "--population", "2", check=False)
    assert out.returncode == 0, out.stderr
    # the workers' lines come through the sweep, one per trial (no trial is taken by both workers)
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("trial ")]
    assert len(lines) == 8 and len({ln.split(":")[0] for ln in lines}) == 8, out.stderr
    df = sweep.trials(sd)
    assert len(df) == 8 and df["slot"].is_unique
    assert (sweep.trials(sd, all_attempts=True)["status"] != "interrupted").all()
    rows = df.to_dict("records")
    for r in rows:
        if r["task.name"] == "nosuchtask":
            assert r["status"] == "failed" and "nosuchtask" in r["error"], r
        elif r["optim.learning_rate"] == 1e38:
            assert r["status"] == "diverged", r
        else:
            assert r["status"] == "complete" and math.isfinite(r["value"]), r
            assert r["population"] == 2
    report = sd / "report"
    for name in ("report.md", "report.html", "trials.csv", "distributions.png", "curves.png"):
        assert (report / name).exists() and (report / name).stat().st_size > 0, name
    md = (report / "report.md").read_text()
    assert "nfg" in md and "vanilla" in md and "Welch" in md
    curves = sweep.curves(sd)
    assert set(curves["split"]) == {"train", "valid"}
    assert set(curves["number"]) == set(df[df.status == "complete"]["number"])  # diverged ones stopped before a log
    st = sweep.status(sd)
    assert (st["planned"], st["complete"], st["failed"], st["diverged"], st["done"]) == (8, 2, 6, 2, 8)
    assert st["variants"]["nfg"] == {**st["variants"]["nfg"], "planned": 4, "complete": 1, "failed": 3, "diverged": 1}
    assert "(diverged)" in format_status(st)


@pytest.mark.integration  # end to end: whole runs or sweeps
def test_tpe_search_in_process_and_dataframe(tmp_path):
    f = write_study(tmp_path / "s.py", variants=("vanilla",), baseline="vanilla", trials_per_variant=3,
                    search="tpe", base={**TINY, "train.steps": 10, "train.eval_every": 5},
                    space={"optim.learning_rate": "LogUniform(1e-2, 1e-1)", "model.hidden_size": "Choice(4, 8)",
                           "optim.momentum": "OneMinusLogUniform(0.05, 1)"})
    st = sweep.run(f, tmp_path / "st", population=2, log=lambda m: None)
    assert st["complete"] == 3 and st["planned"] == 3
    df = sweep.trials(tmp_path / "st")
    assert {"optim.learning_rate", "model.hidden_size", "optim.momentum", "test.loss", "valid.loss"} <= set(df.columns)
    assert df["optim.learning_rate"].between(1e-2, 1e-1).all() and df["optim.momentum"].between(0, 0.95).all()
    assert set(df["model.hidden_size"]) <= {4, 8}
    assert (df["value"] == df["test.loss"]).all()
    ostudy = db.open_study(tmp_path / "st")
    t = ostudy.trials[0]
    assert set(t.params) == {"variant", "optim.learning_rate", "model.hidden_size", "1-optim.momentum"}
    assert list(t.intermediate_values) == [5, 10]  # the validation curve
    cfg = json.loads((pathlib.Path(df.workdir[0]) / "config.json").read_text())["config"]
    assert math.isclose(cfg["optim"]["momentum"], df["optim.momentum"][0])


def test_database_retries_transient_errors_only(monkeypatch):
    import optuna
    import sqlalchemy.exc as se

    monkeypatch.setattr(db.time, "sleep", lambda s: None)
    lost = se.OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
    calls, logs = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise optuna.exceptions.StorageInternalError("x") from lost
        return "ok"

    assert db.retrying(flaky, "testing", logs.append) == "ok" and len(calls) == 3
    assert "database unreachable while testing (server closed the connection unexpectedly)" in logs[0]
    assert logs[-1] == "database reachable again (testing)"

    def bad_statement():
        raise optuna.exceptions.StorageInternalError("x") from se.IntegrityError("INSERT", {}, Exception("dup"))

    with pytest.raises(optuna.exceptions.StorageInternalError):  # not retried: not a connection problem
        db.retrying(bad_statement, "testing", logs.append)

    monkeypatch.setenv("LSTM_LAB_DB_RETRY_SECONDS", "0.01")
    t = iter(range(1000))
    monkeypatch.setattr(db.time, "monotonic", lambda: float(next(t)))
    with pytest.raises(db.StorageError, match="stayed unreachable for 0 s while testing"):
        db.retrying(lambda: (_ for _ in ()).throw(lost), "testing", logs.append)
    monkeypatch.setenv("LSTM_LAB_DB_RETRY_SECONDS", "soon")
    with pytest.raises(StudyError, match="LSTM_LAB_DB_RETRY_SECONDS='soon'"):
        db.retrying(flaky, "testing", logs.append)


def _imports(path: pathlib.Path) -> set[str]:
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_data_flows_from_training_to_sweep_to_analysis():
    pkg = ROOT / "lstm_lab"
    for path in sorted((pkg / "sweep").rglob("*.py")):
        assert not {m for m in _imports(path) if m.startswith("lstm_lab.analysis")}, path
    for path in sorted((pkg / "training").rglob("*.py")):
        assert not {m for m in _imports(path) if m.startswith("lstm_lab.sweep")}, path


@pytest.mark.integration  # a fresh interpreter
def test_sweep_and_analysis_imports_stay_light():
    code = ("import sys, lstm_lab.sweep, lstm_lab.sweep.worker, lstm_lab.sweep.results\n"
            "heavy = [m for m in ('optuna', 'pandas', 'matplotlib', 'scipy', 'sqlalchemy', 'lstm_lab.analysis') "
            "if m in sys.modules]\nassert not heavy, heavy\n"
            "import lstm_lab.analysis.report\n"
            "assert not [m for m in ('optuna', 'pandas', 'matplotlib', 'scipy') if m in sys.modules]\n"
            "from lstm_lab.sweep import *\n"
            "try:\n    lstm_lab.sweep.report\n"
            "except AttributeError as e:\n    assert 'lstm_lab.analysis.report' in str(e)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("population", [1, 2])
def test_worker_builds_each_trial_config_once(tmp_path, monkeypatch, population):
    from lstm_lab import training
    from lstm_lab.sweep.worker import run_worker

    study = sweep.load_study(write_study(tmp_path / "s.py", trials_per_variant=3))
    prepare_study(study, tmp_path / "st", log=lambda m: None)
    done = {"status": "complete", "valid": {"loss": 1.0}, "test": {"loss": 1.0}, "steps": 20, "wall_seconds": 0.1}
    monkeypatch.setattr(training, "train", lambda cfg, wd, **kw: dict(done))
    monkeypatch.setattr(training, "train_population", lambda cfgs, wds, **kw: [dict(done) for _ in cfgs])
    built, real = [], Study.config_for
    monkeypatch.setattr(Study, "config_for",
                        lambda self, v, hyper, seed: built.append((v, seed)) or real(self, v, hyper, seed))
    counts = run_worker(study, tmp_path / "st", population=population, progress=False, log=lambda m: None)
    assert counts == {"complete": 6}
    assert sorted(built) == sorted((p["variant"], p["seed"]) for p in study.plan()), built  # once each, seeded
