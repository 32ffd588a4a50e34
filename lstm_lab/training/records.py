"""A run's records and its workdir: metrics.jsonl (+ TensorBoard), config.json (the run record), the evaluation
bookkeeping and the stop rules (divergence, early stop, time limit, Ctrl-C), summary.json, and the workdir's lock and
conflicts. A population member keeps exactly the records of a solo run (:class:`Member`).

The workdir rules (see :mod:`lstm_lab.training`): one process per workdir (:class:`WorkdirLock`); a different
config there is refused (:class:`RunConflictError`) unless ``force`` or that run failed before its first checkpoint
(moved aside to ``replaced-<time>``); ``metrics.jsonl`` holds one record per (kind, step), also after a resume.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import threading
import time

import jax
import numpy as np

import lstm_lab
from lstm_lab._io import FileLock, LockBusy, as_json, atomic_json, json_default
from lstm_lab.config import Config, cell_from_config, to_dict
from lstm_lab.distributed import is_primary
from lstm_lab.training.checkpoints import checkpoint_steps

STATUSES = ("completed", "diverged", "stopped_early", "failed")
LOCK_FILE = ".lock"


class WorkdirError(RuntimeError):
    """A run directory that cannot be used as asked; the message is one line (the CLI prints it, exit 2)."""


class RunConflictError(WorkdirError):
    """The workdir holds a different run."""


class WorkdirBusyError(WorkdirError):
    """Another process holds the workdir's lock."""


class WorkdirNotWritableError(WorkdirError):
    """The workdir cannot be created or written."""


class CheckpointCorruptError(WorkdirError):
    """The workdir has checkpoints, but none of them is intact."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT stopped a run. ``step``: where it stopped; ``checkpoint_step``: where a resume starts (None: from
    scratch). ``str()`` is the one-line message."""

    def __init__(self, workdir, step: int, checkpoint_step: int | None):
        self.workdir, self.step, self.checkpoint_step = str(workdir), step, checkpoint_step
        if checkpoint_step == step:
            msg = f"interrupted at step {step} (checkpoint saved); run the same command to resume"
        elif checkpoint_step:
            msg = (f"interrupted at step {step}; run the same command to resume (it restarts from the last "
                   f"checkpoint at step {checkpoint_step})")
        else:
            msg = f"interrupted at step {step}, before the first checkpoint; run the same command to start again"
        super().__init__(msg)


def _finite(d: dict | None) -> dict | None:
    if d is None:
        return None
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=pathlib.Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Metrics:
    """metrics.jsonl plus TensorBoard events (when tensorboardX, the ``tensorboard`` extra, is installed)."""

    def __init__(self, workdir: pathlib.Path):
        self.file = open(workdir / "metrics.jsonl", "a") if is_primary() else open(os.devnull, "w")
        self.tb = None
        if not is_primary():  # multi-host: process 0 keeps the records
            return
        try:  # the `tensorboard` extra
            from tensorboardX import SummaryWriter
        except ImportError:
            return
        self.tb = SummaryWriter(str(workdir))

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(_finite(record), default=json_default) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def run_record(cfg: Config, **extra) -> dict:
    """What ``config.json`` holds: the config, cell spec, seed, versions, git commit, time (plus ``extra``)."""
    spec = cell_from_config(cfg.model.cell)
    return {"config": to_dict(cfg), "cell_spec": spec.flags(), "cell_name": spec.name, "seed": cfg.train.seed,
            "lstm_lab_version": lstm_lab.__version__, "git_commit": _git_commit(), "jax_version": jax.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}


def fresh_meta() -> dict:
    """A new run's bookkeeping (a checkpoint's metadata holds it; see :class:`Member`)."""
    return {"step": 0, "lr_scale": 1.0, "best_valid": None, "best_step": None, "bad_evals": 0, "plateau_bad": 0,
            "history": [], "wall_seconds": 0.0, "status": None, "reason": None, "diverged_at": None, "end_step": None}


class Member:
    """One run's records, evaluation bookkeeping and stop rules: a solo run has one, a population one per member,
    so a member writes exactly what its solo run writes.

    ``meta`` (saved in every checkpoint) holds the validation history, the best result and its step, the
    early-stopping and plateau counters, the plateau's learning-rate scale, and once the member stops, its
    ``status``, ``reason`` and ``end_step`` (a population goes on computing a stopped member; its records end).
    """

    def __init__(self, cfg: Config, wd: pathlib.Path, *, population: int | None = None):
        self.cfg, self.wd, self.population = cfg, wd, population
        self.meta = fresh_meta()
        self.metrics: Metrics | None = None

    @property
    def active(self) -> bool:
        return self.meta["status"] is None

    def open(self, step: int) -> None:
        """Start writing records at ``step`` (a resume first cuts metrics.jsonl back to it)."""
        if is_primary():
            truncate_metrics(self.wd / "metrics.jsonl", step)
        self.metrics = Metrics(self.wd)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def stop(self, status: str, reason: str, step: int) -> None:
        self.meta.update(status=status, reason=reason, end_step=step)

    def log_train(self, step: int, steps: list[int], losses: np.ndarray, rate: float) -> None:
        """The training losses of ``steps`` (since the last record): a record of their mean, or the divergence at
        the first that is not finite (the member stops)."""
        bad = np.flatnonzero(~np.isfinite(losses))
        if bad.size:
            at = int(steps[bad[0]])
            self.meta["diverged_at"] = at
            self.stop("diverged", f"non-finite training loss at step {at}", step)
            self.metrics.write({"kind": "diverged", "step": at})
            return
        rec = {"kind": "train", "step": step, "loss": float(losses.mean()), "tokens_per_s": rate,
               "lr_scale": self.meta["lr_scale"]}
        self.metrics.write(rec if self.population is None else {**rec, "population": self.population})

    def log_valid(self, step: int, valid: dict) -> tuple[bool, float]:
        """Book one validation result: ``(improved on the best, learning-rate factor)`` (the plateau schedule's
        decay when validation stalled, else 1.0)."""
        meta, ocfg = self.meta, self.cfg.optim
        self.metrics.write({"kind": "valid", "step": step, **valid})
        meta["history"].append({"step": step, **valid})
        if meta["best_valid"] is None or valid["loss"] < meta["best_valid"]:
            meta.update(best_valid=valid["loss"], best_step=step, bad_evals=0, plateau_bad=0)
            return True, 1.0
        meta["bad_evals"] += 1
        meta["plateau_bad"] += 1
        if ocfg.schedule == "plateau" and meta["plateau_bad"] >= ocfg.decay_patience:
            meta["lr_scale"] *= ocfg.decay_factor
            meta["plateau_bad"] = 0
            return False, ocfg.decay_factor
        return False, 1.0

    def check_stops(self, step: int, out_of_time: bool) -> None:
        """After an evaluation: early stopping, then the time limit."""
        t = self.cfg.train
        if t.early_stop_patience and self.meta["bad_evals"] >= t.early_stop_patience:
            self.stop("stopped_early", f"no validation improvement in {self.meta['bad_evals']} evaluations "
                                       f"(best at step {self.meta['best_step']})", step)
        elif out_of_time:
            self.stop("stopped_early", f"time limit of {t.max_minutes} minutes", step)

    def finish(self, task, info: dict, step: int, wall: float, valid, test, devices: int, **extra) -> dict:
        """Write the test record and ``summary.json``; return the summary."""
        if test is not None:
            self.metrics.write({"kind": "test", "step": self.meta["best_step"], **test})
        self.close()
        m = self.meta
        if self.population is not None:
            extra["population"] = self.population
        return run_summary(self.cfg, task, info, self.wd, status=m["status"] or "completed", reason=m["reason"],
                           steps=step if m["end_step"] is None else m["end_step"], diverged_at=m["diverged_at"],
                           best_step=m["best_step"], wall=wall, valid=valid, test=test, devices=devices, **extra)


def run_summary(cfg: Config, task, info: dict, wd: pathlib.Path, *, status, reason, steps, diverged_at, best_step,
                wall, valid, test, devices: int, **extra) -> dict:
    """The summary of a finished run (``summary.json``), written atomically and returned."""
    summary = {"status": status, "reason": reason, "steps": steps, "diverged_at_step": diverged_at,
               "best_step": best_step, "wall_seconds": wall,
               "valid": _finite(valid) or {"loss": None}, "test": _finite(test) or {"loss": None},
               "baseline": task.baseline, "task": info["name"], "cell": cell_from_config(cfg.model.cell).name,
               "seed": cfg.train.seed, "devices": devices, "workdir": str(wd), **extra}
    if jax.process_count() > 1:
        summary["processes"] = jax.process_count()
    if is_primary():
        atomic_json(wd / "summary.json", summary)
    return summary


class WorkdirLock(FileLock):
    """The exclusive lock on ``<workdir>/.lock`` held while a run trains there (a :class:`~lstm_lab._io.FileLock`
    that does not wait): a second process gets :class:`WorkdirBusyError` naming the holder's pid; the kernel
    releases it when the holder exits or is killed. Multi-host: only process 0 locks (all share the workdir)."""

    def __init__(self, workdir):
        self.workdir = pathlib.Path(workdir)
        super().__init__(self.workdir / LOCK_FILE, wait=False)

    def acquire(self) -> "WorkdirLock":
        if self.fd is not None or not is_primary():
            return self
        try:
            super().acquire()
        except LockBusy as e:
            raise WorkdirBusyError(f"workdir {str(self.workdir)!r} is in use by pid {e.holder} (lock {self.path}); "
                                   f"wait for it or use another --workdir") from None
        except OSError as e:
            raise not_writable(self.workdir, e) from None
        if not os.access(self.workdir, os.W_OK | os.X_OK):
            self.release()
            raise not_writable(self.workdir, PermissionError(errno.EACCES, "Permission denied", str(self.workdir)))
        return self


def not_writable(workdir: pathlib.Path, e: OSError) -> WorkdirNotWritableError:
    what = f"{e.strerror or e}" + (f": {e.filename}" if getattr(e, "filename", None) else "")
    return WorkdirNotWritableError(f"workdir {str(workdir)!r} is not writable ({what}); fix its permissions or use "
                                   f"another --workdir")


def is_not_writable(e: BaseException, workdir: pathlib.Path) -> bool:
    """An OSError from writing into ``workdir`` (permissions, read-only filesystem)."""
    if not isinstance(e, OSError) or e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
        return False
    try:
        return pathlib.Path(e.filename or "").absolute().is_relative_to(workdir.absolute())
    except (TypeError, ValueError):
        return False


def move_aside(workdir: pathlib.Path, why: str, log) -> None:
    """Move everything in ``workdir`` (but its lock and earlier replaced-* folders) to ``replaced-<time>``."""
    if is_primary():
        aside = workdir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        n = 1
        while aside.exists():
            n += 1
            aside = workdir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
        aside.mkdir()
        for p in list(workdir.iterdir()):
            if p != aside and p.name != LOCK_FILE and not p.name.startswith("replaced-"):
                shutil.move(str(p), aside / p.name)
        log(f"moved the previous run ({why}) to {aside}")
    _sync("lstm_lab_move_aside")


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _previous_failed_without_checkpoints(workdir: pathlib.Path) -> str | None:
    """The error of a previous attempt in ``workdir`` that failed before its first checkpoint, else None."""
    try:
        done = json.loads((workdir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(done, dict) or done.get("status") != "failed" or checkpoint_steps(workdir):
        return None
    return str(done.get("error") or "failed")


def prepare_workdir(workdir: pathlib.Path, record: dict, force: bool, log) -> None:
    """Make ``workdir`` hold ``record``'s run: a different run there is refused (RunConflictError) unless ``force``
    or it failed before its first checkpoint; then it is moved aside. The caller holds the workdir's lock."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfile = workdir / "config.json"
    if cfile.exists():
        stored = json.loads(cfile.read_text()).get("config")
        if as_json(stored) != as_json(record["config"]):
            a = {f"{s}.{k}": v for s, sec in (as_json(stored) or {}).items() for k, v in sec.items()}
            b = {f"{s}.{k}": v for s, sec in as_json(record["config"]).items() for k, v in sec.items()}
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            failed = _previous_failed_without_checkpoints(workdir)
            _sync("lstm_lab_prepare_workdir")  # every process has read the old run before process 0 moves it
            if not force and failed is None:
                raise RunConflictError(
                    f"workdir {str(workdir)!r} holds a run with a different config (differs in {', '.join(diff)}). "
                    f"Use another --workdir, or --force to move the old run aside.")
            why = f"config differed in {', '.join(diff)}"
            if failed is not None and not force:
                why = f"it failed before its first checkpoint: {failed.splitlines()[0][:200] if failed else ''}; {why}"
            move_aside(workdir, why, log)
    if is_primary():
        atomic_json(cfile, record)


def open_workdir(wd: pathlib.Path, record: dict, task, info: dict, force: bool, log) -> dict | None:
    """Make ``wd`` hold this run (:func:`prepare_workdir`) and write its task files; the summary of a run that
    already finished there (then there is nothing to do), else None. The caller holds the workdir's lock."""
    prepare_workdir(wd, record, force, log)
    summary_path = wd / "summary.json"
    if summary_path.exists() and not force:
        done = json.loads(summary_path.read_text())
        if done.get("status") in ("completed", "stopped_early", "diverged"):
            return done
    if is_primary():
        atomic_json(wd / "task.json", info)
        task.save(wd)
    return None


def load_run(workdir) -> tuple[Config, dict]:
    """The config and task info of a run directory."""
    from lstm_lab.config import from_dict

    wd = pathlib.Path(workdir)
    if not (wd / "config.json").exists():
        raise FileNotFoundError(f"{str(wd)!r} is not a run directory (no config.json).")
    cfg = from_dict(json.loads((wd / "config.json").read_text())["config"])
    return cfg, json.loads((wd / "task.json").read_text())


def truncate_metrics(path: pathlib.Path, step: int) -> None:
    """Rewrite ``metrics.jsonl`` (atomically) to its records of steps <= ``step``, one per (kind, step) and none of
    kind ``test``: what a run that starts at ``step`` has to add is then exactly what is missing."""
    if not path.exists():
        return
    keep: dict = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a torn last line
        s = rec.get("step") if isinstance(rec, dict) else None
        if isinstance(s, int) and s <= step and rec.get("kind") != "test":
            keep.pop((rec.get("kind"), s), None)
            keep[(rec.get("kind"), s)] = line
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in keep.values()))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class StopOnInterrupt:
    """While active (single-process runs, main thread, SIGINT not ignored), the first SIGINT only sets ``.set``;
    a second one raises KeyboardInterrupt at once."""

    def __init__(self, log):
        self.log, self.set, self.prev = log, False, None

    def __enter__(self):
        if (jax.process_count() == 1 and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, None)):
            self.prev = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        self.log("interrupt: stopping after this step (Ctrl-C again to stop at once)")

    def __exit__(self, *exc):
        if self.prev is not None:
            signal.signal(signal.SIGINT, self.prev)
            self.prev = None


def format_summary(s: dict) -> str:
    """The one-screen summary printed at the end of a run."""
    fmt = lambda d: ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"  # noqa: E731
                              for k, v in (d or {}).items() if k != "model")
    lines = [f"{s['status']}: {s['task']} / {s['cell']} (seed {s['seed']}) after {s['steps']} steps "
             f"in {s['wall_seconds']:.1f}s" + (f" — {s['reason']}" if s.get("reason") else ""),
             f"  best step {s['best_step']}", f"  valid: {fmt(s['valid'])}", f"  test:  {fmt(s['test'])}"]
    if s.get("baseline"):
        lines.append(f"  baseline: {fmt(s['baseline'])}")
    lines.append(f"  workdir: {s['workdir']}")
    return "\n".join(lines)


