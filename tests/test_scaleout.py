"""Scale-out: workers sharing one study in a PostgreSQL server; dead workers, a restarted database,
bad URLs and credentials, a different study file; status and report from a machine without the study dir.

The server comes from ``.ci/postgres.sh`` (``.ci/run`` sources it): ``LSTM_LAB_TEST_POSTGRES`` is its
URL and ``LSTM_LAB_TEST_PGCTL`` its pg_ctl command line. Without them these tests skip, except under
``CI=true``, where they fail. Locally: ``source .ci/postgres.sh && pytest tests/test_scaleout.py``.
All tests of this module run on one xdist worker (``xdist_group``): one restarts the server.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
import uuid

import pytest

from lstm_lab import sweep
from lstm_lab.analysis.report import report
from lstm_lab.sweep import storage as db
from lstm_lab.sweep.results import study_status
from lstm_lab.sweep.study import attach_study, prepare_study

from conftest import free_port
from test_study_planning import plan_at_once, trial_slots
from test_sweep import cli, slot_outcomes, write_study

PG = os.environ.get("LSTM_LAB_TEST_POSTGRES")
PGCTL = os.environ.get("LSTM_LAB_TEST_PGCTL")
ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.xdist_group("postgres"), pytest.mark.integration]


@pytest.fixture(autouse=True)
def _server():
    if not PG:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but no PostgreSQL server: LSTM_LAB_TEST_POSTGRES is unset (.ci/run sources "
                        ".ci/postgres.sh)")
        pytest.skip("no PostgreSQL server: `source .ci/postgres.sh` to run these")


FAST_HEARTBEAT = {"LSTM_LAB_HEARTBEAT_INTERVAL": "1", "LSTM_LAB_GRACE_PERIOD": "4"}
# long enough per trial that a kill or a restart lands mid-trial; checkpoints every 10 steps
TRIAL = {"task.name": "copy", "task.options": {"T": 2}, "model.hidden_size": 8, "optim.name": "sgd",
         "train.batch_size": 8, "train.steps": 30, "train.eval_every": 10, "train.log_every": 5,
         "train.eval_batch_size": 100, "train.keep_checkpoints": 1}


@pytest.fixture
def pg_url(monkeypatch):
    """A fresh database on the test server, dropped afterwards. Exported as ``LSTM_LAB_STORAGE``, as a user would
    (study.json keeps the URL without its password: reading a study directory takes the password from there)."""
    import sqlalchemy as sa

    name = f"t_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)  # survives a restart
    with admin.connect() as c:
        c.execute(sa.text(f"CREATE DATABASE {name}"))
    url = sa.engine.make_url(PG).set(database=name).render_as_string(hide_password=False)
    monkeypatch.setenv(db.STORAGE_ENV, url)
    yield url
    with admin.connect() as c:
        c.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


def worker(study_file, sd, url, env=None):
    cmd = [sys.executable, "-m", "lstm_lab.cli", "worker", str(study_file), "--dir", str(sd), "--storage", url]
    return subprocess.Popen(cmd, env={**os.environ, **FAST_HEARTBEAT, **(env or {})}, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs, timeout=300):
    out = []
    for p in procs:
        o, e = p.communicate(timeout=timeout)
        out.append((p.returncode, o, e))
    return out


def test_three_workers_one_killed_every_trial_completes_once(tmp_path, pg_url):
    f = write_study(tmp_path / "s.py", name="three", base=TRIAL, trials_per_variant=2)
    sd = tmp_path / "study"
    cli("sweep", f, "--dir", sd, "--storage", pg_url, "--plan-only")
    # worker 0 claims to be on another machine (so nobody can check its pid: only its heartbeat tells)
    # and SIGKILLs itself at step 15 of its first trial, after the step-10 checkpoint
    procs = [worker(f, sd, pg_url, {"LSTM_LAB_WORKER_HOST": "node-a", "LSTM_LAB_DEBUG_SIGKILL_TRIAL": "0:15"}),
             worker(f, sd, pg_url), worker(f, sd, pg_url)]
    results = finish(procs)
    assert results[0][0] == -9, results[0][2]
    assert [r[0] for r in results[1:]] == [0, 0], [r[2][-2000:] for r in results[1:]]
    logs = results[1][2] + results[2][2]
    assert "no heartbeat; enqueued again" in logs, logs

    outcomes = slot_outcomes(sd)
    assert len(outcomes) == 4
    assert all(v.count("complete") == 1 for v in outcomes.values()), outcomes
    assert sorted(v for v in outcomes.values() if len(v) > 1) == [["interrupted", "complete"]]
    every = sweep.trials(sd, all_attempts=True)
    killed = every[every["status"] == "interrupted"].iloc[0]
    assert killed.error == "no heartbeat from its worker"
    retry = every[every["retry_of"] == killed.number].iloc[0]
    assert retry.status == "complete" and retry.slot == killed.slot
    # the retry resumed from the dead worker's step-10 checkpoint (shared study directory)
    metrics = [json.loads(x) for x in (pathlib.Path(retry.workdir) / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["kind"] == "valid"] == [10, 20, 30]
    st = sweep.status(sd)
    assert (st["planned"], st["complete"], st["running"], st["waiting"]) == (4, 4, 0, 0)
    assert pg_url.split("@")[0].split(":")[-1] not in st["storage"]  # the password is not shown

    # another machine: no study directory, only the database (`lstm-lab status three --storage URL`)
    assert not (ROOT / "three").exists()
    st = sweep.status("three", storage=pg_url)
    assert st["complete"] == 4 and st["study"] == "three"
    out = report("three", tmp_path / "elsewhere", storage=pg_url)
    assert out.is_file() and (tmp_path / "elsewhere" / "trials.csv").is_file()
    assert report("three", tmp_path / "again", storage=pg_url).is_file()  # a second call works too


def test_database_restart_mid_sweep(tmp_path, pg_url):
    """The server goes away just before a trial ends (its run is past the step-20 evaluation of 30) and
    comes back 7 s later: the worker logs the outage, waits, records the outcome and finishes."""
    f = write_study(tmp_path / "s.py", name="restart", base=TRIAL, trials_per_variant=1)
    sd = tmp_path / "study"
    cli("sweep", f, "--dir", sd, "--storage", pg_url, "--plan-only")
    proc = worker(f, sd, pg_url, {"LSTM_LAB_GRACE_PERIOD": "30"})

    def near_the_end():
        for m in sd.glob("runs/*/metrics.jsonl"):
            if any(json.loads(x).get("kind") == "valid" and json.loads(x)["step"] >= 20
                   for x in m.read_text().splitlines() if x.strip()):
                return True
        return False

    deadline = time.monotonic() + 120
    while not near_the_end() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the worker finished before the outage"
    subprocess.run(f"{PGCTL} stop -m fast", shell=True, check=True, capture_output=True)
    time.sleep(7)
    subprocess.run(f"{PGCTL} start", shell=True, check=True, capture_output=True)
    rc, _, err = finish([proc])[0]
    assert rc == 0, err[-3000:]
    assert "database unreachable while recording the outcome" in err and "database reachable again" in err, err
    outcomes = slot_outcomes(sd)
    assert len(outcomes) == 2 and all(v == ["complete"] for v in outcomes.values()), outcomes


def test_bad_urls_credentials_and_a_different_study(tmp_path, pg_url):
    import sqlalchemy as sa

    f = write_study(tmp_path / "s.py", name="bad", base=TRIAL, trials_per_variant=1)
    sd = tmp_path / "study"
    u = sa.engine.make_url(pg_url)
    cases = {
        "nothing listens": u.set(port=free_port()),
        "wrong password": u.set(password="not-the-password"),
        "wrong user": u.set(username="nobody"),
        "no such database": u.set(database="no_such_db"),
    }
    for what, bad in cases.items():  # in-process: a clear StorageError, nothing written, no password shown
        d = sd / what.replace(" ", "_")
        with pytest.raises(db.StorageError) as e:
            prepare_study(sweep.load_study(f), d, storage=bad.render_as_string(hide_password=False),
                                 log=lambda m: None)
        msg = str(e.value)
        assert msg.startswith("storage 'postgresql") and "***" in msg, msg
        assert "not-the-password" not in msg and u.password not in msg, msg
        assert not d.exists(), what
        print(f"{what}: {msg}")
    # the command line: exit 2 and one line, no traceback
    out = cli("worker", f, "--dir", sd / "w", "--storage", cases["wrong password"].render_as_string(hide_password=False),
              check=False)
    assert out.returncode == 2 and "password authentication failed" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "not-the-password" not in out.stderr

    # the study is planned; a worker with a different study file is refused, whichever directory it uses
    cli("sweep", f, "--dir", sd, "--storage", pg_url, "--plan-only")
    g = write_study(tmp_path / "other.py", name="bad", base={**TRIAL, "train.steps": 25}, trials_per_variant=1)
    for d in (sd, tmp_path / "fresh_dir"):
        out = cli("worker", g, "--dir", d, "--storage", pg_url, check=False)
        assert out.returncode == 2 and "different study" in out.stderr, out.stderr
    # a worker on a machine with the study's name only: the study is rebuilt from its record in the database
    f.unlink()
    study, d = sweep.worker_study("bad", tmp_path / "by_name", pg_url)
    assert study.fingerprint() == db.study_dir_info(sd)["fingerprint"] and d == tmp_path / "by_name"
    attach_study(study, d, pg_url, log=lambda m: None)
    assert study_status(d)["planned"] == 2


def test_planners_on_one_database_without_a_shared_directory_plan_once(tmp_path, pg_url):
    """Two machines plan the same study into one PostgreSQL database at the same moment, each with its own
    study directory (the file lock cannot help): the database's advisory lock makes it one plan. The first
    round also races on creating Optuna's tables in the fresh database."""
    f = write_study(tmp_path / "s.py", name="twice", base=TRIAL, variants=("vanilla", "nfg", "nig"))
    rounds = 4
    plan_at_once(f, tmp_path / "pg", rounds, "shared_db", storage=pg_url)
    for r in range(rounds):
        for me in (0, 1):
            slots = trial_slots(tmp_path / "pg" / f"round{r}-{me}", pg_url)
            assert len(slots) == 6 and len(set(slots)) == 6, (r, me, sorted(slots))


def test_passwords_are_masked_and_never_written(tmp_path, pg_url):
    import sqlalchemy as sa

    password = sa.engine.make_url(pg_url).password
    f = write_study(tmp_path / "s.py", name="secret", base=TRIAL, variants=("vanilla",), trials_per_variant=2)
    sd = tmp_path / "study"
    clean = {k: v for k, v in os.environ.items() if k not in ("PGPASSWORD", db.STORAGE_ENV)}
    out = subprocess.run([sys.executable, "-m", "lstm_lab.cli", "sweep", str(f), "--dir", str(sd), "--storage", pg_url,
                          "--workers", "2", "--no-report"], capture_output=True, text=True, cwd=ROOT,
                         env={**clean, **FAST_HEARTBEAT})
    assert out.returncode == 0, out.stderr[-3000:]
    assert password not in out.stdout + out.stderr and "planned 2 trials in postgresql://lstm:***@" in out.stderr
    assert out.stderr.count("complete test.loss=") == 2, out.stderr  # the workers got the password (not on disk)
    for path in sd.rglob("*"):  # nothing under the study directory holds the password
        if path.is_file():
            assert password.encode() not in path.read_bytes(), path
    stored = json.loads((sd / "study.json").read_text())["storage"]
    assert stored == db.without_password(pg_url) and "@" in stored
    ostudy = db.open_study(sd, pg_url)
    assert password not in json.dumps([ostudy.user_attrs, [t.user_attrs for t in ostudy.trials]], default=str)

    def status(**env):
        return subprocess.run([sys.executable, "-m", "lstm_lab.cli", "status", str(sd)], capture_output=True,
                              text=True, cwd=ROOT, env={**clean, **env})

    out = status()  # no password anywhere: libpq asks the server, which refuses
    assert out.returncode == 2 and "password" in out.stderr and out.stderr.count("\n") == 1, out.stderr
    out = status(**{db.STORAGE_ENV: pg_url})
    assert out.returncode == 0 and "complete" in out.stdout and password not in out.stdout, out.stderr
    out = status(PGPASSWORD=password)
    assert out.returncode == 0 and "complete" in out.stdout and password not in out.stdout, out.stderr


def test_emptied_postgres_database_is_not_given_a_schema(tmp_path, pg_url):
    import sqlalchemy as sa

    f = write_study(tmp_path / "s.py", name="empty", base=TRIAL, variants=("vanilla",), trials_per_variant=1)
    sd = tmp_path / "study"
    cli("sweep", f, "--dir", sd, "--storage", pg_url, "--plan-only")
    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    with engine.begin() as c:
        c.execute(sa.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    out = cli("status", sd, "--storage", pg_url, check=False)
    assert out.returncode == 2 and "empty or not a study database" in out.stderr, out.stderr
    assert sa.inspect(engine).get_table_names() == []
    engine.dispose()
