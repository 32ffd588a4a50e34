"""Running a study: Optuna RDB storage, the planned trials, workers, resume after a crash.

A study directory holds::

    study.json      the study's record (a different study file is refused) and the storage URL: an SQLite
                    file inside the directory by a path relative to it (``sqlite:///study.db``), so a copied
                    or moved directory uses its own database; any other URL without its password
    study.db        the Optuna database (SQLite) unless another storage URL was given
    .plan.lock      flock-ed while a process plans the study
    runs/<variant>-<index>/   one training run directory per trial (config, metrics, checkpoints, summary)
    report/         ``lstm-lab report``'s output (``.trials-digest``: the trials it was written from)

Every planned trial is enqueued in Optuna as a WAITING trial when the study
is created, once however many ``lstm-lab sweep`` processes start together
(:func:`prepare_study`: a lock on the study directory, one on the database
side, and a plan marker on the study). A worker pops WAITING trials atomically
(one conditional ``UPDATE`` of the trial's state: :func:`_transition`),
records its host and pid on the trial, and tells the result: COMPLETE with the
metric, or FAIL with ``status`` ``diverged`` or ``failed`` (and the error). A worker killed mid-trial leaves its trial
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

Passwords: no password is written to disk or into the database. study.json
keeps the URL without it; at run time it comes from ``--storage`` given again,
from ``LSTM_LAB_STORAGE`` (a full URL, used when it names the same database),
or from libpq's ``PGPASSWORD`` / ``~/.pgpass``; messages show it as ``***``.
``lstm-lab sweep --workers N`` hands its URL to its workers in
``LSTM_LAB_STORAGE``, not on their command line.

Reading a study (``status``, ``report``, ``trials``, ``curves``, a worker
joining) never writes a schema: a database without Optuna's tables is an
error ("the database is empty or not a study database").
"""

from __future__ import annotations

import contextlib
import hashlib
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

from lstm_lab._hints import error_message
from lstm_lab._io import FileLock, atomic_json as _atomic_json, read_jsonl
from lstm_lab.sweep.study import Study, StudyError

__all__ = ["open_study", "prepare_study", "run_worker", "sweep", "study_status", "format_status", "load_trials",
           "load_curves", "StudyConflictError", "StorageError", "default_storage_url", "study_dir_info", "masked_url",
           "without_password", "trial_line", "trials_digest"]

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
STORAGE_ENV = "LSTM_LAB_STORAGE"  # a storage URL with its password, for a study.json that stores it without
STUDY_JSON_FORMAT = 2  # 2: storage stored without a password; an SQLite file in the study directory by relative path


def default_storage_url(study_dir) -> str:
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


def _sqlite_path(url: str) -> pathlib.Path | None:
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


def _absolute_sqlite(url: str) -> str:
    """A relative SQLite path given on the command line is relative to the current directory: make it absolute."""
    path = _sqlite_path(url)
    if path is None or path.is_absolute():
        return url
    return _url(url).set(database=str(path.absolute())).render_as_string(hide_password=False)


def _url_for_disk(url: str, study_dir) -> str:
    """What study.json stores: an SQLite file inside the study directory by a path relative to it (a copied or
    moved study directory uses its own database); any other URL without its password."""
    path = _sqlite_path(url)
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


def _runtime_url(stored: str, study_dir, legacy: bool = False) -> str:
    """The URL a study directory's study.json stands for, here and now.

    * A relative SQLite path is relative to the study directory.
    * ``legacy`` (a study.json from before relative paths): an absolute SQLite path that is not this
      directory's ``study.db``, while this directory has its own ``study.db``, is a copied or moved study
      directory: its own database is used (never the original's).
    * A URL stored without its password gets it from ``LSTM_LAB_STORAGE`` when that names the same database
      (else libpq's ``PGPASSWORD`` / ``~/.pgpass`` supply it; psycopg reads them itself).
    """
    sd = pathlib.Path(study_dir)
    path = _sqlite_path(stored)
    if path is not None:
        if not path.is_absolute():
            return _url(stored).set(database=str((sd / path).absolute())).render_as_string(hide_password=False)
        own = (sd / "study.db").absolute()
        if legacy and path != own and own.is_file():
            return default_storage_url(sd)
        return stored
    u = _url(stored)
    if u is not None and u.password is None and u.get_backend_name() != "sqlite":
        env = os.environ.get(STORAGE_ENV)
        if env and _same_database(env, stored):
            return env
    return stored


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


def _storage_error(e: BaseException, shown: str) -> StorageError:
    """A one-line StorageError for an exception raised while connecting to ``shown`` (a masked URL)."""
    import optuna

    if isinstance(e, ImportError):
        hint = " (pip install 'psycopg[binary]', or lstm_lab[postgres])" if "psycopg" in str(e) else ""
        return StorageError(f"storage {shown!r} cannot be used: {type(e).__name__}: {e}{hint}")
    if isinstance(e, optuna.exceptions.StorageInternalError):
        return StorageError(f"storage {shown!r} cannot be reached: {_first_line(e.__cause__ or e)}")
    return StorageError(f"storage {shown!r} cannot be used: {type(e).__name__}: {_first_line(e)}")


def _creation_race(e: BaseException) -> bool:
    """Another process created Optuna's tables at the same moment (``table studies already exists``)."""
    text = str(getattr(e, "orig", None) or e).lower()
    return "already exists" in text or "duplicate key" in text or "unique constraint" in text


OPTUNA_TABLES = ("studies", "trials", "version_info")


def _empty_database(shown: str) -> StorageError:
    return StorageError(f"storage {shown!r}: the database is empty or not a study database (no Optuna tables); "
                        f"restore it from a backup, or plan the study again with `lstm-lab sweep <study file> "
                        f"--dir <study dir> --force`.")


def _check_schema(url: str) -> None:
    """Raise StorageError unless ``url`` holds Optuna's tables. Creates nothing (not even an SQLite file):
    a study opened for reading never gets a fresh schema written into it."""
    import sqlalchemy as sa
    import sqlalchemy.exc

    shown = masked_url(url)
    path = _sqlite_path(url)
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


def _storage(url: str, *, create: bool = True):
    """Optuna's RDB storage at ``url``. ``create``: make Optuna's tables in a new database (planning a
    study); otherwise (reading, or a worker joining) a database without them is an error and nothing is
    written into it."""
    import optuna
    import sqlalchemy.exc

    if url.startswith("sqlite:///"):
        path = pathlib.Path(url[len("sqlite:///"):])
        if not path.parent.is_dir():
            raise StorageError(f"storage {masked_url(url)!r}: the directory {str(path.parent)!r} does not exist.")
    shown = masked_url(url)
    if not create:
        _check_schema(url)
    import inspect

    extra = {}
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
    work from any machine that reaches the database). ``info["storage"]`` is the URL to use here: ``storage``
    if given, else the stored one resolved (see :func:`_runtime_url`)."""
    path = pathlib.Path(study_dir) / "study.json"
    if path.exists():
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise StudyError(f"{str(path)!r} cannot be read ({_first_line(e)}); restore it, or plan the study "
                             f"again with `lstm-lab sweep <study file> --dir {study_dir} --force`.") from None
        info.pop("source_text", None)  # written by older versions; never used
        info["storage"] = storage or _runtime_url(info["storage"], study_dir,
                                                  legacy=info.get("format", 1) < STUDY_JSON_FORMAT)
        return info
    if storage is None:
        raise FileNotFoundError(f"{str(study_dir)!r} is not a study directory (no study.json); "
                                f"run `lstm-lab sweep <study file> --dir {study_dir}` first, or pass --storage URL "
                                f"to read a study of that name from its database.")
    return _info_from_db(pathlib.Path(study_dir).name, storage)


def _info_from_db(name: str, url: str) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _quiet_optuna()
    rdb = _storage(url, create=False)
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
    _quiet_optuna()
    try:
        return optuna.load_study(study_name=info["study"]["name"], storage=_storage(url, create=False),
                                 sampler=sampler)
    except KeyError:
        raise StudyConflictError(f"storage {masked_url(url)!r} has no study named {info['study']['name']!r}.") from None


# ---------------------------------------------------------------------------
# Planning: once, atomically
# ---------------------------------------------------------------------------
PLAN_LOCK = ".plan.lock"  # in the study directory: flock-ed while a process plans the study
PLAN_ATTR = "lstm_lab_planned"  # study user attr: the digest of the planned slots, set once they are all enqueued


class _FileLock(FileLock):
    """The planning lock (:class:`~lstm_lab._io.FileLock`, waiting, saying once that it waits). A study directory
    moved aside by ``--force`` takes its lock file along: the new directory's file is then locked."""

    def __init__(self, path, *, log: Callable[[str], None] | None = None, what: str = ""):
        on_wait = (lambda: log(f"waiting for another process planning {what or pathlib.Path(path).parent}")) \
            if log is not None else None
        super().__init__(path, wait=True, on_wait=on_wait)

    def move_dir_aside(self, aside) -> None:
        """Move the locked directory to ``aside`` and hold the lock of a fresh one at the old path (the old
        lock is released only then: a process waiting on it finds the new directory's lock held)."""
        old, self.fd = self.fd, None
        shutil.move(str(self.path.parent), str(aside))
        self.acquire()
        if old is not None:
            os.close(old)


@contextlib.contextmanager
def _db_plan_lock(rdb, name: str, study_dir: pathlib.Path, log: Callable[[str], None]):
    """Held while a study is planned, on the database side: planners that share a database but not a study
    directory (PostgreSQL/MySQL from several machines, or one SQLite file from several study directories)
    plan one at a time. PostgreSQL: an advisory lock; MySQL: ``GET_LOCK``; SQLite outside the study
    directory: a lock file beside the database. Other databases get no lock: there the plan marker and the
    slots, read again right before enqueueing, narrow the race to the moment between that read and the
    enqueueing (two planners started within it could enqueue a slot twice; a slot's latest trial then
    counts, the other stays WAITING and is run once more)."""
    import sqlalchemy as sa

    backend = rdb.engine.url.get_backend_name()
    key = int.from_bytes(hashlib.sha256(f"lstm_lab plan {name}".encode()).digest()[:8], "big", signed=True)
    if backend == "postgresql":
        with rdb.engine.connect() as conn:
            if not conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
                log(f"waiting for another process planning study {name!r} (a lock in the database)")
                conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            conn.commit()
            try:
                yield
            finally:
                try:
                    conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()
                except Exception:  # noqa: BLE001 - a lost connection released its locks
                    conn.invalidate()
        return
    if backend in ("mysql", "mariadb"):
        lock_name = f"lstm_lab_plan_{key & 0xFFFFFFFFFFFF:x}"
        with rdb.engine.connect() as conn:
            conn.execute(sa.text("SELECT GET_LOCK(:n, 3600)"), {"n": lock_name})
            try:
                yield
            finally:
                try:
                    conn.execute(sa.text("SELECT RELEASE_LOCK(:n)"), {"n": lock_name})
                except Exception:  # noqa: BLE001
                    conn.invalidate()
        return
    path = _sqlite_path(rdb.url) if backend == "sqlite" else None
    if path is not None and path.absolute().parent != study_dir.absolute():
        with _FileLock(path.absolute().with_name(path.name + PLAN_LOCK), log=log, what=f"study {name!r}"):
            yield
        return
    yield  # the study directory's lock covers its own study.db


def _plan_digest(plan: list[dict]) -> str:
    return hashlib.sha256("\n".join(sorted(p["slot"] for p in plan)).encode()).hexdigest()[:16]


def prepare_study(study: Study, study_dir, *, storage: str | None = None, force: bool = False,
                  log: Callable[[str], None] = print):
    """Create (or reopen) the study in its directory and database; enqueue every planned trial not yet there.

    Planning happens once, however many processes start at the same moment: it runs under a lock on the
    study directory (``.plan.lock``) and one on the database side (:func:`_db_plan_lock`), and ends with
    the plan's digest stored on the study (``lstm_lab_planned``); a planner that finds its own plan's digest
    there enqueues nothing (a plan that grew is compared slot by slot and only the new slots are enqueued).

    Refuses a directory or database that holds a different study unless ``force`` (a directory is then moved
    aside; a database study deleted), and a study directory whose database was emptied (unless ``force``).
    Nothing is written when the storage cannot be reached. study.json never holds a password.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _quiet_optuna()
    sd = pathlib.Path(study_dir)
    record, fp = study.record(), study.fingerprint()
    rdb = None
    if storage is not None:  # an explicit URL: reach it before writing anything
        storage = _absolute_sqlite(storage)
        rdb = _storage(storage)
    with _FileLock(sd / PLAN_LOCK, log=log, what=f"study {study.name!r} in {sd}") as lock:
        existing = sd / "study.json"
        if existing.exists():
            old = study_dir_info(sd)
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
                lock.move_dir_aside(aside)
                log(f"moved the previous study (it differed in {', '.join(diff)}) to {aside}")
            elif storage is None:
                storage = old["storage"]
                try:
                    _check_schema(storage)  # study.json says the study is there: never plan into an emptied database
                except StorageError:
                    if not force:
                        raise
                    bad = _sqlite_path(storage)
                    if bad is not None and bad.exists():  # --force: start over; the broken file is kept aside
                        aside = bad.with_name(f"{bad.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
                        bad.rename(aside)
                        log(f"moved the empty or broken database aside to {aside}")
        url = storage or default_storage_url(sd)
        if rdb is None or storage != url:
            rdb = _storage(url)
        with _db_plan_lock(rdb, study.name, sd, log):
            ostudy = _plan(study, sd, rdb, url, record, fp, force, log)
    return ostudy


def _plan(study: Study, sd: pathlib.Path, rdb, url: str, record: dict, fp: str, force: bool, log):
    import optuna

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
        ostudy.set_user_attr("lstm_lab_source", study.source)  # for information only: never read back as code
        ostudy.set_user_attr("lstm_lab_population", study.population)
        ostudy.set_user_attr("lstm_lab_fingerprint", fp)
        ostudy.set_user_attr("lstm_lab_study", json.loads(json.dumps(record, default=str)))
        ostudy.set_user_attr("lstm_lab_params", study.describe_params())
    _atomic_json(sd / "study.json", {"format": STUDY_JSON_FORMAT, "fingerprint": fp, "storage": _url_for_disk(url, sd),
                                     "source": study.source, "population": study.population,
                                     "study": record, "params": study.describe_params()})
    plan = study.plan()
    digest = _plan_digest(plan)
    if ostudy.user_attrs.get(PLAN_ATTR) == digest:
        return ostudy  # planned already (by this command earlier, or by another process a moment ago)
    have = {t.user_attrs.get("slot") for t in ostudy.get_trials(deepcopy=False)}  # read again, under the locks
    todo = [p for p in plan if p["slot"] not in have]
    for p in todo:
        ostudy.enqueue_trial(p["params"], user_attrs={"slot": p["slot"], "variant": p["variant"],
                                                      "seed": p["seed"], "index": p["index"]})
    ostudy.set_user_attr(PLAN_ATTR, digest)
    if todo:
        log(f"study {study.name!r}: planned {len(todo)} trials in {masked_url(url)}")
    return ostudy


def attach_study(study: Study, study_dir, storage: str, log: Callable[[str], None] = print) -> None:
    """A worker joining a study that ``lstm-lab sweep`` planned in ``storage`` from another machine:
    check the stored study is this one and write the local ``study.json`` (without the password).
    Plans nothing."""
    info = _info_from_db(study.name, storage)
    if info["fingerprint"] != study.fingerprint():
        raise StudyConflictError(f"storage {masked_url(storage)!r}: study {study.name!r} was planned from a different "
                                 f"study file ({info.get('source')}); this worker's {study.source} differs. "
                                 f"Workers must run the same study file.")
    sd = pathlib.Path(study_dir)
    sd.mkdir(parents=True, exist_ok=True)
    _atomic_json(sd / "study.json", {**info, "format": STUDY_JSON_FORMAT, "storage": _url_for_disk(storage, sd)})
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
        if not _transition(ostudy, trial._trial_id, TrialState.RUNNING, TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    _enqueue_retry(ostudy, trial)
    return True


def _transition(ostudy, trial_id: int, old, new) -> bool:
    """Move a trial from state ``old`` to ``new`` if it is still in ``old``; whether this call did it.

    One conditional ``UPDATE ... WHERE state = old``: a compare-and-set that holds on every database.
    (Optuna's ``set_trial_state_values`` reads the state, then writes it; its ``SELECT ... FOR UPDATE``
    locks nothing on SQLite, whose driver starts the transaction only at the write, so two workers could
    both take one WAITING trial and run it twice.)"""
    import datetime

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


def _finish(ostudy, study: Study, trial, summary: dict | None, error: str | None, log) -> dict:
    """Record a trial's outcome in the database (retrying while it is unreachable); returns
    ``{"status", "value", "error"}`` (``error``: what was recorded for a failed or diverged trial)."""
    import optuna

    def record():
        try:
            return _record_outcome(ostudy, study, trial, summary, error)
        except optuna.exceptions.UpdateFinishedTrialError:  # a retry after the outcome did land
            t = ostudy._storage.get_trial(trial._trial_id)
            return {"status": _status_of(t), "value": t.value, "error": t.user_attrs.get("error")}

    return _retrying(record, f"recording the outcome of trial {trial.number}", log)


def _record_outcome(ostudy, study: Study, trial, summary: dict | None, error: str | None) -> dict:
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
        error = error[-4000:]
    elif summary.get("status") == "diverged" or value is None:
        status = "diverged"
        error = summary.get("reason") or f"{study.metric} is not finite"
    else:
        status = "complete"
    if error is not None:
        s.set_trial_user_attr(tid, "error", error)
    s.set_trial_user_attr(tid, "status", status)
    if status == "complete":
        ostudy.tell(trial, value)
    else:
        ostudy.tell(trial, state=TrialState.FAIL)
    return {"status": status, "value": value if status == "complete" else None, "error": error}


def _history(workdir: pathlib.Path) -> list[dict]:
    return read_jsonl(workdir / "metrics.jsonl", kinds=("valid",))


def _error_text(e: BaseException) -> str:
    """What a failed trial records: ``Type: message`` on the first line, then the traceback."""
    return f"{type(e).__name__}: {error_message(e)}\n{traceback.format_exc(limit=8)}"


def _run_solo(ostudy, study: Study, study_dir: pathlib.Path, trial, variant, hyper, log) -> dict:
    from lstm_lab import training

    seed = int(trial.user_attrs["seed"])
    wd = _workdir(study_dir, trial)
    _retrying(lambda: ostudy._storage.set_trial_user_attr(trial._trial_id, "workdir", str(wd)), "recording a trial",
              log)
    summary, error = None, None
    t0 = time.monotonic()
    try:
        cfg = study.config_for(variant, hyper, seed)
        summary = training.train(cfg, wd, quiet=True, log=lambda m: None)
        summary = {**summary, "history": _history(wd)}
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - recorded with the trial; the sweep goes on
        error = _error_text(e)
    return {**_finish(ostudy, study, trial, summary, error, log), "wall": time.monotonic() - t0}


def _run_population(ostudy, study: Study, study_dir: pathlib.Path, members, log) -> list[dict]:
    from lstm_lab.population import train_population

    cfgs, wds = [], []
    for trial, variant, hyper in members:
        wd = _workdir(study_dir, trial)
        _retrying(lambda: ostudy._storage.set_trial_user_attr(trial._trial_id, "workdir", str(wd)),
                  "recording a trial", log)
        cfgs.append(study.config_for(variant, hyper, int(trial.user_attrs["seed"])))
        wds.append(wd)
    t0 = time.monotonic()
    try:
        summaries = train_population(cfgs, wds, quiet=True)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001
        err = _error_text(e)
        return [{**_finish(ostudy, study, m[0], None, err, log), "wall": time.monotonic() - t0} for m in members]
    wall = time.monotonic() - t0
    return [{**_finish(ostudy, study, m[0], {**s, "history": _history(wd)}, None, log), "wall": wall}
            for m, s, wd in zip(members, summaries, wds)]


def _first_error_line(error, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(error or "").splitlines() if ln.strip()]
    line = lines[0] if lines else "no error recorded"
    return line if len(line) <= limit else line[:limit - 3] + "..."


def trial_line(number: int, slot: str, outcome: dict, metric: str) -> str:
    """``trial 3 vanilla/0003: complete test.loss=0.0123 (12.3 s)``; a failed or diverged trial shows the
    first line of its error."""
    wall = outcome.get("wall")
    took = f" ({wall:.1f} s)" if isinstance(wall, (int, float)) else ""
    st = outcome["status"]
    if st == "complete":
        return f"trial {number} {slot}: complete {metric}={outcome['value']:.4g}{took}"
    return f"trial {number} {slot}: {st}{took}: {_first_error_line(outcome.get('error'))}"


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
            self.every = _env_seconds("LSTM_LAB_PROGRESS_SECONDS", PROGRESS_SECONDS)
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


def run_worker(study: Study, study_dir, *, storage: str | None = None, population: int = 1,
               max_trials: int | None = None, log: Callable[[str], None] = print, progress: bool = True,
               wait: bool = True) -> dict:
    """Pull WAITING trials of the study until none is left; returns counts of what this worker ran.

    With ``wait`` (the default) a worker that finds nothing to pop stays while other workers' trials
    are RUNNING, and takes over any whose worker died (dead pid here, or a stale heartbeat); it
    returns when every planned trial has an outcome. ``progress``: a bar on a terminal, else a progress
    line every 30 s (see :class:`_Progress`); every message goes through ``log``."""
    from optuna.trial import TrialState

    from lstm_lab.population import population_key

    sd = pathlib.Path(study_dir)
    if not (sd / "study.json").exists() and storage is not None:
        attach_study(study, sd, storage, log)
    info = study_dir_info(sd, storage)
    if info["fingerprint"] != study.fingerprint():
        raise StudyConflictError(f"{str(sd)!r} holds a different study than {study.source or study.name!r}.")
    ostudy = open_study(sd, storage, sampler=study.sampler())
    stored = _retrying(lambda: ostudy.user_attrs.get("lstm_lab_fingerprint"), "reading the study", log)
    if stored is not None and stored != study.fingerprint():
        raise StudyConflictError(f"storage {masked_url(storage or info['storage'])!r}: study {study.name!r} was "
                                 f"planned from a different study file than {study.source or study.name!r}.")
    counts: dict[str, int] = {}
    prog = _Progress(f"study {study.name}", log, lambda: study_status(sd, storage=storage, ostudy=ostudy),
                     enabled=progress)
    say = prog.say
    ran, waited = 0, False
    kill_trial, _, kill_step = os.environ.pop(DEBUG_KILL_TRIAL_ENV, "").partition(":")
    poll = min(5.0, max(0.5, heartbeat_interval() / 2))
    pop_keys: dict = {}
    try:
        while max_trials is None or ran < max_trials:
            if kill_trial and ran == int(kill_trial):
                from lstm_lab.training import DEBUG_KILL_ENV

                os.environ[DEBUG_KILL_ENV] = kill_step
            _retrying(lambda: reclaim_orphans(ostudy, say), "looking for orphaned trials", say)
            k = population if max_trials is None else min(population, max_trials - ran)
            trials = _retrying(lambda: _pop(ostudy, study, k, pop_keys), "taking trials", say)
            if not trials:
                running = _retrying(lambda: ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,)),
                                    "reading the study", say)
                if not wait or not running:
                    break
                if not waited:
                    say(f"nothing waiting; {len(running)} trial(s) running elsewhere: waiting for them "
                        f"(an orphan is taken over when its heartbeat is {grace_period()} s stale)")
                    waited = True
                time.sleep(poll)
                continue
            waited = False
            with _Heartbeat(ostudy, [t._trial_id for t in trials]):
                try:
                    members = [(t, *_retrying(lambda t=t: _suggest(t, study), "reading a trial", say))
                               for t in trials]
                    groups: dict = {}
                    for m in members:
                        cfg = study.config_for(m[1], m[2], 0)
                        groups.setdefault(population_key(cfg), []).append(m)
                    for group in groups.values():
                        if len(group) == 1:
                            outcomes = [_run_solo(ostudy, study, sd, *group[0], say)]
                        else:
                            outcomes = _run_population(ostudy, study, sd, group, say)
                        for m, out in zip(group, outcomes):
                            counts[out["status"]] = counts.get(out["status"], 0) + 1
                            ran += 1
                            say(trial_line(m[0].number, m[0].user_attrs["slot"], out, study.metric))
                        prog.update()
                except (KeyboardInterrupt, SystemExit):
                    for t in trials:  # hand the unfinished ones back: the next run retries them
                        fresh = ostudy._storage.get_trial(t._trial_id)
                        if fresh.state == TrialState.RUNNING:
                            _requeue(ostudy, fresh, "interrupted", "interrupted (KeyboardInterrupt)")
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
        env[STORAGE_ENV] = storage
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


def _dead_reason(t, host: str, stale: set) -> str | None:
    """Why a RUNNING trial's worker is known dead (its pid is gone on this host; or, run elsewhere, its
    heartbeat is stale); None while it may be alive."""
    ua = t.user_attrs
    alive = _owner_alive_here(ua, host)
    if alive is False:
        return f"worker pid {ua['pid']} on {host} is gone"
    if alive is None and t._trial_id in stale:
        return f"no heartbeat for over {grace_period()} s from its worker on {ua.get('host', 'an unknown host')}"
    return None


def _stale_ids(ostudy) -> set:
    storage = ostudy._storage
    if not hasattr(storage, "_get_stale_trial_ids") or not getattr(storage, "get_heartbeat_interval", lambda: None)():
        return set()
    return set(storage._get_stale_trial_ids(ostudy._study_id))


def study_status(study_dir, *, storage: str | None = None, ostudy=None) -> dict:
    """Per variant: ``planned``, ``done`` (= ``complete`` + ``failed``), ``running``, ``dead`` (running, but its
    worker is gone: the next worker takes it over), ``waiting``, ``failed`` (raised or diverged; ``diverged``
    counts the latter), the ``best`` value so far; the same totals, an ETA, ``failed_trials`` (number, slot,
    status, the first line of the error) and ``dead_trials`` (number, slot, why)."""
    info = study_dir_info(study_dir, storage)
    ostudy = ostudy or open_study(study_dir, storage)
    rec = info["study"]
    sign = 1 if rec["direction"] == "minimize" else -1
    variants: dict[str, dict] = {(v if isinstance(v, str) else v["name"]): None for v in rec["variants"]}
    walls, failed_trials, dead_trials = [], [], []
    host, stale = _host(), None
    for slot, t in sorted(_slot_trials(ostudy).items()):
        name = t.user_attrs.get("variant", slot.split("/")[0])
        if variants.get(name) is None:
            variants[name] = {"planned": 0, "complete": 0, "failed": 0, "diverged": 0, "running": 0, "dead": 0,
                              "waiting": 0, "best": None}
        v = variants[name]
        v["planned"] += 1
        st = _status_of(t)
        key = {"interrupted": "waiting"}.get(st, st)  # an interrupted slot's retry is waiting (or about to be)
        if key == "running":
            stale = _stale_ids(ostudy) if stale is None else stale
            why = _dead_reason(t, host, stale)
            if why:
                key = "dead"
                dead_trials.append({"number": t.number, "slot": slot, "variant": name, "why": why})
        if key in ("failed", "diverged"):
            failed_trials.append({"number": t.number, "slot": slot, "variant": name, "status": st,
                                  "error": _first_error_line(t.user_attrs.get("error"))})
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
                                                               "running", "dead", "waiting")}
    done = tot["done"]
    left = tot["planned"] - done
    workers = max(1, tot["running"])
    eta = (sum(walls) / len(walls)) * left / workers if walls and left else (0.0 if not left else None)
    bests = [v["best"] for v in variants.values() if v["best"] is not None]
    best = (min(bests) if sign > 0 else max(bests)) if bests else None
    return {"study": rec["name"], "metric": rec["metric"], "direction": rec["direction"],
            "storage": masked_url(storage or info["storage"]),
            "variants": variants, **tot, "best": best,
            "eta_seconds": eta, "failed_trials": failed_trials, "dead_trials": dead_trials}


def format_status(st: dict, *, failed: bool = False) -> str:
    """The status table; trials whose worker is dead are listed; ``failed``: every failed or diverged trial
    with the first line of its error."""
    dead = st.get("dead", 0)
    head = ["variant", "planned", "complete", "running"] + (["dead"] if dead else []) + \
        ["waiting", "failed", "(diverged)", f"best {st['metric']}"]

    def row(name, v):
        return [name, v["planned"], v["complete"], v["running"]] + ([v.get("dead", 0)] if dead else []) + \
            [v["waiting"], v["failed"], v["diverged"], "-" if v["best"] is None else f"{v['best']:.4g}"]

    rows = [head] + [row(name, v) for name, v in st["variants"].items()] + [row("total", st)]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    eta = st["eta_seconds"]
    eta_s = "done" if eta == 0 else ("unknown" if eta is None else f"{eta / 60:.1f} min at the current worker count")
    out = f"study {st['study']} ({st['storage']})\n" + "\n".join(lines) + f"\nETA: {eta_s}"
    if st.get("dead_trials"):
        out += "\n" + "\n".join(f"trial {d['number']} {d['slot']}: running (worker dead): {d['why']}; the next "
                                f"`lstm-lab sweep` or `lstm-lab worker` on this study takes it over"
                                for d in st["dead_trials"])
    if failed:
        ft = st.get("failed_trials", [])
        out += f"\nfailed trials: {len(ft)}" + "".join(f"\n  trial {f['number']} {f['slot']}: {f['status']}: "
                                                      f"{f['error']}" for f in ft)
    return out


def trials_digest(ostudy=None, trials=None) -> str:
    """A digest of every trial's number, state, status and value: a report is rewritten only when it changed."""
    trials = ostudy.get_trials(deepcopy=False) if trials is None else trials
    h = hashlib.sha256()
    for t in sorted(trials, key=lambda t: t.number):
        h.update(f"{t.number}:{t.state.name}:{t.user_attrs.get('status')}:{t.value!r}\n".encode())
    return h.hexdigest()[:16]


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
