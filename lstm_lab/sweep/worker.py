"""Running a study: workers that pop planned trials, train them (alone or as a population) and record each
outcome; ``lstm-lab sweep`` (:func:`sweep`: plan, then run here or in ``--workers N`` processes).

A worker (:func:`run_worker`) loops: take over trials whose worker died (:func:`~lstm_lab.sweep.storage.
reclaim_orphans`), pop up to ``--population`` WAITING trials of one shape (:func:`~lstm_lab.sweep.storage.pop`),
ask each for its parameters (``trial.suggest_*``: the planned values, or the sampler's), build each trial's
training config once (:class:`_Configs`), train them while heartbeats go out, and tell Optuna the outcome:
COMPLETE with the metric, or FAIL with ``status`` ``diverged`` or ``failed`` (and the error). A worker with
nothing to pop waits while other workers' trials run, so that an orphan is always picked up.
"""

from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys
import threading
import time
import traceback
from typing import Callable

from lstm_lab._hints import error_message
from lstm_lab._io import read_jsonl
from lstm_lab.sweep import storage as db
from lstm_lab.sweep.results import first_error_line, status_of, study_status
from lstm_lab.sweep.study import Study, StudyError, attach_study, prepare_study

__all__ = ["run_worker", "sweep", "trial_line", "DEBUG_KILL_TRIAL_ENV"]

# tests: "<i>:<step>" makes a worker SIGKILL itself at <step> of its i-th trial
DEBUG_KILL_TRIAL_ENV = "LSTM_LAB_DEBUG_SIGKILL_TRIAL"


# ---------------------------------------------------------------------------
# One trial's config, outcome and line
# ---------------------------------------------------------------------------
class _Configs:
    """Each trial's training config, built once per worker (a trial's planned parameters never change): for
    grouping WAITING trials into populations before they are popped (:meth:`group_of`), and for running them
    (:meth:`ask`)."""

    def __init__(self, study: Study):
        from lstm_lab.training import population_key

        self.study, self.population_key = study, population_key
        self.configs: dict = {}  # trial number -> Config (None: a sampler decides its parameters)
        self.groups: dict = {}  # trial number -> population group

    def _planned(self, t):
        """The config of a trial whose every parameter the plan fixed (None otherwise)."""
        if t.number not in self.configs:
            fixed, study = t.system_attrs.get("fixed_params", {}), self.study
            if "variant" in fixed and all(d.optuna_name(k) in fixed for k, d in study.space.items()):
                self.configs[t.number] = study.config_for(fixed["variant"], study.hyper_from_params(fixed),
                                                          int(t.user_attrs.get("seed", 0)))
            else:
                self.configs[t.number] = None
        return self.configs[t.number]

    def group_of(self, t):
        """A WAITING trial's population group; None: known only once its parameters are asked for."""
        if t.number not in self.groups:
            cfg = self._planned(t)
            self.groups[t.number] = None if cfg is None else self.population_key(cfg)
        return self.groups[t.number]

    def ask(self, trial):
        """A popped trial's config: its parameters asked for (recorded in the database), the config built
        unless it was for grouping."""
        variant, hyper = self.study.ask(trial)
        for key, value in hyper.items():  # actual units (a live view shows them; params hold the search units)
            trial.set_user_attr(key, value)
        cfg = self.configs.get(trial.number)
        if cfg is None:
            cfg = self.configs[trial.number] = self.study.config_for(variant, hyper, int(trial.user_attrs["seed"]))
        return cfg


def _metric(summary: dict, metric: str):
    split, _, key = metric.partition(".")
    v = (summary.get(split) or {}).get(key)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _workdir(study_dir: pathlib.Path, trial) -> pathlib.Path:
    slot = trial.user_attrs["slot"]
    return study_dir / "runs" / slot.replace("/", os.sep, 1).replace("/", "-")


def _finish(ostudy, study: Study, trial, summary: dict | None, error: str | None, log) -> dict:
    """Record a trial's outcome in the database (retrying while it is unreachable); returns
    ``{"status", "value", "error"}`` (``error``: what was recorded for a failed or diverged trial)."""
    import optuna

    def record():
        try:
            return _record_outcome(ostudy, study, trial, summary, error)
        except optuna.exceptions.UpdateFinishedTrialError:  # a retry after the outcome did land
            t = db.get_trial(ostudy, trial)
            return {"status": status_of(t), "value": t.value, "error": t.user_attrs.get("error")}

    return db.retrying(record, f"recording the outcome of trial {trial.number}", log)


def _record_outcome(ostudy, study: Study, trial, summary: dict | None, error: str | None) -> dict:
    from optuna.trial import TrialState

    if summary is not None:
        for split in ("valid", "test"):
            trial.set_user_attr(split, summary.get(split))
        trial.set_user_attr("wall_seconds", summary.get("wall_seconds"))
        trial.set_user_attr("steps", summary.get("steps"))
        trial.set_user_attr("run_status", summary.get("status"))
        if summary.get("population"):
            trial.set_user_attr("population", summary["population"])
        _report_curve(trial, summary.get("history", []))
    value = _metric(summary, study.metric) if summary is not None else None
    if error is not None:
        status = "failed"
        error = error[-4000:]
    elif summary.get("status") == "diverged" or value is None:
        status = "diverged"
        error = summary.get("reason") or f"{study.metric} is not finite"
    else:
        status = "complete"
    if error is not None:
        trial.set_user_attr("error", error)
    trial.set_user_attr("status", status)
    if status == "complete":
        ostudy.tell(trial, value)
    else:
        ostudy.tell(trial, state=TrialState.FAIL)
    return {"status": status, "value": value if status == "complete" else None, "error": error}


def _history(workdir: pathlib.Path) -> list[dict]:
    return read_jsonl(workdir / "metrics.jsonl", kinds=("valid",))


def _report_curve(trial, history: list[dict], done: set | None = None) -> None:
    """The learning curve (validation loss per evaluation step) as the trial's intermediate values; ``done``: the
    steps reported already (updated)."""
    import warnings

    with warnings.catch_warnings():  # a step reported already (the live curve; before an outage) is not stored again
        warnings.simplefilter("ignore")
        for rec in history:
            if isinstance(rec.get("loss"), (int, float)) and math.isfinite(rec["loss"]) and \
                    (done is None or int(rec["step"]) not in done):
                trial.report(float(rec["loss"]), int(rec["step"]))
                if done is not None:
                    done.add(int(rec["step"]))


CURVE_SECONDS = 30  # a running trial's new validation losses reach the database this often (LSTM_LAB_CURVE_SECONDS)


class _LiveCurves:
    """While trials train: a thread that reports each one's new validation losses (from its metrics.jsonl) as
    intermediate values every ``LSTM_LAB_CURVE_SECONDS`` (default 30 s), so that a live view (optuna-dashboard) draws
    the learning curves of running trials too; the outcome reports the whole curve (a step is stored once). Best
    effort: a tick that fails (a database outage) is skipped. A context manager."""

    def __init__(self, trials, workdirs):
        self.items = [(t, pathlib.Path(wd), set()) for t, wd in zip(trials, workdirs)]
        self.every = db.env_seconds("LSTM_LAB_CURVE_SECONDS", CURVE_SECONDS)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="lstm_lab-curves")

    def tick(self) -> None:
        for trial, wd, done in self.items:
            try:
                _report_curve(trial, _history(wd), done)
            except Exception:  # noqa: BLE001 - the next tick, or the outcome, reports it
                pass

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            self.tick()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)  # a tick stuck on the database: the outcome reports the curve anyway


def _error_text(e: BaseException) -> str:
    """What a failed trial records: ``Type: message`` on the first line, then the traceback."""
    return f"{type(e).__name__}: {error_message(e)}\n{traceback.format_exc(limit=8)}"


def _run(ostudy, study: Study, study_dir: pathlib.Path, members: list, callbacks: list, log) -> list[dict]:
    """Train ``members`` (``(trial, config)`` pairs of one population group): alone, or as one vmapped
    population; record each outcome. One outcome per member, with the wall time."""
    from lstm_lab import training

    wds = [_workdir(study_dir, t) for t, _ in members]
    for (trial, _), wd in zip(members, wds):
        db.retrying(lambda: trial.set_user_attr("workdir", str(wd)), "recording a trial", log)
    t0 = time.monotonic()
    try:
        with _LiveCurves([t for t, _ in members], wds):
            if len(members) == 1:
                summaries = [training.train(members[0][1], wds[0], quiet=True, log=lambda m: None,
                                            callbacks=callbacks)]
            else:
                summaries = training.train_population([c for _, c in members], wds, quiet=True, callbacks=callbacks)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - recorded with the trial; the sweep goes on
        err = _error_text(e)
        return [{**_finish(ostudy, study, t, None, err, log), "wall": time.monotonic() - t0} for t, _ in members]
    wall = time.monotonic() - t0
    return [{**_finish(ostudy, study, t, {**s, "history": _history(wd)}, None, log), "wall": wall}
            for (t, _), s, wd in zip(members, summaries, wds)]


def trial_line(number: int, slot: str, outcome: dict, metric: str) -> str:
    """``trial 3 vanilla/0003: complete test.loss=0.0123 (12.3 s)``; a failed or diverged trial shows the
    first line of its error."""
    wall = outcome.get("wall")
    took = f" ({wall:.1f} s)" if isinstance(wall, (int, float)) else ""
    st = outcome["status"]
    if st == "complete":
        return f"trial {number} {slot}: complete {metric}={outcome['value']:.4g}{took}"
    return f"trial {number} {slot}: {st}{took}: {first_error_line(outcome.get('error'))}"


# ---------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------
PROGRESS_SECONDS = 30  # without a terminal: a progress line this often (LSTM_LAB_PROGRESS_SECONDS)


class _Progress:
    """What a sweep shows while it runs. On a terminal: one tqdm bar, every other line written through it
    (:meth:`say`), so lines never land on the bar's line and no stale bars pile up. Elsewhere (a log file,
    SLURM): a progress line every ``LSTM_LAB_PROGRESS_SECONDS`` (default 30 s) with done/planned, failed,
    the rate and an ETA."""

    def __init__(self, desc: str, log: Callable[[str], None], status_fn: Callable[[], dict], *,
                 enabled: bool = True):
        self.log, self.status_fn, self.lock = log, status_fn, threading.RLock()
        self.bar, self.thread, self.stop = None, None, threading.Event()
        self.t0, self.done0 = time.monotonic(), None
        if not enabled:
            return
        st = self._status()
        self.done0 = st["done"] if st else None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=st["planned"] if st else None, initial=st["done"] if st else 0, desc=desc,
                            unit="trial", dynamic_ncols=True, file=sys.stderr)
        else:
            self.every = db.env_seconds("LSTM_LAB_PROGRESS_SECONDS", PROGRESS_SECONDS)
            self.thread = threading.Thread(target=self._lines, daemon=True, name="lstm_lab-progress")
            self.thread.start()

    def _status(self) -> dict | None:
        try:
            return self.status_fn()
        except Exception:  # noqa: BLE001 - progress is best effort (a database outage is reported elsewhere)
            return None

    def say(self, msg: str) -> None:
        with self.lock:
            if self.bar is not None:
                from tqdm import tqdm

                with tqdm.external_write_mode(file=sys.stderr):
                    self.log(msg)
            else:
                self.log(msg)

    def update(self, st: dict | None = None) -> None:
        if self.bar is None:
            return
        st = st or self._status()
        if st is None:
            return
        with self.lock:
            self.bar.total = st["planned"]
            self.bar.n = st["done"]
            self.bar.set_postfix_str(f"{st['failed']} failed" if st["failed"] else "", refresh=False)
            self.bar.refresh()

    def line(self, st: dict) -> str:
        elapsed = time.monotonic() - self.t0
        done, planned = st["done"], st["planned"]
        if self.done0 is None:
            self.done0 = done
        rate = (done - self.done0) / elapsed * 60 if elapsed > 0 else 0.0
        left = planned - done
        if not left:
            eta = "done"
        elif rate > 0:
            eta = f"{left / rate:.1f} min"
        else:
            eta = "unknown" if st.get("eta_seconds") is None else f"{st['eta_seconds'] / 60:.1f} min"
        failed = f", {st['failed']} failed" if st["failed"] else ""
        return (f"progress: {done}/{planned} done{failed}, {st['running']} running, {rate:.2f} trials/min, "
                f"ETA {eta}")

    def _lines(self) -> None:
        while not self.stop.wait(self.every):
            st = self._status()
            if st is not None:
                self.say(self.line(st))

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=10)
        if self.bar is not None:
            with self.lock:
                self.bar.close()


# ---------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------
def _debug_callbacks(ran: int, kill_trial: str, kill_step: str) -> list:
    """Test hooks: the environment's (``lstm_lab._debug``), and a SIGKILL at ``kill_step`` of trial ``kill_trial``."""
    import signal

    from lstm_lab._debug import callbacks_from_env
    from lstm_lab.training import signal_at

    extra = [signal_at(int(kill_step), signal.SIGKILL)] if kill_trial and ran == int(kill_trial) else []
    return callbacks_from_env() + extra


def run_worker(study: Study, study_dir, *, storage: str | None = None, population: int = 1,
               max_trials: int | None = None, log: Callable[[str], None] = print, progress: bool = True,
               wait: bool = True) -> dict:
    """Pull WAITING trials of the study until none is left; returns counts of what this worker ran.

    With ``wait`` (the default) a worker that finds nothing to pop stays while other workers' trials
    are RUNNING, and takes over any whose worker died (dead pid here, or a stale heartbeat); it
    returns when every planned trial has an outcome. ``progress``: a bar on a terminal, else a progress
    line every 30 s (see :class:`_Progress`); every message goes through ``log``."""
    from optuna.trial import TrialState

    sd = pathlib.Path(study_dir)
    if not (sd / "study.json").exists() and storage is not None:
        attach_study(study, sd, storage, log)
    info = db.study_dir_info(sd, storage)
    if info["fingerprint"] != study.fingerprint():
        raise db.StudyConflictError(f"{str(sd)!r} holds a different study than {study.source or study.name!r}.")
    ostudy = db.open_study(sd, storage, sampler=study.sampler())
    stored = db.retrying(lambda: ostudy.user_attrs.get("lstm_lab_fingerprint"), "reading the study", log)
    if stored is not None and stored != study.fingerprint():
        raise db.StudyConflictError(f"storage {db.masked_url(storage or info['storage'])!r}: study {study.name!r} was "
                                    f"planned from a different study file than {study.source or study.name!r}.")
    counts: dict[str, int] = {}
    prog = _Progress(f"study {study.name}", log, lambda: study_status(sd, storage=storage, ostudy=ostudy),
                     enabled=progress)
    say = prog.say
    ran, waited = 0, False
    kill_trial, _, kill_step = os.environ.pop(DEBUG_KILL_TRIAL_ENV, "").partition(":")
    poll = min(5.0, max(0.5, db.heartbeat_interval() / 2))
    configs = _Configs(study)
    try:
        while max_trials is None or ran < max_trials:
            callbacks = _debug_callbacks(ran, kill_trial, kill_step)
            db.retrying(lambda: db.reclaim_orphans(ostudy, say), "looking for orphaned trials", say)
            k = population if max_trials is None else min(population, max_trials - ran)
            trials = db.retrying(lambda: db.pop(ostudy, k, configs.group_of), "taking trials", say)
            if not trials:
                running = db.retrying(lambda: ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,)),
                                      "reading the study", say)
                if not wait or not running:
                    break
                if not waited:
                    say(f"nothing waiting; {len(running)} trial(s) running elsewhere: waiting for them "
                        f"(an orphan is taken over when its heartbeat is {db.grace_period()} s stale)")
                    waited = True
                time.sleep(poll)
                continue
            waited = False
            with db.Heartbeat(ostudy, trials):
                try:
                    groups: dict = {}
                    for t in trials:
                        cfg = db.retrying(lambda t=t: configs.ask(t), "reading a trial", say)
                        groups.setdefault(configs.population_key(cfg), []).append((t, cfg))
                    for group in groups.values():
                        for (t, _), out in zip(group, _run(ostudy, study, sd, group, callbacks, say)):
                            counts[out["status"]] = counts.get(out["status"], 0) + 1
                            ran += 1
                            say(trial_line(t.number, t.user_attrs["slot"], out, study.metric))
                        prog.update()
                except (KeyboardInterrupt, SystemExit):
                    db.hand_back(ostudy, trials, "interrupted (KeyboardInterrupt)")  # the next run retries them
                    raise
    finally:
        prog.close()
    return counts


def sweep(study: Study, study_dir, *, workers: int = 1, population: int = 1, storage: str | None = None,
          force: bool = False, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Plan (or reopen) the study and run what is left: in this process, or in ``workers`` processes (each
    ``lstm-lab worker <study dir>``: the study is rebuilt from its record; their output comes through this
    process's ``log``). A study with nothing left says so and returns its status."""
    if workers < 1 or population < 1:
        raise StudyError(f"--workers and --population must be >= 1; got {workers}, {population}.")
    sd = pathlib.Path(study_dir)
    prepare_study(study, sd, storage=storage, force=force, log=log)
    st = study_status(sd, storage=storage)
    if st["waiting"] == 0 and st["running"] == 0 and st["dead"] == 0:
        failed = f", {st['failed']} failed" if st["failed"] else ""
        log(f"nothing left to do: {st['complete']}/{st['planned']} complete{failed}")
        return st
    if workers == 1:
        run_worker(study, sd, storage=storage, population=population, log=log, progress=progress)
    else:
        _run_workers(study, sd, workers=workers, population=population, storage=storage, log=log,
                     progress=progress)
    return study_status(sd, storage=storage)


def _run_workers(study: Study, sd: pathlib.Path, *, workers: int, population: int, storage: str | None,
                 log: Callable[[str], None], progress: bool) -> None:
    """``workers`` local ``lstm-lab worker`` processes on the study directory. The storage URL (and its
    password) reaches them in ``LSTM_LAB_STORAGE``, not on their command line; their stderr comes through
    ``log`` (under this process's progress bar); Ctrl-C hands their trials back."""
    import signal

    env = dict(os.environ)
    if storage:
        env[db.STORAGE_ENV] = storage
    cmd = [sys.executable, "-m", "lstm_lab.cli", "worker", str(sd), "--population", str(population), "--child"]
    log(f"starting {workers} workers")
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, bufsize=1) for _ in range(workers)]
    prog = _Progress(f"study {study.name}", log, lambda: study_status(sd, storage=storage), enabled=progress)

    def relay(stream):
        for line in stream:
            prog.say(line.rstrip("\n"))

    readers = [threading.Thread(target=relay, args=(p.stderr,), daemon=True) for p in procs]
    for r in readers:
        r.start()
    try:
        last = time.monotonic()
        while any(p.poll() is None for p in procs):
            time.sleep(0.2)
            if time.monotonic() - last > 2:
                prog.update()
                last = time.monotonic()
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:  # a terminal's Ctrl-C reached them too; make sure, then give them time to hand back
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 30
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    finally:
        for r in readers:
            r.join(timeout=5)
        prog.close()
    if any(codes):
        log(f"warning: worker exit codes {codes}")
