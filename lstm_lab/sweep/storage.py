"""Where a study lives: its directory, its database (Optuna RDB storage), retries while the database is away,
which workers are alive, and every use of Optuna's internals (this module alone reaches them).

A study directory holds::

    study.json      the study's record (a different study file is refused) and the storage URL: an SQLite
                    file inside the directory by a path relative to it (``sqlite:///study.db``), so a copied
                    or moved directory uses its own database; any other URL without its password
    study.db        the Optuna database (SQLite) unless another storage URL was given
    .plan.lock      flock-ed while a process plans the study (:func:`lstm_lab.sweep.study.prepare_study`)
    runs/<variant>-<index>/   one training run directory per trial (config, metrics, checkpoints, summary)
    report/         ``lstm-lab report``'s output (``.trials-digest``: the trials it was written from)

Every planned trial is enqueued in Optuna as a WAITING trial when the study is planned. A worker pops WAITING
trials atomically (one conditional ``UPDATE`` of the trial's state: :func:`pop`), records its host and pid on
the trial and sends Optuna heartbeats while it runs (:class:`Heartbeat`). A worker killed mid-trial leaves its
trial RUNNING; the next worker that looks (:func:`reclaim_orphans`) marks it FAIL with status ``interrupted``
and enqueues a retry of the same slot, which resumes from the run directory's last checkpoint: on the same
host as soon as its pid is gone, elsewhere once its heartbeat is stale (Optuna's ``fail_stale_trials`` with
the heartbeat-stale trial callback :class:`RetryStale`). A slot's outcome is its latest trial, so every
planned trial counts exactly once.

Many machines: give every worker the same ``--storage`` URL (PostgreSQL, MySQL, any SQLAlchemy URL) and a
study directory on a shared filesystem, so a retried trial resumes from its checkpoint (without a shared
directory the retry starts the run over; the trial still completes exactly once). A worker whose database
goes away mid-sweep (a restart, a network blip) retries every database call for
``LSTM_LAB_DB_RETRY_SECONDS`` (default 600) before giving up (:func:`retrying`). Heartbeats:
``LSTM_LAB_HEARTBEAT_INTERVAL`` (default 20 s); a trial is stale after ``LSTM_LAB_GRACE_PERIOD`` (default
120 s). ``LSTM_LAB_WORKER_HOST`` overrides the host name a worker records (default: the machine's host name).

Passwords: no password is written to disk or into the database. study.json keeps the URL without it; at run
time it comes from ``--storage`` given again, from ``LSTM_LAB_STORAGE`` (a full URL, used when it names the
same database), or from libpq's ``PGPASSWORD`` / ``~/.pgpass``; messages show it as ``***``.

Reading a study (``status``, ``report``, ``trials``, ``curves``, a worker joining) never writes a schema: a
database without Optuna's tables is an error ("the database is empty or not a study database").

Optuna's internals used here, and nowhere else (``tests/test_sweep_storage.py`` pins them): a study's
``_storage`` and a trial's ``_trial_id``; the RDB storage's ``_get_stale_trial_ids``; the trials table model
(``optuna.storages._rdb.models``) for the compare-and-set of :func:`pop`; ``optuna.Trial(study, trial_id)``
for a popped trial.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import pathlib
import socket
import threading
import time
from typing import Callable

from lstm_lab.sweep.space import StudyError

__all__ = ["StudyConflictError", "StorageError", "STORAGE_ENV", "STUDY_JSON_FORMAT", "default_url", "masked_url",
           "without_password", "url_for_disk", "runtime_url", "retrying", "connect", "check_schema", "study_dir_info",
           "info_from_db", "open_study", "heartbeat_interval", "grace_period", "host", "owner_alive_here", "pop",
           "Heartbeat", "get_trial", "set_trial_attrs", "requeue", "hand_back", "reclaim_orphans", "stale_numbers",
           "RetryStale"]

HEARTBEAT_INTERVAL = 20  # seconds between a worker's heartbeats (Optuna RDB storage)
GRACE_PERIOD = 120  # a RUNNING trial without a heartbeat for this long belongs to a dead worker
DB_RETRY_SECONDS = 600  # how long a worker keeps retrying a database that went away
STORAGE_ENV = "LSTM_LAB_STORAGE"  # a storage URL with its password, for a study.json that stores it without
STUDY_JSON_FORMAT = 2  # 2: storage stored without a password; an SQLite file in the study directory by relative path


class StudyConflictError(RuntimeError):
    """The study directory (or database) holds a different study."""


class StorageError(RuntimeError):
    """The storage URL cannot be used."""


def env_seconds(name: str, default: float) -> float:
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
    return max(1, int(env_seconds("LSTM_LAB_HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL)))


def grace_period() -> int:
    return max(1, int(env_seconds("LSTM_LAB_GRACE_PERIOD", GRACE_PERIOD)))


# ---------------------------------------------------------------------------
# URLs
# ---------------------------------------------------------------------------
def default_url(study_dir) -> str:
    return f"sqlite:///{pathlib.Path(study_dir).absolute() / 'study.db'}"


def masked_url(url: str) -> str:
    """The URL with its password hidden (for messages and status output)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy understands: hide whatever looks like a password
        import re

        return re.sub(r"(://[^:/@\s]*):[^@\s]*@", r"\1:***@", url)


def _url(url: str):
    try:
        from sqlalchemy.engine import make_url

        return make_url(url)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy understands
        return None


def sqlite_path(url: str) -> pathlib.Path | None:
    """The file of an SQLite URL (None: not SQLite, in memory, or a ``file:`` URI)."""
    u = _url(url)
    if u is None or u.get_backend_name() != "sqlite":
        return None
    db = u.database or ""
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return pathlib.Path(db)


def without_password(url: str) -> str:
    """The URL as written to disk (study.json) and into the database: its password left out."""
    u = _url(url)
    if u is None or u.password is None:
        return url
    from sqlalchemy.engine import URL

    return URL.create(u.drivername, username=u.username, password=None, host=u.host, port=u.port,
                      database=u.database, query=u.query).render_as_string(hide_password=False)


def absolute_sqlite(url: str) -> str:
    """A relative SQLite path given on the command line is relative to the current directory: make it absolute."""
    path = sqlite_path(url)
    if path is None or path.is_absolute():
        return url
    return _url(url).set(database=str(path.absolute())).render_as_string(hide_password=False)


def url_for_disk(url: str, study_dir) -> str:
    """What study.json stores: an SQLite file inside the study directory by a path relative to it (a copied or
    moved study directory uses its own database); any other URL without its password."""
    path = sqlite_path(url)
    if path is not None:
        sd = pathlib.Path(study_dir).absolute()
        try:
            rel = path.absolute().relative_to(sd)
        except ValueError:
            return url
        return _url(url).set(database=rel.as_posix()).render_as_string(hide_password=False)
    return without_password(url)


def _same_database(a: str, b: str) -> bool:
    ua, ub = _url(a), _url(b)
    if ua is None or ub is None:
        return False
    same = (ua.get_backend_name(), ua.host, ua.port, ua.database) == (ub.get_backend_name(), ub.host, ub.port,
                                                                      ub.database)
    return same and (ua.username is None or ub.username is None or ua.username == ub.username)


def runtime_url(stored: str, study_dir, legacy: bool = False) -> str:
    """The URL a study directory's study.json stands for, here and now.

    * A relative SQLite path is relative to the study directory.
    * ``legacy`` (a study.json from before relative paths): an absolute SQLite path that is not this
      directory's ``study.db``, while this directory has its own ``study.db``, is a copied or moved study
      directory: its own database is used (never the original's).
    * A URL stored without its password gets it from ``LSTM_LAB_STORAGE`` when that names the same database
      (else libpq's ``PGPASSWORD`` / ``~/.pgpass`` supply it; psycopg reads them itself).
    """
    sd = pathlib.Path(study_dir)
    path = sqlite_path(stored)
    if path is not None:
        if not path.is_absolute():
            return _url(stored).set(database=str((sd / path).absolute())).render_as_string(hide_password=False)
        own = (sd / "study.db").absolute()
        if legacy and path != own and own.is_file():
            return default_url(sd)
        return stored
    u = _url(stored)
    if u is not None and u.password is None and u.get_backend_name() != "sqlite":
        env = os.environ.get(STORAGE_ENV)
        if env and _same_database(env, stored):
            return env
    return stored




# ---------------------------------------------------------------------------
# Retries while the database is away
# ---------------------------------------------------------------------------
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


def retrying(fn, what: str, log: Callable[[str], None] = print):
    """Call ``fn()``; while the database is unreachable (restart, network), retry with backoff for
    ``LSTM_LAB_DB_RETRY_SECONDS``; then raise :class:`StorageError`."""
    errors = _transient_errors()
    budget = env_seconds("LSTM_LAB_DB_RETRY_SECONDS", DB_RETRY_SECONDS)
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
            first = first_line(e.__cause__ or e)
            if time.monotonic() - start > budget:
                raise StorageError(f"the database stayed unreachable for {budget:.0f} s while {what}: "
                                   f"{first}") from None
            if not told:
                log(f"database unreachable while {what} ({first}); retrying for up to {budget:.0f} s")
                told = True
            time.sleep(delay)
            delay = min(delay * 2, 10.0)




# ---------------------------------------------------------------------------
# Connecting; study.json; opening a study
# ---------------------------------------------------------------------------
def _engine_kwargs(url: str) -> dict:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 120}}  # many local workers: wait for the write lock
    return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}


def _storage_error(e: BaseException, shown: str) -> StorageError:
    """A one-line StorageError for an exception raised while connecting to ``shown`` (a masked URL)."""
    import optuna

    if isinstance(e, ImportError):
        hint = " (pip install 'psycopg[binary]', or lstm_lab[postgres])" if "psycopg" in str(e) else ""
        return StorageError(f"storage {shown!r} cannot be used: {type(e).__name__}: {e}{hint}")
    if isinstance(e, optuna.exceptions.StorageInternalError):
        return StorageError(f"storage {shown!r} cannot be reached: {first_line(e.__cause__ or e)}")
    return StorageError(f"storage {shown!r} cannot be used: {type(e).__name__}: {first_line(e)}")


def _creation_race(e: BaseException) -> bool:
    """Another process created Optuna's tables at the same moment (``table studies already exists``)."""
    text = str(getattr(e, "orig", None) or e).lower()
    return "already exists" in text or "duplicate key" in text or "unique constraint" in text


OPTUNA_TABLES = ("studies", "trials", "version_info")


def _empty_database(shown: str) -> StorageError:
    return StorageError(f"storage {shown!r}: the database is empty or not a study database (no Optuna tables); "
                        f"restore it from a backup, or plan the study again with `lstm-lab sweep <study file> "
                        f"--dir <study dir> --force`.")


def check_schema(url: str) -> None:
    """Raise StorageError unless ``url`` holds Optuna's tables. Creates nothing (not even an SQLite file):
    a study opened for reading never gets a fresh schema written into it."""
    import sqlalchemy as sa
    import sqlalchemy.exc

    shown = masked_url(url)
    path = sqlite_path(url)
    if path is not None:
        if not path.is_file():
            raise StorageError(f"storage {shown!r}: the database file does not exist (was the study directory "
                               f"moved without its study.db?).")
        if path.stat().st_size == 0:
            raise _empty_database(shown)
    try:
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool, **_engine_kwargs(url))
    except (ImportError, sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, ValueError) as e:
        raise _storage_error(e, shown) from None
    try:
        names = set(sa.inspect(engine).get_table_names())
    except sqlalchemy.exc.DatabaseError as e:
        if path is not None and "not a database" in str(e):
            raise _empty_database(shown) from None
        raise _storage_error(e, shown) from None
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise _storage_error(e, shown) from None
    finally:
        engine.dispose()
    if not set(OPTUNA_TABLES) <= names:
        raise _empty_database(shown)


def connect(url: str, *, create: bool = True):
    """Optuna's RDB storage at ``url``, with heartbeats and :class:`RetryStale` as its heartbeat-stale trial
    callback. ``create``: make Optuna's tables in a new database (planning a study); otherwise (reading, or a
    worker joining) a database without them is an error and nothing is written into it."""
    import optuna
    import sqlalchemy.exc

    if url.startswith("sqlite:///"):
        path = pathlib.Path(url[len("sqlite:///"):])
        if not path.parent.is_dir():
            raise StorageError(f"storage {masked_url(url)!r}: the directory {str(path.parent)!r} does not exist.")
    shown = masked_url(url)
    if not create:
        check_schema(url)
    import inspect

    extra = {_callback_kwarg(): RetryStale()}
    if not create and "skip_table_creation" in inspect.signature(optuna.storages.RDBStorage).parameters:
        extra["skip_table_creation"] = True  # (the tables were checked above; an older optuna re-checks them)
    for attempt in range(6):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url),
                                              heartbeat_interval=heartbeat_interval(), grace_period=grace_period(),
                                              **extra)
        except (ImportError, sqlalchemy.exc.ArgumentError, sqlalchemy.exc.OperationalError,
                sqlalchemy.exc.NoSuchModuleError, sqlalchemy.exc.DBAPIError, ValueError,
                optuna.exceptions.StorageInternalError) as e:
            if create and attempt < 5 and _creation_race(e.__cause__ or e):
                time.sleep(0.2 * (attempt + 1))  # another planner is creating the tables: they exist next time
                continue
            raise _storage_error(e, shown) from None


def first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(getattr(e, "orig", None) or e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def quiet_optuna() -> None:
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def study_dir_info(study_dir, storage: str | None = None) -> dict:
    """The study's record: ``<study_dir>/study.json``; without one, and given ``storage``, the record
    stored in the database under the study named ``basename(study_dir)`` (so ``status`` and ``report``
    work from any machine that reaches the database). ``info["storage"]`` is the URL to use here: ``storage``
    if given, else the stored one resolved (see :func:`runtime_url`)."""
    path = pathlib.Path(study_dir) / "study.json"
    if path.exists():
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise StudyError(f"{str(path)!r} cannot be read ({first_line(e)}); restore it, or plan the study "
                             f"again with `lstm-lab sweep <study file> --dir {study_dir} --force`.") from None
        info.pop("source_text", None)  # written by older versions; never used
        info["storage"] = storage or runtime_url(info["storage"], study_dir,
                                                  legacy=info.get("format", 1) < STUDY_JSON_FORMAT)
        return info
    if storage is None:
        raise FileNotFoundError(f"{str(study_dir)!r} is not a study directory (no study.json); "
                                f"run `lstm-lab sweep <study file> --dir {study_dir}` first, or pass --storage URL "
                                f"to read a study of that name from its database.")
    return info_from_db(pathlib.Path(study_dir).name, storage)


def info_from_db(name: str, url: str) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet_optuna()
    rdb = connect(url, create=False)
    try:
        attrs = optuna.load_study(study_name=name, storage=rdb).user_attrs
    except KeyError:
        names = sorted(s.study_name for s in optuna.get_all_study_summaries(rdb, include_best_trial=False))
        raise StudyConflictError(f"storage {masked_url(url)!r} has no study named {name!r} "
                                 f"(it has: {', '.join(names) or 'none'}).") from None
    if "lstm_lab_study" not in attrs:
        raise StudyConflictError(f"storage {masked_url(url)!r}: study {name!r} was not made by lstm-lab sweep.")
    return {"fingerprint": attrs["lstm_lab_fingerprint"], "storage": url, "source": attrs.get("lstm_lab_source"),
            "population": attrs.get("lstm_lab_population", 1), "study": attrs["lstm_lab_study"],
            "params": attrs["lstm_lab_params"]}


def open_study(study_dir, storage: str | None = None, *, sampler=None):
    """The Optuna study of a study directory (read from its study.json). Writes nothing: a database without
    Optuna's tables (emptied, or not a study database) is a :class:`StorageError`."""
    import optuna

    info = study_dir_info(study_dir, storage)
    url = storage or info["storage"]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet_optuna()
    try:
        return optuna.load_study(study_name=info["study"]["name"], storage=connect(url, create=False),
                                 sampler=sampler)
    except KeyError:
        raise StudyConflictError(f"storage {masked_url(url)!r} has no study named {info['study']['name']!r}.") from None


# ---------------------------------------------------------------------------
# Workers: who is alive
# ---------------------------------------------------------------------------
def host() -> str:
    return os.environ.get("LSTM_LAB_WORKER_HOST") or socket.gethostname()


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


def owner_alive_here(ua: dict, here: str) -> bool | None:
    """Whether a trial's worker process is alive; None when it ran on another host (only its heartbeat tells)."""
    if ua.get("host") != here or "pid" not in ua:
        return None
    return _alive(int(ua["pid"]), ua.get("pid_start"))


# ---------------------------------------------------------------------------
# Trials: Optuna's internals, behind these functions
# ---------------------------------------------------------------------------
RETRY_ATTRS = ("slot", "variant", "seed", "index", "workdir")  # what a retry keeps of its trial's user attrs


def get_trial(ostudy, trial):
    """The trial (an ``optuna.Trial`` or a frozen one) as the database has it now."""
    return ostudy._storage.get_trial(trial._trial_id)


def set_trial_attrs(ostudy, trial, **attrs) -> None:
    """Set user attrs of a trial that is not finished (a frozen trial too)."""
    for name, value in attrs.items():
        ostudy._storage.set_trial_user_attr(trial._trial_id, name, value)


def _transition(ostudy, trial_id: int, old, new) -> bool:
    """Move a trial from state ``old`` to ``new`` if it is still in ``old``; whether this call did it.

    One conditional ``UPDATE ... WHERE state = old``: a compare-and-set that holds on every database.
    (Optuna's ``set_trial_state_values`` reads the state, then writes it; its ``SELECT ... FOR UPDATE``
    locks nothing on SQLite, whose driver starts the transaction only at the write, so two workers could
    both take one WAITING trial and run it twice.)"""
    import sqlalchemy as sa

    backend = getattr(ostudy._storage, "_backend", ostudy._storage)
    try:
        from optuna.storages._rdb import models
    except ImportError:  # pragma: no cover - a future optuna without it: its own method
        models = None
    if models is None or not hasattr(backend, "engine"):
        return ostudy._storage.set_trial_state_values(trial_id, state=new)
    table = models.TrialModel.__table__
    values = {"state": new}
    if new.name == "RUNNING":
        values["datetime_start"] = datetime.datetime.now()
    if new.is_finished():
        values["datetime_complete"] = datetime.datetime.now()
    with backend.engine.begin() as conn:
        done = conn.execute(sa.update(table).where(table.c.trial_id == trial_id, table.c.state == old)
                            .values(**values)).rowcount
    return done == 1


def _own(ostudy, trial_id: int) -> None:
    """Record this worker on a trial it took, and a first heartbeat (so a death before the heartbeat thread
    starts still goes stale)."""
    for name, value in {"host": host(), "pid": os.getpid(), "pid_start": _proc_start(os.getpid())}.items():
        ostudy._storage.set_trial_user_attr(trial_id, name, value)
    if hasattr(ostudy._storage, "record_heartbeat"):
        ostudy._storage.record_heartbeat(trial_id)


def pop(ostudy, k: int, group_of: Callable | None = None) -> list:
    """Take up to ``k`` WAITING trials (``optuna.Trial`` objects, this worker recorded on each). With ``k > 1``
    they are all of one group: ``group_of(frozen trial)`` is the trial's population group (None: not known
    before its parameters are asked for)."""
    import optuna
    import sqlalchemy.exc
    from optuna.trial import TrialState

    group_of = group_of or (lambda t: None)
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
                keys = {t._trial_id: group_of(t) for t in waiting}
                busy = {group_of(t) for t in ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
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
                    if _transition(ostudy, t._trial_id, TrialState.WAITING, TrialState.RUNNING):
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


class Heartbeat:
    """Records Optuna heartbeats for the trials a worker runs (a context manager)."""

    def __init__(self, ostudy, trials):
        self.storage, self.ids, self.stop = ostudy._storage, [t._trial_id for t in trials], threading.Event()
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
# Orphans and retries
# ---------------------------------------------------------------------------
class RetryStale:
    """The heartbeat-stale trial callback of every storage :func:`connect` opens: Optuna's
    ``RetryHeartbeatStaleTrialCallback`` (``RetryFailedTrialCallback`` before optuna 4.9), given the trial with
    only its slot's user attrs (``slot``, ``variant``, ``seed``, ``index``, ``workdir``; the same slot is the same
    run directory, so the retry resumes from its last checkpoint) and ``retry_of``, and its parameters fixed.
    ``retried``: the trials this callback enqueued again."""

    def __init__(self):
        self.retried: list = []

    def __call__(self, ostudy, trial) -> None:
        import optuna

        retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
            optuna.storages.RetryFailedTrialCallback
        t = copy.deepcopy(trial)
        t.user_attrs = {**{k: trial.user_attrs[k] for k in RETRY_ATTRS if k in trial.user_attrs},
                        "retry_of": trial.number}
        t.system_attrs = {**trial.system_attrs,
                          "fixed_params": {**trial.system_attrs.get("fixed_params", {}), **trial.params}}
        retry()(ostudy, t)
        self.retried.append(trial)


def _callback_kwarg() -> str:
    import inspect

    import optuna

    params = inspect.signature(optuna.storages.RDBStorage).parameters
    return "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"


def _retry_callback(ostudy) -> RetryStale:
    s = ostudy._storage
    get = getattr(s, "get_heartbeat_stale_trial_callback", None) or getattr(s, "get_failed_trial_callback")
    cb = get()
    return cb if isinstance(cb, RetryStale) else RetryStale()


def requeue(ostudy, trial, status: str, reason: str) -> bool:
    """Mark a RUNNING trial FAIL with ``status`` and ``reason`` (its ``error``) and enqueue its slot again
    (:class:`RetryStale`). False if another process got there first."""
    import optuna
    from optuna.trial import TrialState

    try:
        set_trial_attrs(ostudy, trial, status=status, error=reason)
        if not _transition(ostudy, trial._trial_id, TrialState.RUNNING, TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    _retry_callback(ostudy)(ostudy, get_trial(ostudy, trial))
    return True


def hand_back(ostudy, trials, reason: str) -> None:
    """Trials this worker took and has not finished (Ctrl-C): each still RUNNING is ``interrupted`` and
    enqueued again."""
    from optuna.trial import TrialState

    for t in trials:
        fresh = get_trial(ostudy, t)
        if fresh.state == TrialState.RUNNING:
            requeue(ostudy, fresh, "interrupted", reason)


def stale_numbers(ostudy) -> set:
    """The numbers of the RUNNING trials whose heartbeat is older than the grace period."""
    s = ostudy._storage
    if not hasattr(s, "_get_stale_trial_ids") or not getattr(s, "get_heartbeat_interval", lambda: None)():
        return set()
    return {s.get_trial(tid).number for tid in s._get_stale_trial_ids(ostudy._study_id)}


def reclaim_orphans(ostudy, log: Callable[[str], None] = print) -> int:
    """RUNNING trials whose worker is gone, each marked ``interrupted`` and its slot enqueued again: a dead pid
    on this host (at once), or on any host a stale heartbeat (Optuna's ``fail_stale_trials``, whose callback
    :class:`RetryStale` enqueues the retry). A stale trial whose worker is alive on this host (its heartbeats
    were lost to a database outage) gets a heartbeat instead. Returns how many were enqueued again."""
    import optuna
    from optuna.trial import TrialState

    here, n = host(), 0
    for t in ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        ua = t.user_attrs
        if owner_alive_here(ua, here) is False:
            if requeue(ostudy, t, "interrupted", f"worker pid {ua['pid']} on {here} died mid-trial"):
                log(f"trial {t.number} ({ua.get('slot')}): its worker (pid {ua['pid']}) died; enqueued again")
                n += 1
    s = ostudy._storage
    if not hasattr(s, "_get_stale_trial_ids") or not s.get_heartbeat_interval():
        return n
    stale = s._get_stale_trial_ids(ostudy._study_id)
    for tid in stale:
        t = s.get_trial(tid)
        try:
            if owner_alive_here(t.user_attrs, here):
                s.record_heartbeat(tid)
            else:
                set_trial_attrs(ostudy, t, status="interrupted", error="no heartbeat from its worker")
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
    if stale:
        cb = _retry_callback(ostudy)
        before = len(cb.retried)
        optuna.storages.fail_stale_trials(ostudy)
        for t in cb.retried[before:]:
            log(f"trial {t.number} ({t.user_attrs.get('slot')}): no heartbeat; enqueued again")
            n += 1
    return n
