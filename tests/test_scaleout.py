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
import socket
import subprocess
import sys
import time
import uuid

import pytest

from lstm_lab import sweep
from lstm_lab.sweep import runner

from test_sweep import cli, slot_outcomes, write_study

PG = os.environ.get("LSTM_LAB_TEST_POSTGRES")
PGCTL = os.environ.get("LSTM_LAB_TEST_PGCTL")
ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.xdist_group("postgres")


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
         "train.batch_size": 8, "train.steps": 40, "train.eval_every": 10, "train.log_every": 5,
         "train.eval_batch_size": 100, "train.keep_checkpoints": 1}


@pytest.fixture
def pg_url():
    """A fresh database on the test server, dropped afterwards."""
    import sqlalchemy as sa

    name = f"t_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)  # survives a restart
    with admin.connect() as c:
        c.execute(sa.text(f"CREATE DATABASE {name}"))
    url = sa.engine.make_url(PG).set(database=name).render_as_string(hide_password=False)
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
    f = write_study(tmp_path / "s.py", name="three", base=TRIAL, trials_per_variant=3)
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
    assert len(outcomes) == 6
    assert all(v.count("complete") == 1 for v in outcomes.values()), outcomes
    assert sorted(v for v in outcomes.values() if len(v) > 1) == [["interrupted", "complete"]]
    every = sweep.trials(sd, all_attempts=True)
    killed = every[every["status"] == "interrupted"].iloc[0]
    assert killed.error == "no heartbeat from its worker"
    retry = every[every["retry_of"] == killed.number].iloc[0]
    assert retry.status == "complete" and retry.slot == killed.slot
    # the retry resumed from the dead worker's step-10 checkpoint (shared study directory)
    metrics = [json.loads(x) for x in (pathlib.Path(retry.workdir) / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["kind"] == "valid"] == [10, 20, 30, 40]
    st = sweep.status(sd)
    assert (st["planned"], st["complete"], st["running"], st["waiting"]) == (6, 6, 0, 0)
    assert pg_url.split("@")[0].split(":")[-1] not in st["storage"]  # the password is not shown

    # another machine: no study directory, only the database
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run([sys.executable, "-m", "lstm_lab.cli", "status", "three", "--storage", pg_url, "--json"],
                         capture_output=True, text=True, cwd=elsewhere, check=True)
    assert json.loads(out.stdout)["complete"] == 6
    out = subprocess.run([sys.executable, "-m", "lstm_lab.cli", "report", "three", "--storage", pg_url,
                          "--out", str(elsewhere / "report")], capture_output=True, text=True, cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    assert (elsewhere / "report" / "report.md").is_file() and (elsewhere / "report" / "trials.csv").is_file()


def test_database_restart_mid_sweep(tmp_path, pg_url):
    f = write_study(tmp_path / "s.py", name="restart", base=TRIAL, trials_per_variant=2)
    sd = tmp_path / "study"
    cli("sweep", f, "--dir", sd, "--storage", pg_url, "--plan-only")
    slow = {"LSTM_LAB_GRACE_PERIOD": "30"}  # an outage shorter than the grace period orphans nobody
    procs = [worker(f, sd, pg_url, slow), worker(f, sd, pg_url, slow)]
    deadline = time.monotonic() + 120
    while not list(sd.glob("runs/*/metrics.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.2)  # both workers are training: take the database away under them
    assert all(p.poll() is None for p in procs), "the workers finished before the restart"
    subprocess.run(f"{PGCTL} stop -m fast", shell=True, check=True, capture_output=True)
    time.sleep(10)  # longer than a trial: its outcome has to wait for the database
    subprocess.run(f"{PGCTL} start", shell=True, check=True, capture_output=True)
    results = finish(procs)
    assert [r[0] for r in results] == [0, 0], [r[2][-3000:] for r in results]
    logs = "".join(r[2] for r in results)
    assert "database unreachable while" in logs and "database reachable again" in logs, logs
    outcomes = slot_outcomes(sd)
    assert len(outcomes) == 4 and all(v == ["complete"] for v in outcomes.values()), outcomes


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_bad_urls_credentials_and_a_different_study(tmp_path, pg_url):
    import sqlalchemy as sa

    f = write_study(tmp_path / "s.py", name="bad", base=TRIAL, trials_per_variant=1)
    sd = tmp_path / "study"
    u = sa.engine.make_url(pg_url)
    cases = {
        "nothing listens": u.set(port=_free_port()),
        "wrong password": u.set(password="not-the-password"),
        "wrong user": u.set(username="nobody"),
        "no such database": u.set(database="no_such_db"),
    }
    for what, bad in cases.items():  # in-process: a clear StorageError, nothing written, no password shown
        d = sd / what.replace(" ", "_")
        with pytest.raises(runner.StorageError) as e:
            runner.prepare_study(sweep.load_study(f), d, storage=bad.render_as_string(hide_password=False),
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
    g = write_study(tmp_path / "other.py", name="bad", base={**TRIAL, "train.steps": 30}, trials_per_variant=1)
    for d in (sd, tmp_path / "fresh_dir"):
        out = cli("worker", g, "--dir", d, "--storage", pg_url, check=False)
        assert out.returncode == 2 and "different study" in out.stderr, out.stderr
    # a worker on a machine with the study's name only (its file's text comes from the database)
    out = cli("worker", "bad", "--dir", tmp_path / "by_name", "--storage", pg_url, "--no-wait", check=False)
    assert out.returncode == 0, out.stderr
    assert runner.study_status(sd)["complete"] == 2
