"""lstm_lab.sweep.storage: the one module that reaches into Optuna's internals (a study's ``_storage``, a trial's
``_trial_id``, the RDB storage's ``_get_stale_trial_ids``, the trials table model for the compare-and-set, and
``optuna.Trial(study, trial_id)``). This test pins each of them through the functions that use them, so an Optuna
upgrade that moves one fails here first, by name."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from lstm_lab.sweep import OneMinusLogUniform, LogUniform, Study
from lstm_lab.sweep import storage as db
from lstm_lab.sweep.results import load_trials, study_status
from lstm_lab.sweep.study import prepare_study

from test_sweep import TINY

optuna = pytest.importorskip("optuna")


def test_optuna_internals_behind_storage(tmp_path, monkeypatch):
    from optuna.storages._rdb import models
    from optuna.trial import TrialState

    # the internals, where storage.py reaches for them
    assert {"trial_id", "state", "datetime_start", "datetime_complete"} <= set(models.TrialModel.__table__.c.keys())
    assert callable(optuna.storages.RDBStorage._get_stale_trial_ids)
    assert callable(optuna.storages.fail_stale_trials)
    assert getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback

    monkeypatch.setenv("LSTM_LAB_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("LSTM_LAB_GRACE_PERIOD", "1")
    study = Study(name="pin", base=TINY, variants=("vanilla", "nfg"), trials_per_variant=3,
                  space={"optim.learning_rate": LogUniform(1e-2, 1e-1), "optim.momentum": OneMinusLogUniform(0.05, 1)})
    sd = tmp_path / "st"
    prepare_study(study, sd, log=lambda m: None)
    ostudy = db.open_study(sd, sampler=study.sampler())
    assert hasattr(ostudy, "_storage") and hasattr(ostudy, "_study_id")
    plan = {p["slot"]: p for p in study.plan()}

    # pop: k at a time, all of one group, each trial once (compare-and-set), this worker recorded on it
    got = db.pop(ostudy, 2, lambda t: t.user_attrs["variant"])
    assert len(got) == 2 and all(isinstance(t, optuna.Trial) for t in got)
    assert len({t.user_attrs["variant"] for t in got}) == 1
    for t in got:
        fresh = db.get_trial(ostudy, t)
        assert fresh.state == TrialState.RUNNING and fresh.user_attrs["host"] == db.host()
        # the planned values through the public trial.suggest_*
        variant, hyper = study.ask(t)
        p = plan[t.user_attrs["slot"]]
        assert variant == p["variant"] and hyper == study.hyper_from_params(p["params"])
    taken = {t.number for t in got}
    assert not taken & {t.number for t in db.pop(ostudy, 4)}  # never taken twice
    rest = [t for t in ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t.number not in taken]

    # heartbeats go stale: a trial of another host is failed by optuna's fail_stale_trials and retried through
    # the heartbeat-stale trial callback; this process's trials (alive here) get a heartbeat instead
    mine, theirs = got
    db.set_trial_attrs(ostudy, theirs, host="node-b")
    time.sleep(2.5)
    assert {mine.number, theirs.number} <= db.stale_numbers(ostudy)
    logs = []
    assert db.reclaim_orphans(ostudy, logs.append) == 1
    assert logs == [f"trial {theirs.number} ({theirs.user_attrs['slot']}): no heartbeat; enqueued again"]
    assert db.get_trial(ostudy, mine).state == TrialState.RUNNING and mine.number not in db.stale_numbers(ostudy)

    # a dead pid on this host: taken over at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    db.set_trial_attrs(ostudy, mine, pid=dead.pid, pid_start=None)
    assert study_status(sd)["dead"] == 1
    assert db.reclaim_orphans(ostudy, logs.append) == 1 and "died; enqueued again" in logs[-1]

    # Ctrl-C: the trials a worker holds are handed back
    db.hand_back(ostudy, rest, "interrupted (KeyboardInterrupt)")

    every = load_trials(sd, all_attempts=True)
    by_slot = every.groupby("slot")
    assert len(by_slot) == 6 and every["status"].value_counts().to_dict() == {"waiting": 6, "interrupted": 6}
    for slot, rows in by_slot:
        rows = rows.sort_values("number")
        if len(rows) == 1:
            continue
        old, new = rows.iloc[0], rows.iloc[1]
        assert (old.status, new.status, new.retry_of) == ("interrupted", "waiting", old.number), rows
        assert new[["optim.learning_rate", "optim.momentum"]].tolist() == old[["optim.learning_rate",
                                                                              "optim.momentum"]].tolist()
    errors = set(every["error"].dropna())
    assert errors == {"no heartbeat from its worker", f"worker pid {dead.pid} on {db.host()} died mid-trial",
                      "interrupted (KeyboardInterrupt)"}
    # every retry is WAITING with its slot's planned parameters fixed: a worker pops it like any other
    again = db.pop(ostudy, 6)
    assert len(again) == 6 and all(study.ask(t)[1] == study.hyper_from_params(plan[t.user_attrs["slot"]]["params"])
                                   for t in again)
