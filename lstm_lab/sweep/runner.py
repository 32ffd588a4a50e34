"""Running a study: Optuna RDB storage, the planned trials, workers, resume after a crash.

A study directory holds::

    study.json      the study's record (a different study file is refused) and the storage URL
    study.db        the Optuna database (SQLite) unless another storage URL was given
    runs/<variant>-<index>/   one training run directory per trial (config, metrics, checkpoints, summary)
    report/         ``lstm-lab report``'s output

Every planned trial is enqueued in Optuna as a WAITING trial when the study
is created. A worker pops WAITING trials atomically (Optuna's own compare-and-
set on the trial state), records its host and pid on the trial, and tells the
result: COMPLETE with the metric, or FAIL with ``status`` ``diverged`` or
``failed`` (and the error). A worker killed mid-trial leaves its trial
RUNNING; the next worker that starts on the same host sees the dead pid (other
hosts: Optuna's heartbeat goes stale) and marks it FAIL with status
``interrupted`` and enqueues a retry of the same slot, which resumes from the
run directory's last checkpoint. A slot's outcome is its latest trial, so
every planned trial counts exactly once.

Many machines: give every worker the same ``--storage`` URL (PostgreSQL,
MySQL, any SQLAlchemy URL) and a study directory on a shared filesystem, so a
retried trial resumes from its checkpoint (without a shared directory the
retry starts the run over; the trial still completes exactly once). A worker
whose database goes away mid-sweep (a restart, a network blip) retries every
database call for ``LSTM_LAB_DB_RETRY_SECONDS`` (default 600) before giving
up; a worker with nothing left to pop waits while other workers' trials run,
so a trial orphaned by a dead worker elsewhere is picked up when its heartbeat
goes stale (``LSTM_LAB_HEARTBEAT_INTERVAL``, default 20 s;
``LSTM_LAB_GRACE_PERIOD``, default 120 s). ``LSTM_LAB_WORKER_HOST`` overrides
the host name a worker records (default: the machine's host name).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import Callable

from lstm_lab._io import atomic_json as _atomic_json, read_jsonl
from lstm_lab.sweep.study import Study, StudyError

__all__ = ["open_study", "prepare_study", "run_worker", "sweep", "study_status", "format_status", "load_trials",
           "load_curves", "StudyConflictError", "StorageError", "default_storage_url", "study_dir_info"]

# tests: "<i>:<step>" makes a worker SIGKILL itself at <step> of its i-th trial
DEBUG_KILL_TRIAL_ENV = "LSTM_LAB_DEBUG_SIGKILL_TRIAL"
HEARTBEAT_INTERVAL = 20  # seconds between a worker's heartbeats (Optuna RDB storage)
GRACE_PERIOD = 120  # a RUNNING trial without a heartbeat for this long belongs to a dead worker
DB_RETRY_SECONDS = 600  # how long a worker keeps retrying a database that went away


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = float(raw)
    except ValueError:
        raise StudyError(f"{name}={raw!r}: expected a number of seconds.") from None
    if v <= 0:
        raise StudyError(f"{name}={raw!r}: must be > 0.")
    return v


def heartbeat_interval() -> int:
    return max(1, int(_env_seconds("LSTM_LAB_HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL)))


def grace_period() -> int:
    return max(1, int(_env_seconds("LSTM_LAB_GRACE_PERIOD", GRACE_PERIOD)))


def _host() -> str:
    return os.environ.get("LSTM_LAB_WORKER_HOST") or socket.gethostname()


class StudyConflictError(RuntimeError):
    """The study directory (or database) holds a different study."""


class StorageError(RuntimeError):
    """The storage URL cannot be used."""


# ---------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------
def default_storage_url(study_dir) -> str:
    return f"sqlite:///{pathlib.Path(study_dir).absolute() / 'study.db'}"


def masked_url(url: str) -> str:
    """The URL with its password hidden (for messages and status output)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy understands: show it as given
        return url


def _transient_errors() -> tuple:
    import optuna
    import sqlalchemy.exc

    return (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)


def _is_transient(e: BaseException) -> bool:
    """A lost or refused connection (server restart, network, SQLite busy) — not a bad statement or data."""
    import sqlalchemy.exc

    cause = e.__cause__ if e.__cause__ is not None else e
    return isinstance(cause, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)) or \
        (cause is e and not isinstance(e, sqlalchemy.exc.DBAPIError))


def _retrying(fn, what: str, log: Callable[[str], None] = print):
    """Call ``fn()``; while the database is unreachable (restart, network), retry with backoff for
    ``LSTM_LAB_DB_RETRY_SECONDS``; then raise :class:`StorageError`."""
    errors = _transient_errors()
    budget = _env_seconds("LSTM_LAB_DB_RETRY_SECONDS", DB_RETRY_SECONDS)
    start, delay, told = time.monotonic(), 0.5, False
    while True:
        try:
            out = fn()
            if told:
                log(f"database reachable again ({what})")
            return out
        except errors as e:
            if not _is_transient(e):
                raise
            first = _first_line(e.__cause__ or e)
            if time.monotonic() - start > budget:
                raise StorageError(f"the database stayed unreachable for {budget:.0f} s while {what}: {first}") from None
            if not told:
                log(f"database unreachable while {what} ({first}); retrying for up to {budget:.0f} s")
                told = True
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _engine_kwargs(url: str) -> dict:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 120}}  # many local workers: wait for the write lock
    return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}


def _storage(url: str):
    import optuna
    import sqlalchemy.exc

    if url.startswith("sqlite:///"):
        path = pathlib.Path(url[len("sqlite:///"):])
        if not path.parent.is_dir():
            raise StorageError(f"storage {url!r}: the directory {str(path.parent)!r} does not exist.")
    shown = masked_url(url)
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url),
                                          heartbeat_interval=heartbeat_interval(), grace_period=grace_period())
    except ImportError as e:
        hint = " (pip install 'psycopg[binary]', or lstm_lab[postgres])" if "psycopg" in str(e) else ""
        raise StorageError(f"storage {shown!r} cannot be used: {type(e).__name__}: {e}{hint}") from None
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.NoSuchModuleError,
            sqlalchemy.exc.DBAPIError, ValueError) as e:
        first = _first_line(e)
        raise StorageError(f"storage {shown!r} cannot be used: {type(e).__name__}: {first}") from None
    except optuna.exceptions.StorageInternalError as e:
        raise StorageError(f"storage {shown!r} cannot be reached: {_first_line(e.__cause__ or e)}") from None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(getattr(e, "orig", None) or e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _quiet_optuna() -> None:
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def study_dir_info(study_dir, storage: str | None = None) -> dict:
    """The study's record: ``<study_dir>/study.json``; without one, and given ``storage``, the record
    stored in the database under the study named ``basename(study_dir)`` (so ``status`` and ``report``
    work from any machine that reaches the database)."""
    path = pathlib.Path(study_dir) / "study.json"
    if path.exists():
        return json.loads(path.read_text())
    if storage is None:
        raise FileNotFoundError(f"{str(study_dir)!r} is not a study directory (no study.json); "
                                f"run `lstm-lab sweep <study file> --dir {study_dir}` first, or pass --storage URL "
                                f"to read a study of that name from its database.")
    return _info_from_db(pathlib.Path(study_dir).name, storage)


def _info_from_db(name: str, url: str) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _quiet_optuna()
    rdb = _storage(url)
    try:
        attrs = optuna.load_study(study_name=name, storage=rdb).user_attrs
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(rdb, include_best_trial=False))
        raise StudyConflictError(f"storage {masked_url(url)!r} has no study named {name!r} "
                                 f"(it has: {', '.join(names) or 'none'}).") from None
    if "lstm_lab_study" not in attrs:
        raise StudyConflictError(f"storage {masked_url(url)!r}: study {name!r} was not made by lstm-lab sweep.")
    return {"fingerprint": attrs["lstm_lab_fingerprint"], "storage": url, "source": attrs.get("lstm_lab_source"),
            "source_text": attrs.get("lstm_lab_source_text"), "study": attrs["lstm_lab_study"],
            "params": attrs["lstm_lab_params"]}


def open_study(study_dir, storage: str | None = None, *, sampler=None):
    """The Optuna study of a study directory (read from its study.json)."""
    import optuna

    info = study_dir_info(study_dir, storage)
    url = storage or info["storage"]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _quiet_optuna()
    try:
        return optuna.load_study(study_name=info["study"]["name"], storage=_storage(url), sampler=sampler)
    except KeyError:
        raise StudyConflictError(f"storage {masked_url(url)!r} has no study named {info['study']['name']!r}.") from None


def prepare_study(study: Study, study_dir, *, storage: str | None = None, force: bool = False,
                  log: Callable[[str], None] = print):
    """Create (or reopen) the study in its directory and database; enqueue every planned trial not yet there.

    Refuses a directory or database that holds a different study unless
    ``force`` (a directory is then moved aside; a database study deleted).
    Nothing is written when the storage cannot be reached.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _quiet_optuna()
    sd = pathlib.Path(study_dir)
    record, fp = study.record(), study.fingerprint()
    existing = sd / "study.json"
    if existing.exists():
        old = json.loads(existing.read_text())
        if old.get("fingerprint") != fp:
            diff = sorted(k for k in set(record) | set(old.get("study", {}))
                          if json.dumps(record.get(k), sort_keys=True, default=str)
                          != json.dumps(old.get("study", {}).get(k), sort_keys=True, default=str))
            if not force:
                raise StudyConflictError(
                    f"{str(sd)!r} holds study {old.get('study', {}).get('name')!r} from "
                    f"{old.get('source')!r}, which differs in {', '.join(diff)}. Use another --dir, or --force "
                    f"to move the old study aside.")
            aside = sd.with_name(f"{sd.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.move(str(sd), aside)
            log(f"moved the previous study (it differed in {', '.join(diff)}) to {aside}")
        elif storage is None:
            storage = old["storage"]
    url = storage or default_storage_url(sd)
    if storage is not None:  # an explicit URL: reach it before writing anything
        rdb = _storage(url)
    sd.mkdir(parents=True, exist_ok=True)
    if storage is None:
        rdb = _storage(url)
    try:
        ostudy = optuna.create_study(study_name=study.name, storage=rdb, direction=study.direction,
                                     sampler=study.sampler(), load_if_exists=True)
    except optuna.exceptions.StorageInternalError as e:
        raise StorageError(f"storage {masked_url(url)!r}: {_first_line(e.__cause__ or e)}") from None
    stored = ostudy.user_attrs.get("lstm_lab_fingerprint")
    if stored is not None and stored != fp:
        if not force:
            raise StudyConflictError(f"storage {masked_url(url)!r} already has a study named {study.name!r} from a different "
                                     f"study file (fingerprint {stored} != {fp}). Rename the study or use --force.")
        optuna.delete_study(study_name=study.name, storage=rdb)
        ostudy = optuna.create_study(study_name=study.name, storage=rdb, direction=study.direction,
                                     sampler=study.sampler())
        stored = None
    if stored is None:
        ostudy.set_user_attr("lstm_lab_source", study.source)
        ostudy.set_user_attr("lstm_lab_source_text", _source_text(study))
        ostudy.set_user_attr("lstm_lab_fingerprint", fp)
        ostudy.set_user_attr("lstm_lab_study", json.loads(json.dumps(record, default=str)))
        ostudy.set_user_attr("lstm_lab_params", study.describe_params())
    _atomic_json(sd / "study.json", {"fingerprint": fp, "storage": url, "source": study.source,
                                     "source_text": _source_text(study),
                                     "study": record, "params": study.describe_params()})
    have = {t.user_attrs.get("slot") for t in ostudy.get_trials(deepcopy=False)}
    todo = [p for p in study.plan() if p["slot"] not in have]
    for p in todo:
        ostudy.enqueue_trial(p["params"], user_attrs={"slot": p["slot"], "variant": p["variant"],
                                                      "seed": p["seed"], "index": p["index"]})
    if todo:
        log(f"study {study.name!r}: planned {len(todo)} trials in {url}")
    return ostudy


def _source_text(study: Study) -> str | None:
    path = pathlib.Path(study.source) if study.source else None
    return path.read_text() if path is not None and path.is_file() else None


def attach_study(study: Study, study_dir, storage: str, log: Callable[[str], None] = print) -> None:
    """A worker joining a study that ``lstm-lab sweep`` planned in ``storage`` from another machine:
    check the stored study is this one and write the local ``study.json``. Plans nothing."""
    info = _info_from_db(study.name, storage)
    if info["fingerprint"] != study.fingerprint():
        raise StudyConflictError(f"storage {masked_url(storage)!r}: study {study.name!r} was planned from a different "
                                 f"study file ({info.get('source')}); this worker's {study.source} differs. "
                                 f"Workers must run the same study file.")
    sd = pathlib.Path(study_dir)
    sd.mkdir(parents=True, exist_ok=True)
    _atomic_json(sd / "study.json", {**info, "storage": storage})
    log(f"joined study {study.name!r} in {masked_url(storage)}")


# ---------------------------------------------------------------------------
# Ownership, orphans and retries
# ---------------------------------------------------------------------------
def _proc_start(pid: int) -> str | None:
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or _proc_start(pid) in (None, start)


def _owner_alive_here(ua: dict, host: str) -> bool | None:
    """Whether a trial's worker process is alive; None when it ran on another host (only its heartbeat tells)."""
    if ua.get("host") != host or "pid" not in ua:
        return None
    return _alive(int(ua["pid"]), ua.get("pid_start"))


def _owner() -> dict:
    return {"host": _host(), "pid": os.getpid(), "pid_start": _proc_start(os.getpid())}


def _requeue(ostudy, trial, status: str, reason: str) -> bool:
    """Mark a RUNNING trial FAIL with ``status`` and enqueue a retry of its slot. False if another
    process got there first."""
    import optuna
    from optuna.trial import TrialState

    storage = ostudy._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, "status", status)
        storage.set_trial_user_attr(trial._trial_id, "error", reason)
        if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    _enqueue_retry(ostudy, trial)
    return True


def _enqueue_retry(ostudy, trial) -> None:
    params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
    attrs = {k: trial.user_attrs[k] for k in ("slot", "variant", "seed", "index", "workdir") if k in trial.user_attrs}
    ostudy.enqueue_trial(params, user_attrs={**attrs, "retry_of": trial.number})


def reclaim_orphans(ostudy, log: Callable[[str], None] = print) -> int:
    """RUNNING trials whose worker is gone: a dead pid on this host, or (any host) a stale Optuna
    heartbeat. Each is marked ``interrupted`` and its slot enqueued again. Returns how many."""
    import optuna
    from optuna.trial import TrialState

    host, n = _host(), 0
    for t in ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        ua = t.user_attrs
        if _owner_alive_here(ua, host) is False:
            if _requeue(ostudy, t, "interrupted", f"worker pid {ua['pid']} on {host} died mid-trial"):
                log(f"trial {t.number} ({ua.get('slot')}): its worker (pid {ua['pid']}) died; enqueued again")
                n += 1
    storage = ostudy._storage
    stale_ids = set(storage._get_stale_trial_ids(ostudy._study_id)) if hasattr(storage, "_get_stale_trial_ids") \
        else set()
    for tid in stale_ids:
        t = storage.get_trial(tid)
        if _owner_alive_here(t.user_attrs, host):
            continue  # its heartbeats were lost (a database outage), but its worker is alive here
        try:
            if _requeue(ostudy, t, "interrupted", "no heartbeat from its worker"):
                log(f"trial {t.number} ({t.user_attrs.get('slot')}): no heartbeat; enqueued again")
                n += 1
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
    return n


class _Heartbeat:
    """Records Optuna heartbeats for the trials a worker runs."""

    def __init__(self, ostudy, trial_ids):
        self.storage, self.ids, self.stop = ostudy._storage, list(trial_ids), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            for tid in self.ids:
                try:
                    self.storage.record_heartbeat(tid)
                except Exception:  # noqa: BLE001 - a missed heartbeat is retried at the next tick
                    pass
            self.stop.wait(heartbeat_interval())

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)


# ---------------------------------------------------------------------------
# Popping trials
# ---------------------------------------------------------------------------
def _pop(ostudy, study: Study, k: int, cache: dict | None = None) -> list:
    """Up to ``k`` WAITING trials, all of one population group where the plan fixes the shapes."""
    import optuna
    import sqlalchemy.exc
    from optuna.trial import TrialState

    from lstm_lab.population import population_key

    cache = {} if cache is None else cache  # trial id -> population group, kept by the worker across pops

    def key_of(t):
        if t._trial_id in cache:  # a trial's planned parameters never change: build its config once per worker
            return cache[t._trial_id]
        fixed = t.system_attrs.get("fixed_params", {})
        if set(study.space) and not all(d.optuna_name(k_) in fixed for k_, d in study.space.items()):
            key = None  # a sampler decides: grouped after the suggestions
        else:
            key = population_key(study.config_for(fixed["variant"], study.hyper_from_params(fixed), 0))
        cache[t._trial_id] = key
        return key

    got, group, owned = [], "unset", set()
    for attempt in range(50):
        try:
            for t in got:  # taken in an attempt that failed half-way: make sure they carry our name
                if t._trial_id not in owned:
                    _own(ostudy, t._trial_id)
                    owned.add(t._trial_id)
            waiting = ostudy.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            if k > 1:
                # workers popping at once should not split a population: start with groups nobody is
                # taking (no member RUNNING yet), and leave a group to the worker that won a race for it
                keys = {t._trial_id: key_of(t) for t in waiting}
                busy = {key_of(t) for t in ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                        if t._trial_id not in owned}
                waiting = sorted(waiting, key=lambda t: keys[t._trial_id] in busy and keys[t._trial_id] is not None)
                lost: set = set()
            for t in waiting:
                if len(got) >= k:
                    break
                if k > 1:
                    tk = keys[t._trial_id]
                    if group == "unset" and tk is not None and tk in lost:
                        continue
                    if group != "unset" and tk != group:
                        continue
                try:
                    if ostudy._storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                        got.append(optuna.Trial(ostudy, t._trial_id))
                        if k > 1 and group == "unset":
                            group = tk
                        _own(ostudy, t._trial_id)
                        owned.add(t._trial_id)
                    elif k > 1 and group == "unset":
                        lost.add(tk)  # another worker took it: its group is theirs
                except optuna.exceptions.UpdateFinishedTrialError:
                    if k > 1 and group == "unset":
                        lost.add(tk)
                    continue
            return got
        except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError):
            if attempt == 49 and not got:
                raise  # not a busy SQLite: the caller's retry decides
            time.sleep(0.2 + 0.1 * attempt)  # SQLite busy: another worker is writing
    return got


def _own(ostudy, trial_id: int) -> None:
    """Record this worker on a trial it took, and a first heartbeat (so a death before the
    heartbeat thread starts still goes stale)."""
    for name, value in _owner().items():
        ostudy._storage.set_trial_user_attr(trial_id, name, value)
    if hasattr(ostudy._storage, "record_heartbeat"):
        ostudy._storage.record_heartbeat(trial_id)


# ---------------------------------------------------------------------------
# Running trials
# ---------------------------------------------------------------------------
def _suggest(trial, study: Study) -> tuple[str, dict]:
    variant = trial.suggest_categorical("variant", study.variant_names)
    hyper = {key: dist.suggest(trial, key) for key, dist in sorted(study.space.items())}
    return variant, hyper


def _metric(summary: dict, metric: str):
    split, _, key = metric.partition(".")
    v = (summary.get(split) or {}).get(key)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _workdir(study_dir: pathlib.Path, trial) -> pathlib.Path:
    slot = trial.user_attrs["slot"]
    return study_dir / "runs" / slot.replace("/", os.sep, 1).replace("/", "-")


def _finish(ostudy, study: Study, trial, summary: dict | None, error: str | None, log) -> str:
    """Record a trial's outcome in the database (retrying while it is unreachable); returns its status."""
    import optuna

    def record():
        try:
            return _record_outcome(ostudy, study, trial, summary, error)
        except optuna.exceptions.UpdateFinishedTrialError:  # a retry after the outcome did land
            return _status_of(ostudy._storage.get_trial(trial._trial_id))

    return _retrying(record, f"recording the outcome of trial {trial.number}", log)


def _record_outcome(ostudy, study: Study, trial, summary: dict | None, error: str | None) -> str:
    from optuna.trial import TrialState

    s = trial.storage if hasattr(trial, "storage") else ostudy._storage
    tid = trial._trial_id
    if summary is not None:
        for split in ("valid", "test"):
            s.set_trial_user_attr(tid, split, summary.get(split))
        s.set_trial_user_attr(tid, "wall_seconds", summary.get("wall_seconds"))
        s.set_trial_user_attr(tid, "steps", summary.get("steps"))
        s.set_trial_user_attr(tid, "run_status", summary.get("status"))
        if summary.get("population"):
            s.set_trial_user_attr(tid, "population", summary["population"])
        for rec in summary.get("history", []):  # the learning curve as intermediate values
            if isinstance(rec.get("loss"), (int, float)) and math.isfinite(rec["loss"]):
                s.set_trial_intermediate_value(tid, int(rec["step"]), float(rec["loss"]))
    value = _metric(summary, study.metric) if summary is not None else None
    if error is not None:
        status = "failed"
        s.set_trial_user_attr(tid, "error", error[-4000:])
    elif summary.get("status") == "diverged" or value is None:
        status = "diverged"
        s.set_trial_user_attr(tid, "error", summary.get("reason") or f"{study.metric} is not finite")
    else:
        status = "complete"
    s.set_trial_user_attr(tid, "status", status)
    if status == "complete":
        ostudy.tell(trial, value)
    else:
        ostudy.tell(trial, state=TrialState.FAIL)
    return status


def _history(workdir: pathlib.Path) -> list[dict]:
    return read_jsonl(workdir / "metrics.jsonl", kinds=("valid",))


def _run_solo(ostudy, study: Study, study_dir: pathlib.Path, trial, variant, hyper, log) -> str:
    from lstm_lab import training

    seed = int(trial.user_attrs["seed"])
    wd = _workdir(study_dir, trial)
    _retrying(lambda: ostudy._storage.set_trial_user_attr(trial._trial_id, "workdir", str(wd)), "recording a trial",
              log)
    summary, error = None, None
    try:
        cfg = study.config_for(variant, hyper, seed)
        summary = training.train(cfg, wd, quiet=True, log=lambda m: None)
        summary = {**summary, "history": _history(wd)}
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - recorded with the trial; the sweep goes on
        error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"
    return _finish(ostudy, study, trial, summary, error, log)


def _run_population(ostudy, study: Study, study_dir: pathlib.Path, members, log) -> list[str]:
    from lstm_lab.population import train_population

    cfgs, wds = [], []
    for trial, variant, hyper in members:
        wd = _workdir(study_dir, trial)
        _retrying(lambda: ostudy._storage.set_trial_user_attr(trial._trial_id, "workdir", str(wd)),
                  "recording a trial", log)
        cfgs.append(study.config_for(variant, hyper, int(trial.user_attrs["seed"])))
        wds.append(wd)
    try:
        summaries = train_population(cfgs, wds, quiet=True)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001
        err = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"
        return [_finish(ostudy, study, m[0], None, err, log) for m in members]
    return [_finish(ostudy, study, m[0], {**s, "history": _history(wd)}, None, log)
            for m, s, wd in zip(members, summaries, wds)]


def run_worker(study: Study, study_dir, *, storage: str | None = None, population: int = 1,
               max_trials: int | None = None, log: Callable[[str], None] = print, progress: bool = True,
               wait: bool = True) -> dict:
    """Pull WAITING trials of the study until none is left; returns counts of what this worker ran.

    With ``wait`` (the default) a worker that finds nothing to pop stays while other workers' trials
    are RUNNING, and takes over any whose worker died (dead pid here, or a stale heartbeat); it
    returns when every planned trial has an outcome."""
    from optuna.trial import TrialState

    from lstm_lab.population import population_key

    sd = pathlib.Path(study_dir)
    if not (sd / "study.json").exists() and storage is not None:
        attach_study(study, sd, storage, log)
    info = study_dir_info(sd)
    if info["fingerprint"] != study.fingerprint():
        raise StudyConflictError(f"{str(sd)!r} holds a different study than {study.source or study.name!r}.")
    ostudy = open_study(sd, storage, sampler=study.sampler())
    stored = _retrying(lambda: ostudy.user_attrs.get("lstm_lab_fingerprint"), "reading the study", log)
    if stored is not None and stored != study.fingerprint():
        raise StudyConflictError(f"storage {masked_url(storage or info['storage'])!r}: study {study.name!r} was "
                                 f"planned from a different study file than {study.source or study.name!r}.")
    counts: dict[str, int] = {}
    total = len(study.plan())
    bar = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"study {study.name}", unit="trial", dynamic_ncols=True, file=sys.stderr)
    ran, waited = 0, False
    kill_trial, _, kill_step = os.environ.pop(DEBUG_KILL_TRIAL_ENV, "").partition(":")
    poll = min(5.0, max(0.5, heartbeat_interval() / 2))
    pop_keys: dict = {}
    try:
        while max_trials is None or ran < max_trials:
            if kill_trial and ran == int(kill_trial):
                from lstm_lab.training import DEBUG_KILL_ENV

                os.environ[DEBUG_KILL_ENV] = kill_step
            _retrying(lambda: reclaim_orphans(ostudy, log), "looking for orphaned trials", log)
            k = population if max_trials is None else min(population, max_trials - ran)
            trials = _retrying(lambda: _pop(ostudy, study, k, pop_keys), "taking trials", log)
            if not trials:
                running = _retrying(lambda: ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,)),
                                    "reading the study", log)
                if not wait or not running:
                    break
                if not waited:
                    log(f"nothing waiting; {len(running)} trial(s) running elsewhere: waiting for them "
                        f"(an orphan is taken over when its heartbeat is {grace_period()} s stale)")
                    waited = True
                time.sleep(poll)
                continue
            waited = False
            with _Heartbeat(ostudy, [t._trial_id for t in trials]):
                try:
                    members = [(t, *_retrying(lambda t=t: _suggest(t, study), "reading a trial", log))
                               for t in trials]
                    groups: dict = {}
                    for m in members:
                        cfg = study.config_for(m[1], m[2], 0)
                        groups.setdefault(population_key(cfg), []).append(m)
                    for group in groups.values():
                        if len(group) == 1:
                            statuses = [_run_solo(ostudy, study, sd, *group[0], log)]
                        else:
                            statuses = _run_population(ostudy, study, sd, group, log)
                        for m, st in zip(group, statuses):
                            counts[st] = counts.get(st, 0) + 1
                            ran += 1
                            log(f"trial {m[0].number} {m[0].user_attrs['slot']}: {st}")
                except (KeyboardInterrupt, SystemExit):
                    for t in trials:  # hand the unfinished ones back: the next run retries them
                        fresh = ostudy._storage.get_trial(t._trial_id)
                        if fresh.state == TrialState.RUNNING:
                            _requeue(ostudy, fresh, "interrupted", "interrupted (KeyboardInterrupt)")
                    raise
            if bar is not None:
                try:
                    st = study_status(sd, storage=storage, ostudy=ostudy)
                    bar.n = st["done"]
                    bar.refresh()
                except _transient_errors():
                    pass
    finally:
        if bar is not None:
            bar.close()
    return counts


def sweep(study: Study, study_dir, *, workers: int = 1, population: int = 1, storage: str | None = None,
          force: bool = False, log: Callable[[str], None] = print) -> dict:
    """Plan (or reopen) the study and run what is left: in this process, or in ``workers`` processes."""
    if workers < 1 or population < 1:
        raise StudyError(f"--workers and --population must be >= 1; got {workers}, {population}.")
    sd = pathlib.Path(study_dir)
    prepare_study(study, sd, storage=storage, force=force, log=log)
    if workers == 1:
        run_worker(study, sd, storage=storage, population=population, log=log)
    else:
        cmd = [sys.executable, "-m", "lstm_lab.cli", "worker", study.source, "--dir", str(sd),
               "--population", str(population)] + (["--storage", storage] if storage else [])
        log(f"starting {workers} workers")
        procs = [subprocess.Popen(cmd) for _ in range(workers)]
        try:
            codes = [p.wait() for p in procs]
        except KeyboardInterrupt:
            for p in procs:
                p.terminate()
            raise
        if any(codes):
            log(f"warning: worker exit codes {codes}")
    return study_status(sd, storage=storage)


# ---------------------------------------------------------------------------
# Status and results
# ---------------------------------------------------------------------------
_STATE_STATUS = {"COMPLETE": "complete", "RUNNING": "running", "WAITING": "waiting", "PRUNED": "failed"}


def _slot_trials(ostudy) -> dict[str, object]:
    """slot -> its latest trial (a retry supersedes the interrupted one)."""
    latest: dict[str, object] = {}
    for t in ostudy.get_trials(deepcopy=False):
        slot = t.user_attrs.get("slot")
        if slot is not None and (slot not in latest or t.number > latest[slot].number):
            latest[slot] = t
    return latest


def _status_of(t) -> str:
    if t.state.name == "FAIL":
        return t.user_attrs.get("status", "failed")
    return _STATE_STATUS.get(t.state.name, t.state.name.lower())


def study_status(study_dir, *, storage: str | None = None, ostudy=None) -> dict:
    """Per variant: ``planned``, ``done`` (= ``complete`` + ``failed``), ``running``, ``waiting``, ``failed``
    (raised or diverged; ``diverged`` counts the latter), the ``best`` value so far; the same totals, and an ETA."""
    info = study_dir_info(study_dir, storage)
    ostudy = ostudy or open_study(study_dir, storage)
    rec = info["study"]
    sign = 1 if rec["direction"] == "minimize" else -1
    variants: dict[str, dict] = {(v if isinstance(v, str) else v["name"]): None for v in rec["variants"]}
    walls = []
    for slot, t in sorted(_slot_trials(ostudy).items()):
        name = t.user_attrs.get("variant", slot.split("/")[0])
        if variants.get(name) is None:
            variants[name] = {"planned": 0, "complete": 0, "failed": 0, "diverged": 0, "running": 0,
                              "waiting": 0, "best": None}
        v = variants[name]
        v["planned"] += 1
        st = _status_of(t)
        key = {"interrupted": "waiting"}.get(st, st)  # an interrupted slot's retry is waiting (or about to be)
        if key == "diverged":  # failed counts every trial that ended without a metric; diverged is a part of it
            v["diverged"] += 1
            key = "failed"
        v[key] = v.get(key, 0) + 1
        if st == "complete":
            if v["best"] is None or sign * t.value < sign * v["best"]:
                v["best"] = t.value
            if t.user_attrs.get("wall_seconds"):
                walls.append(float(t.user_attrs["wall_seconds"]) / max(1, int(t.user_attrs.get("population", 1))))
    variants = {k: v for k, v in variants.items() if v is not None}
    for v in variants.values():
        v["done"] = v["complete"] + v["failed"]
    tot = {k: sum(v[k] for v in variants.values()) for k in ("planned", "done", "complete", "failed", "diverged",
                                                               "running", "waiting")}
    done = tot["done"]
    left = tot["planned"] - done
    workers = max(1, tot["running"])
    eta = (sum(walls) / len(walls)) * left / workers if walls and left else (0.0 if not left else None)
    bests = [v["best"] for v in variants.values() if v["best"] is not None]
    best = (min(bests) if sign > 0 else max(bests)) if bests else None
    return {"study": rec["name"], "metric": rec["metric"], "direction": rec["direction"],
            "storage": masked_url(storage or info["storage"]),
            "variants": variants, **tot, "best": best,
            "eta_seconds": eta}


def format_status(st: dict) -> str:
    rows = [("variant", "planned", "complete", "running", "waiting", "failed", "(diverged)", f"best {st['metric']}")]
    for name, v in st["variants"].items():
        rows.append((name, v["planned"], v["complete"], v["running"], v["waiting"], v["failed"], v["diverged"],
                     "-" if v["best"] is None else f"{v['best']:.4g}"))
    rows.append(("total", st["planned"], st["complete"], st["running"], st["waiting"], st["failed"], st["diverged"],
                 "-" if st["best"] is None else f"{st['best']:.4g}"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    eta = st["eta_seconds"]
    eta_s = "done" if eta == 0 else ("unknown" if eta is None else f"{eta / 60:.1f} min at the current worker count")
    return f"study {st['study']} ({st['storage']})\n" + "\n".join(lines) + f"\nETA: {eta_s}"


def load_trials(study_dir, *, storage: str | None = None, all_attempts: bool = False):
    """One row per planned trial (its latest attempt; ``all_attempts=True`` for every attempt):
    ``number, slot, variant, seed, status, value``, ``valid.*``, ``test.*``, ``wall_seconds``, ``workdir``,
    ``error``, ``retry_of`` and one column per hyperparameter (actual values, e.g. momentum not 1 - momentum)."""
    import pandas as pd

    info = study_dir_info(study_dir, storage)
    ostudy = open_study(study_dir, storage)
    trials = ostudy.get_trials(deepcopy=False) if all_attempts else sorted(_slot_trials(ostudy).values(),
                                                                            key=lambda t: t.number)
    params = info["params"]
    rows = []
    for t in trials:
        ua = t.user_attrs
        fixed = {**t.system_attrs.get("fixed_params", {}), **t.params}
        row = {"number": t.number, "slot": ua.get("slot"), "variant": ua.get("variant"), "seed": ua.get("seed"),
               "status": _status_of(t), "value": t.value if t.state.name == "COMPLETE" else float("nan")}
        for split in ("valid", "test"):
            for k, v in (ua.get(split) or {}).items():
                row[f"{split}.{k}"] = v if v is not None else float("nan")
        for key, p in params.items():
            x = fixed.get(p["optuna_name"])
            row[key] = (1.0 - x if p["kind"] == "one_minus_log_uniform" else x) if x is not None else None
        row.update(wall_seconds=ua.get("wall_seconds"), steps=ua.get("steps"), population=ua.get("population", 1),
                   workdir=ua.get("workdir"), error=ua.get("error"), retry_of=ua.get("retry_of"),
                   started=t.datetime_start, finished=t.datetime_complete)
        rows.append(row)
    return pd.DataFrame(rows)


def load_curves(study_dir, *, storage: str | None = None, trials=None):
    """Learning curves in long form: ``number, variant, slot, step, split ("train"/"valid"), loss``, read from each
    trial's ``metrics.jsonl`` (the database keeps the validation curve as intermediate values too)."""
    import pandas as pd

    trials = load_trials(study_dir, storage=storage) if trials is None else trials
    rows, missing = [], []
    for t in trials.itertuples():
        path = pathlib.Path(t.workdir) / "metrics.jsonl" if isinstance(t.workdir, str) else None
        if path is None or not path.is_file():
            missing.append(t)
            continue
        for rec in read_jsonl(path, kinds=("train", "valid")):
            if rec.get("loss") is not None:
                rows.append({"number": t.number, "variant": t.variant, "slot": t.slot, "step": rec["step"],
                             "split": rec["kind"], "loss": rec["loss"]})
    if missing:  # run directories not on this machine: the validation curve the database keeps
        by_number = {ft.number: ft for ft in open_study(study_dir, storage).get_trials(deepcopy=False)}
        for t in missing:
            ft = by_number.get(t.number)
            for step, loss in sorted((ft.intermediate_values if ft is not None else {}).items()):
                rows.append({"number": t.number, "variant": t.variant, "slot": t.slot, "step": step,
                             "split": "valid", "loss": loss})
    return pd.DataFrame(rows, columns=["number", "variant", "slot", "step", "split", "loss"])
