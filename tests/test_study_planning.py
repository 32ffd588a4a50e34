"""Study directories and databases: planning once however many planners start together, a copied study
directory, an emptied database, secrets in storage URLs, study records rebuilt as data (never executed)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

from lstm_lab import sweep
from lstm_lab.cli import main
from lstm_lab.analysis.report import report
from lstm_lab.sweep import storage as db
from lstm_lab.sweep.study import PLAN_ATTR, _plan_digest, prepare_study
from lstm_lab.sweep.worker import run_worker

from test_sweep import ROOT, TINY, cli, write_study

# Planners that start at the same moment: each process imports everything, then for every round says it is
# ready and waits for the go file, so that both plan within a millisecond or two of each other.
PLANNER = textwrap.dedent("""\
    import dataclasses, pathlib, sys, time
    from lstm_lab import sweep
    from lstm_lab.sweep.study import prepare_study

    study_file, base, me, rounds, mode = sys.argv[1:6]
    storage = sys.argv[6] if len(sys.argv) > 6 else None
    base = pathlib.Path(base)
    study = sweep.load_study(study_file)
    for r in range(int(rounds)):
        (base / f"ready-{me}-{r}").touch()
        while not (base / f"go-{r}").exists():
            time.sleep(0.0005)
        sd = base / (f"round{r}" if mode == "same_dir" else f"round{r}-{me}")
        url = (storage or f"sqlite:///{base}/shared{r}.db") if mode == "shared_db" else None
        prepare_study(dataclasses.replace(study, name=f"{study.name}{r}"), sd, storage=url, log=lambda m: None)
    """)


def plan_at_once(study_file, base: pathlib.Path, rounds: int, mode: str, storage: str | None = None,
                 planners: int = 2) -> None:
    """``planners`` processes plan ``rounds`` times, each round at the same moment; all must exit 0."""
    import time

    base.mkdir(parents=True, exist_ok=True)
    script = base / "planner.py"
    script.write_text(PLANNER)
    args = [sys.executable, str(script), str(study_file), str(base), "", str(rounds), mode] + ([storage] if storage else [])
    procs = []
    for i in range(planners):
        a = list(args)
        a[4] = str(i)
        procs.append(subprocess.Popen(a, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 180
    for r in range(rounds):
        while not all((base / f"ready-{i}-{r}").exists() for i in range(planners)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                [p.communicate() for p in procs if p.poll() is not None]
            time.sleep(0.001)
        (base / f"go-{r}").touch()
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        assert "Traceback" not in err, err[-3000:]


def trial_slots(study_dir, storage=None) -> list[str]:
    return [t.user_attrs["slot"] for t in db.open_study(study_dir, storage).get_trials(deepcopy=False)]


# ---------------------------------------------------------------------------
# 1. Planning happens once
# ---------------------------------------------------------------------------
@pytest.mark.integration  # planner processes
def test_two_planners_at_once_plan_every_trial_once(tmp_path):
    f = write_study(tmp_path / "s.py", variants=("vanilla", "nfg", "nig"))  # 3 variants x 2 = 6 slots
    rounds = 5
    plan_at_once(f, tmp_path / "same", rounds, "same_dir")
    for r in range(rounds):
        slots = trial_slots(tmp_path / "same" / f"round{r}")
        assert len(slots) == 6 and len(set(slots)) == 6, (r, sorted(slots))
        assert db.open_study(tmp_path / "same" / f"round{r}").user_attrs[PLAN_ATTR]
    # two study directories, one SQLite database: the database side plans once too
    plan_at_once(f, tmp_path / "db", 3, "shared_db")
    for r in range(3):
        for me in (0, 1):
            slots = trial_slots(tmp_path / "db" / f"round{r}-{me}")
            assert len(slots) == 6 and len(set(slots)) == 6, (r, me, sorted(slots))


def test_a_planned_study_is_not_planned_again_and_a_grown_plan_adds_its_new_slots(tmp_path, monkeypatch):
    import optuna

    study = sweep.load_study(write_study(tmp_path / "s.py"))
    sd = tmp_path / "st"
    logs = []
    full = sweep.Study.plan
    monkeypatch.setattr(sweep.Study, "plan", lambda self: full(self)[:3])  # as if planned by a smaller plan
    prepare_study(study, sd, log=logs.append)
    monkeypatch.undo()
    assert logs == [f"study 'tiny': planned 3 trials in {db.masked_url(db.default_url(sd))}"]
    prepare_study(study, sd, log=logs.append)  # the plan grew: its new slot only
    assert len(trial_slots(sd)) == 4 and logs[-1].startswith("study 'tiny': planned 1 trials")
    seen = []
    real = optuna.study.Study.get_trials
    monkeypatch.setattr(optuna.study.Study, "get_trials", lambda self, *a, **k: seen.append(1) or real(self, *a, **k))
    prepare_study(study, sd, log=logs.append)  # the plan marker matches: the trials are not even read
    assert seen == [] and len(logs) == 2 and len(trial_slots(sd)) == 4
    assert db.open_study(sd).user_attrs[PLAN_ATTR] == _plan_digest(study.plan())


POPPER = textwrap.dedent("""\
    import json, pathlib, sys, time
    from lstm_lab import sweep
    from lstm_lab.sweep import storage as db

    sd, me = pathlib.Path(sys.argv[1]), sys.argv[2]
    study, _ = sweep.worker_study(sd)
    ostudy = db.open_study(sd, sampler=study.sampler())
    (sd / f"ready-{me}").touch()
    while not (sd / "go").exists():
        time.sleep(0.0005)
    got = []
    while True:
        trials = db.pop(ostudy, 1)
        if not trials:
            break
        got += [t.number for t in trials]
    (sd / f"got-{me}.json").write_text(json.dumps(got))
    """)


@pytest.mark.integration  # worker processes
def test_workers_taking_trials_at_once_never_take_one_twice(tmp_path):
    import time

    study = sweep.load_study(write_study(tmp_path / "s.py", variants=("vanilla", "nfg", "nig"), trials_per_variant=20))
    sd = tmp_path / "st"
    prepare_study(study, sd, log=lambda m: None)
    script = tmp_path / "popper.py"
    script.write_text(POPPER)
    procs = [subprocess.Popen([sys.executable, str(script), str(sd), str(i)], cwd=ROOT, stderr=subprocess.PIPE,
                              text=True) for i in range(3)]
    deadline = time.monotonic() + 120
    while not all((sd / f"ready-{i}").exists() for i in range(3)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
        time.sleep(0.001)
    (sd / "go").touch()
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()[-3000:]
    got = [json.loads((sd / f"got-{i}.json").read_text()) for i in range(3)]
    every = [tid for g in got for tid in g]
    assert len(every) == 60 and len(set(every)) == 60, [len(g) for g in got]


# ---------------------------------------------------------------------------
# 2. A copied study directory uses its own database
# ---------------------------------------------------------------------------
def test_copied_study_directory_uses_its_own_database(tmp_path):
    study = sweep.load_study(write_study(tmp_path / "s.py"))
    sd, copy = tmp_path / "st", tmp_path / "elsewhere" / "st-copy"
    prepare_study(study, sd, log=lambda m: None)
    assert json.loads((sd / "study.json").read_text())["storage"] == "sqlite:///study.db"  # relative to the dir
    shutil.copytree(sd, copy)
    db.open_study(copy).set_user_attr("touched", "copy")
    assert "touched" not in db.open_study(sd).user_attrs
    assert db.open_study(copy).user_attrs["touched"] == "copy"
    assert str(copy / "study.db") in sweep.status(copy)["storage"]
    # a moved one too (and a second plan of it enqueues nothing)
    moved = tmp_path / "moved"
    shutil.move(str(sd), moved)
    prepare_study(study, moved, log=lambda m: None)
    assert len(trial_slots(moved)) == 4 and str(moved / "study.db") in sweep.status(moved)["storage"]


def test_old_study_json_with_an_absolute_sqlite_path(tmp_path):
    study = sweep.load_study(write_study(tmp_path / "s.py"))
    sd = tmp_path / "st"
    prepare_study(study, sd, log=lambda m: None)
    info = json.loads((sd / "study.json").read_text())
    legacy = {k: v for k, v in info.items() if k != "format"}
    # written by an older version in the original place, then copied: the copy's own study.db is used
    legacy["storage"] = f"sqlite:///{tmp_path / 'original' / 'st' / 'study.db'}"
    copy = tmp_path / "copy"
    shutil.copytree(sd, copy)
    (copy / "study.json").write_text(json.dumps(legacy))
    assert db.study_dir_info(copy)["storage"] == db.default_url(copy)
    assert sweep.status(copy)["planned"] == 4
    # its own study.db, by absolute path: the same
    legacy["storage"] = db.default_url(copy)
    (copy / "study.json").write_text(json.dumps(legacy))
    assert db.study_dir_info(copy)["storage"] == db.default_url(copy)
    # an external database and no study.db of its own: the stored path (an explicit --storage)
    ext = tmp_path / "ext"
    ext.mkdir()
    legacy["storage"] = db.default_url(sd)
    (ext / "study.json").write_text(json.dumps(legacy))
    assert db.study_dir_info(ext)["storage"] == db.default_url(sd)
    # the current format: an SQLite file outside the study directory is stored (and used) by absolute path
    prepare_study(study, tmp_path / "st2", storage=db.default_url(sd), log=lambda m: None)
    assert json.loads((tmp_path / "st2" / "study.json").read_text())["storage"] == db.default_url(sd)


# ---------------------------------------------------------------------------
# 3. An emptied database is an error, never a fresh schema
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"", b"this is not an SQLite database at all\n" * 20])
def test_emptied_database_is_reported_and_left_alone(tmp_path, capsys, content):
    f = write_study(tmp_path / "s.py")
    study = sweep.load_study(f)
    sd = tmp_path / "st"
    prepare_study(study, sd, log=lambda m: None)
    (sd / "study.db").write_bytes(content)
    readers = {"status": lambda: sweep.status(sd), "trials": lambda: sweep.trials(sd),
               "curves": lambda: sweep.curves(sd), "report": lambda: report(sd),
               "worker": lambda: run_worker(*sweep.worker_study(sd), progress=False, log=lambda m: None),
               "sweep": lambda: prepare_study(study, sd, log=lambda m: None)}
    for what, read in readers.items():
        with pytest.raises(db.StorageError, match="the database is empty or not a study database") as e:
            read()
        assert "\n" not in str(e.value), what
        assert (sd / "study.db").read_bytes() == content, what  # no schema written into it
    assert main(["status", str(sd)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "empty or not a study database" in err and "no study named" not in err, err
    assert (sd / "study.db").read_bytes() == content
    # --force starts over in it
    prepare_study(study, sd, force=True, log=lambda m: None)
    assert sweep.status(sd)["planned"] == 4


def test_missing_database_file_is_not_created(tmp_path):
    study = sweep.load_study(write_study(tmp_path / "s.py"))
    sd = tmp_path / "st"
    prepare_study(study, sd, log=lambda m: None)
    (sd / "study.db").unlink()
    with pytest.raises(db.StorageError, match="does not exist"):
        sweep.status(sd)
    assert not (sd / "study.db").exists()


# ---------------------------------------------------------------------------
# 5. Passwords: masked in messages, never on disk
# ---------------------------------------------------------------------------
def test_storage_urls_on_disk_and_at_run_time(tmp_path, monkeypatch):
    url = "postgresql://alice:s3cret@db.example:5433/lab"
    assert db.without_password(url) == "postgresql://alice@db.example:5433/lab"
    assert db.masked_url(url) == "postgresql://alice:***@db.example:5433/lab"
    assert db.masked_url("postgresql://alice:s3cret@db:noport/lab") == "postgresql://alice:***@db:noport/lab"
    assert db.url_for_disk(url, tmp_path) == "postgresql://alice@db.example:5433/lab"
    assert db.url_for_disk(f"sqlite:///{tmp_path}/sub/x.db", tmp_path) == "sqlite:///sub/x.db"
    assert db.url_for_disk("sqlite:////data/x.db", tmp_path) == "sqlite:////data/x.db"
    stored = "postgresql://alice@db.example:5433/lab"
    monkeypatch.delenv(db.STORAGE_ENV, raising=False)
    assert db.runtime_url(stored, tmp_path) == stored  # psycopg: PGPASSWORD / ~/.pgpass
    monkeypatch.setenv(db.STORAGE_ENV, url)
    assert db.runtime_url(stored, tmp_path) == url
    monkeypatch.setenv(db.STORAGE_ENV, "postgresql://alice:s3cret@other.host:5433/lab")  # another database
    assert db.runtime_url(stored, tmp_path) == stored
    assert db.runtime_url("sqlite:///sub/x.db", tmp_path) == f"sqlite:///{tmp_path.absolute()}/sub/x.db"


# ---------------------------------------------------------------------------
# 6. Workers rebuild the study from its record: data, never code
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["quick.py", "odyssey_copy.py", "odyssey_char_lm.py"])
def test_shipped_studies_rebuild_from_their_record(tmp_path, name):
    study = sweep.load_study(ROOT / "experiments" / name)
    record = json.loads(json.dumps(study.record(), default=str))  # as stored
    rebuilt = sweep.Study.from_record(record, population=study.population)
    assert rebuilt.fingerprint() == study.fingerprint() and rebuilt.plan() == study.plan()
    assert rebuilt.population == study.population and isinstance(rebuilt.base, dict)
    # a study directory whose study file is not on this machine (and whose relative `base` never was)
    sd = tmp_path / "sd"
    sd.mkdir()
    (sd / "study.json").write_text(json.dumps({
        "format": db.STUDY_JSON_FORMAT, "fingerprint": study.fingerprint(), "storage": "sqlite:///study.db",
        "source": f"/nowhere/{name}", "population": study.population, "study": record,
        "params": study.describe_params()}))
    got, d = sweep.worker_study(sd)
    assert got.fingerprint() == study.fingerprint() and d == sd and got.population == study.population


def test_worker_never_executes_stored_text_or_files(tmp_path):
    f = write_study(tmp_path / "s.py")
    study = sweep.load_study(f)
    sd = tmp_path / "st"
    prepare_study(study, sd, log=lambda m: None)
    info = json.loads((sd / "study.json").read_text())
    assert "source_text" not in info
    assert "lstm_lab_source_text" not in db.open_study(sd).user_attrs
    # whoever can write the study's records points them at code: none of it runs
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').write('x')\nfrom lstm_lab.sweep import Study\nstudy = Study(name='tiny')\n")
    (sd / "study.json").write_text(json.dumps({**info, "source": str(evil), "source_text": evil.read_text()}))
    ostudy = db.open_study(sd)
    ostudy.set_user_attr("lstm_lab_source", str(evil))
    ostudy.set_user_attr("lstm_lab_source_text", evil.read_text())
    before = set(pathlib.Path(tempfile.gettempdir()).glob("lstm_lab_study_*"))
    f.unlink()
    got, _ = sweep.worker_study(sd)
    assert got.fingerprint() == study.fingerprint()
    by_name, d = sweep.worker_study("tiny", tmp_path / "by_name", storage=db.default_url(sd))
    assert by_name.fingerprint() == study.fingerprint() and d == tmp_path / "by_name"
    assert not marker.exists()
    assert set(pathlib.Path(tempfile.gettempdir()).glob("lstm_lab_study_*")) == before
    # a record edited into another study: refused (its fingerprint no longer matches)
    bad = {**info, "study": {**info["study"], "trials_per_variant": 3}}
    (sd / "study.json").write_text(json.dumps(bad))
    with pytest.raises(sweep.StudyError, match="fingerprint"):
        sweep.worker_study(sd)


@pytest.mark.integration  # a worker process
def test_worker_on_a_study_directory_without_the_study_file(tmp_path):
    f = write_study(tmp_path / "s.py", variants=("vanilla",), trials_per_variant=1,
                    base={**TINY, "train.steps": 10, "train.eval_every": 5})
    sd = tmp_path / "st"
    cli("sweep", f, "--dir", sd, "--plan-only")
    f.unlink()
    out = cli("worker", sd)
    assert "trial 0 vanilla/0000: complete test.loss=" in out.stderr, out.stderr
    assert sweep.status(sd)["complete"] == 1
