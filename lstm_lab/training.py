"""Training: the optimizer from the config, jit-compiled steps, the fit loop, checkpoints and records.

``train(cfg, workdir)`` runs one experiment and returns its summary (the CLI
``lstm-lab train`` is a thin layer over it). A workdir holds::

    config.json        the full config, cell spec, seed, package version, git commit
    task.json          what the model needs to know of the task (sizes, kind)
    vocab.json         language models: the vocabulary built from train
    metrics.jsonl      one JSON record per log or evaluation
    events.out.tfevents.*   the same for TensorBoard (when tensorboardX is installed)
    checkpoints/last/  the most recent checkpoints (train.keep_checkpoints)
    checkpoints/best/  the checkpoint with the best validation loss
    summary.json       written atomically when the run ends
    .lock              the lock file of the process training here (see Integrity)

Determinism: training batch ``k`` is a pure function of ``(seed, k)``, the
dropout/noise key of step ``k`` is ``fold_in(key(seed), k)``, and a checkpoint
holds the parameters, optimizer state, the carry passed between language-model
windows, the step, the learning-rate scale and the evaluation history, so a
run killed and resumed ends with bitwise the metrics of an uninterrupted one
on the CPU.

Integrity:

* Checkpoints are verified. Each one's JSON metadata holds, under ``checksums``,
  the sha256 of every array's bytes with its shape and dtype (keyed like the
  arrays, by leaf position); a restore recomputes them. A checkpoint that fails
  (or cannot be read) is reported in one line and the next newest is tried:
  the older ``last`` ones, then ``best`` (a complete resume point too). Corrupt
  ones are deleted once an intact one is found; if none is intact,
  :class:`CheckpointCorruptError` (``force=True`` moves the run aside and starts
  over). Checkpoints written before checksums existed restore unverified (shape
  and dtype still checked), with a note.
* One process per workdir: ``train`` holds an exclusive ``fcntl.flock`` on
  ``<workdir>/.lock`` (the holder's pid inside) from before anything is written
  until it returns; the kernel drops it when the process dies, so a killed run
  leaves no stale lock. A second run raises :class:`WorkdirBusyError`. Multi-host:
  process 0 holds it for all.
* ``metrics.jsonl`` holds exactly one record per (kind, step): a run that starts
  or resumes at step S first rewrites the file (temp file + ``os.replace``) to the
  records of steps <= S, without ``test`` records (written again at the end).
  TensorBoard event files are appended to and may repeat steps after a resume.
* Nothing is written before the config, task, optimizer, devices and model
  (built, and one training step traced) are checked. A previous attempt that
  ``failed`` and left no checkpoint never blocks a new config (it is moved aside).
* SIGINT (Ctrl-C) in a single-process run stops after the current step, saves a
  ``last`` checkpoint there (with the not yet logged losses, so a resume stays
  exact) and raises :class:`TrainingInterrupted` (a KeyboardInterrupt); no
  ``failed`` record is written. A second Ctrl-C stops at once; the resume then
  starts from the last checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lstm_lab
from lstm_lab import tasks as tasks_lib
from lstm_lab._io import FileLock, LockBusy, atomic_json as _atomic_json, json_default as _json_default
from lstm_lab.config import OPTIMIZERS, SCHEDULES, Config, OptimConfig, to_dict  # noqa: F401 - re-exported
from lstm_lab.data.batching import prefetch
from lstm_lab.distributed import is_primary
from lstm_lab.models import SequenceModel, cell_from_config

__all__ = ["train", "build_optimizer", "make_optimizer", "load_model", "build_model", "RunConflictError", "STATUSES",
           "load_run", "sample", "WorkdirError", "WorkdirBusyError", "WorkdirNotWritableError",
           "CheckpointCorruptError", "TrainingInterrupted", "WorkdirLock"]

STATUSES = ("completed", "diverged", "stopped_early", "failed")
DEBUG_KILL_ENV = "LSTM_LAB_DEBUG_SIGKILL_AT_STEP"  # tests: SIGKILL this process after that step
DEBUG_INTERRUPT_ENV = "LSTM_LAB_DEBUG_SIGINT_AT_STEP"  # tests: SIGINT this process after that step
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


# ---------------------------------------------------------------------------
# Optimizer and model
# ---------------------------------------------------------------------------
def build_optimizer(ocfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """An ``optax.chain``: global-norm clipping, then the optimizer with its schedule.

    ``plateau`` is a constant schedule here; the fit loop multiplies the
    updates by a learning-rate scale that it lowers when validation stalls.
    (Names and ranges were checked when ``ocfg`` was made: an invalid OptimConfig cannot exist.)
    """
    return make_optimizer(ocfg, total_steps)


VMAPPABLE_OPTIM = ("learning_rate", "momentum", "b1", "b2", "weight_decay")


def make_optimizer(ocfg: OptimConfig, total_steps: int, hyper: dict | None = None) -> optax.GradientTransformation:
    """:func:`build_optimizer` without the checks; ``hyper`` may replace the numeric hyperparameters
    (:data:`VMAPPABLE_OPTIM`) with traced arrays, so that a population of trials can be vmapped over them.
    With ``hyper``, SGD and RMSprop always keep a momentum buffer (momentum 0 is then a plain step)."""
    h = {k: getattr(ocfg, k) for k in VMAPPABLE_OPTIM}
    h.update(hyper or {})
    lr = h["learning_rate"]
    if ocfg.schedule == "cosine":
        if ocfg.warmup_steps:
            lr = optax.warmup_cosine_decay_schedule(0.0, lr, ocfg.warmup_steps, max(total_steps, ocfg.warmup_steps + 1))
        else:
            lr = optax.cosine_decay_schedule(lr, max(total_steps, 1))
    elif ocfg.warmup_steps:
        lr = optax.join_schedules([optax.linear_schedule(0.0, lr, ocfg.warmup_steps), optax.constant_schedule(lr)],
                                  [ocfg.warmup_steps])
    traced = hyper is not None
    if ocfg.name == "sgd":
        momentum = h["momentum"] if traced else (h["momentum"] or None)
        opt = optax.sgd(lr, momentum=momentum, nesterov=ocfg.nesterov and (traced or h["momentum"] > 0))
    elif ocfg.name == "adam":
        opt = optax.adam(lr, b1=h["b1"], b2=h["b2"])
    elif ocfg.name == "adamw":
        opt = optax.adamw(lr, b1=h["b1"], b2=h["b2"], weight_decay=h["weight_decay"])
    else:
        opt = optax.rmsprop(lr, momentum=h["momentum"])
    parts = [optax.clip_by_global_norm(ocfg.clip_norm)] if ocfg.clip_norm > 0 else []
    return optax.chain(*parts, opt)


def build_model(cfg: Config, task_info: dict) -> SequenceModel:
    return SequenceModel(task_info["input_kind"], task_info["input_size"], task_info["output_size"], cfg.model,
                         rngs=nnx.Rngs(cfg.train.seed))


def _task_info(task) -> dict:
    return {"name": task.name, "input_kind": task.input_kind, "input_size": int(task.input_size),
            "output_size": int(task.output_size), "stateful": bool(task.stateful)}


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------
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


def _normalized(d):
    return json.loads(json.dumps(d, default=_json_default))


class _Metrics:
    """metrics.jsonl plus TensorBoard events (when tensorboardX is importable)."""

    def __init__(self, workdir: pathlib.Path, quiet: bool):
        self.file = open(workdir / "metrics.jsonl", "a") if is_primary() else open(os.devnull, "w")
        self.tb = None
        if not is_primary():  # multi-host: process 0 keeps the records
            return
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(str(workdir))
        except ImportError:
            self.tb = None
            if not quiet:
                print("note: tensorboardX is not installed; metrics go to metrics.jsonl only", file=sys.stderr)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(_finite(record), default=_json_default) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------
def _to_host(leaf) -> np.ndarray:
    """A leaf as a NumPy array; an array sharded over several processes is gathered first."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(leaf)


def _digest(a: np.ndarray) -> dict:
    """What a checkpoint's metadata records of one array: the sha256 of its bytes (C order), shape and dtype."""
    a = np.ascontiguousarray(a)
    return {"sha256": hashlib.sha256(a.reshape(-1).view(np.uint8)).hexdigest(), "shape": list(a.shape),
            "dtype": str(a.dtype)}


class _CorruptCheckpoint(ValueError):
    """A checkpoint whose contents do not match its checksums."""


class _Checkpoints:
    """Orbax CheckpointManagers: ``last`` (keep k) and ``best`` (keep 1). A checkpoint is the train state's leaves
    (keyed by position) plus JSON metadata that includes a checksum of every leaf (see the module doc)."""

    def __init__(self, workdir: pathlib.Path, keep: int, log: Callable[[str], None]):
        import orbax.checkpoint as ocp

        self.ocp, self.log = ocp, log
        self.root = (workdir / "checkpoints").absolute()
        opts = lambda n: ocp.CheckpointManagerOptions(max_to_keep=n, create=True,  # noqa: E731
                                                      enable_async_checkpointing=False)
        self.managers = {"last": ocp.CheckpointManager(self.root / "last", options=opts(max(1, keep))),
                         "best": ocp.CheckpointManager(self.root / "best", options=opts(1))}
        self.bad: list[tuple[str, int]] = []  # (which, step) found corrupt or unreadable by restore()

    def save(self, which: str, step: int, state, meta: dict) -> None:
        leaves = {f"{i:05d}": _to_host(leaf) for i, leaf in enumerate(jax.tree.leaves(state))}
        mgr = self.managers[which]
        if step in mgr.all_steps():  # the same step again (a resumed run's final save)
            return
        meta = {**meta, "checksums": {k: _digest(v) for k, v in leaves.items()}}
        mgr.save(step, args=self.ocp.args.Composite(state=self.ocp.args.StandardSave(leaves),
                                                    meta=self.ocp.args.JsonSave(_normalized(meta))))
        mgr.wait_until_finished()

    def _load(self, which: str, step: int, template: dict) -> tuple[list, dict]:
        out = self.managers[which].restore(step, args=self.ocp.args.Composite(
            state=self.ocp.args.StandardRestore(template), meta=self.ocp.args.JsonRestore()))
        meta = dict(out["meta"])
        sums = meta.pop("checksums", None)
        leaves = [np.asarray(out["state"][k]) for k in sorted(template)]
        for k, got in zip(sorted(template), leaves):
            if got.shape != template[k].shape:
                raise ValueError(f"array {k} has shape {got.shape}, expected {template[k].shape}")
        if int(meta.get("step", step)) != step:
            raise _CorruptCheckpoint(f"its metadata says step {meta.get('step')!r}")
        if sums is None:  # written before checksums existed
            self.log(f"note: the {which} checkpoint at step {step} has no checksums (an older lstm_lab wrote it); "
                     f"restored without verifying its contents")
            return leaves, meta
        if sorted(sums) != sorted(template):
            raise _CorruptCheckpoint(f"its checksums list {len(sums)} arrays, the model has {len(template)}")
        for k, got in zip(sorted(template), leaves):
            want, have = sums[k], _digest(got)
            if (want.get("shape"), want.get("dtype")) != (have["shape"], have["dtype"]):
                raise _CorruptCheckpoint(f"array {k} is {have['dtype']}{have['shape']}, its checksum was taken of "
                                         f"{want.get('dtype')}{want.get('shape')}")
            if want.get("sha256") != have["sha256"]:
                raise _CorruptCheckpoint(f"array {k} ({have['dtype']}{have['shape']}) does not match its sha256 "
                                         f"checksum")
        return leaves, meta

    def restore_newest(self, target, order=("last", "best")) -> tuple[Any, dict, str, int] | None:
        """The first intact checkpoint, trying each manager in ``order`` newest first (resume: the ``last``
        ones, then ``best``): ``(state, meta, which, step)``, or None when there is none. Each one that fails is
        reported in one line and remembered in ``self.bad``."""
        treedef = jax.tree.structure(target)
        # shapes and dtypes only: no device-to-host copy (nor a cross-process gather) for a template
        template = {f"{i:05d}": np.empty(np.shape(leaf), getattr(leaf, "dtype", None) or np.asarray(leaf).dtype)
                    for i, leaf in enumerate(jax.tree.leaves(target))}
        candidates = [(step, which) for which in order for step in sorted(self.managers[which].all_steps(),
                                                                              reverse=True)]
        for i, (step, which) in enumerate(candidates):
            try:
                leaves, meta = self._load(which, step, template)
            except Exception as e:  # noqa: BLE001 - a corrupt checkpoint: say so, fall back
                why = str(e).splitlines()[0][:200] if str(e) else ""
                why = why if isinstance(e, _CorruptCheckpoint) else f"{type(e).__name__}: {why}"
                nxt = (f"falling back to the {candidates[i + 1][1]} checkpoint at step {candidates[i + 1][0]}"
                       if i + 1 < len(candidates) else "no other checkpoint to fall back to")
                state = "is corrupt" if isinstance(e, _CorruptCheckpoint) else "is unreadable"
                self.log(f"warning: the {which} checkpoint at step {step} {state} ({why}); {nxt}")
                self.bad.append((which, step))
                continue
            return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in leaves]), meta, which, step
        return None

    def restore(self, which: str, target) -> tuple[Any, dict] | None:
        """The newest intact checkpoint of ``which`` as ``(state, meta)``, or None."""
        out = self.restore_newest(target, (which,))
        return None if out is None else out[:2]

    def steps(self) -> dict[str, list[int]]:
        return {w: sorted(m.all_steps()) for w, m in self.managers.items()}

    def has_any(self) -> bool:
        return any(self.steps().values())

    def delete_bad(self) -> None:
        """Delete the checkpoints restore found corrupt (a later save of the same step would otherwise be skipped)."""
        for which, step in self.bad:
            if step in self.managers[which].all_steps():
                self.managers[which].delete(step)
        self.bad = []

    def close(self):
        for m in self.managers.values():
            m.close()


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------
def run_record(cfg: Config, **extra) -> dict:
    """What ``config.json`` holds: the config, cell spec, seed, versions, git commit, time (plus ``extra``)."""
    spec = cell_from_config(cfg.model.cell)
    return {"config": to_dict(cfg), "cell_spec": spec.flags(), "cell_name": spec.name, "seed": cfg.train.seed,
            "lstm_lab_version": lstm_lab.__version__, "git_commit": _git_commit(), "jax_version": jax.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}


def record_evaluation(meta: dict, valid: dict, step: int, ocfg: OptimConfig) -> bool:
    """Book one validation result into a run's ``meta`` (history, best, early-stopping and plateau counters,
    the plateau learning-rate scale); True if it improved on the best."""
    meta["history"].append({"step": step, **valid})
    if meta["best_valid"] is None or valid["loss"] < meta["best_valid"]:
        meta.update(best_valid=valid["loss"], best_step=step, bad_evals=0, plateau_bad=0)
        return True
    meta["bad_evals"] += 1
    meta["plateau_bad"] += 1
    if ocfg.schedule == "plateau" and meta["plateau_bad"] >= ocfg.decay_patience:
        meta["lr_scale"] *= ocfg.decay_factor
        meta["plateau_bad"] = 0
    return False


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
        _atomic_json(wd / "summary.json", summary)
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
            raise _not_writable(self.workdir, e) from None
        if not os.access(self.workdir, os.W_OK | os.X_OK):
            self.release()
            raise _not_writable(self.workdir, PermissionError(errno.EACCES, "Permission denied", str(self.workdir)))
        return self


def _not_writable(workdir: pathlib.Path, e: OSError) -> WorkdirNotWritableError:
    what = f"{e.strerror or e}" + (f": {e.filename}" if getattr(e, "filename", None) else "")
    return WorkdirNotWritableError(f"workdir {str(workdir)!r} is not writable ({what}); fix its permissions or use "
                                   f"another --workdir")


def _is_not_writable(e: BaseException, workdir: pathlib.Path) -> bool:
    """An OSError from writing into ``workdir`` (permissions, read-only filesystem)."""
    if not isinstance(e, OSError) or e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
        return False
    try:
        return pathlib.Path(e.filename or "").absolute().is_relative_to(workdir.absolute())
    except (TypeError, ValueError):
        return False


def _checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    """Checkpoint steps on disk (``last`` and ``best``), without opening orbax."""
    out = []
    for which in ("last", "best"):
        d = workdir / "checkpoints" / which
        if d.is_dir():
            out += [int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(out)


def _move_aside(workdir: pathlib.Path, why: str, log) -> None:
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
    if not isinstance(done, dict) or done.get("status") != "failed" or _checkpoint_steps(workdir):
        return None
    return str(done.get("error") or "failed")


def _prepare_workdir(workdir: pathlib.Path, record: dict, force: bool, log) -> None:
    """Make ``workdir`` hold ``record``'s run: a different run there is refused (RunConflictError) unless ``force``
    or it failed before its first checkpoint; then it is moved aside. The caller holds the workdir's lock."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfile = workdir / "config.json"
    if cfile.exists():
        stored = json.loads(cfile.read_text()).get("config")
        if _normalized(stored) != _normalized(record["config"]):
            a = {f"{s}.{k}": v for s, sec in (_normalized(stored) or {}).items() for k, v in sec.items()}
            b = {f"{s}.{k}": v for s, sec in _normalized(record["config"]).items() for k, v in sec.items()}
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
            _move_aside(workdir, why, log)
    if is_primary():
        _atomic_json(cfile, record)


def load_run(workdir) -> tuple[Config, dict]:
    """The config and task info of a run directory."""
    from lstm_lab.config import from_dict

    wd = pathlib.Path(workdir)
    if not (wd / "config.json").exists():
        raise FileNotFoundError(f"{str(wd)!r} is not a run directory (no config.json).")
    cfg = from_dict(json.loads((wd / "config.json").read_text())["config"])
    return cfg, json.loads((wd / "task.json").read_text())


def _device_setup(batch_size: int, eval_batch_size: int, devices=None):
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    if n == 1:
        return (lambda a: jax.device_put(a)), (lambda t: t), 1, None
    for name, b in (("train.batch_size", batch_size), ("train.eval_batch_size", eval_batch_size)):
        if b % n:
            raise ValueError(f"config: {name}={b} must be divisible by the {n} visible devices (data parallel).")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(devices), ("data",))
    data, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    # every process passes the same global (host) array; each keeps its devices' rows
    return (lambda a: jax.device_put(a, data)), (lambda t: jax.device_put(t, repl)), n, repl


def _trace_one_step(model: SequenceModel, task, cfg: Config) -> None:
    """Trace (without running) the loss and its gradient on the first training batch, so that a shape or
    implementation problem of this model on this task is an error before the workdir is touched."""
    t = cfg.train
    batch = next(iter(task.batches("train", batch_size=t.batch_size, seed=t.seed, start_step=0)))
    arrays = {k: np.asarray(v) for k, v in batch.arrays().items()}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    carry = model.initialize_carry(t.batch_size) if task.stateful else None

    def loss(p):
        out, _ = nnx.merge(graphdef, p, rest)(arrays["inputs"], carry, key=jax.random.key(0), train=True)
        return task.loss(out, arrays)

    jax.eval_shape(jax.value_and_grad(loss), params)


def train(cfg: Config, workdir, *, force: bool = False, resume: bool | None = None, quiet: bool = False,
          log: Callable[[str], None] | None = None) -> dict:
    """Train ``cfg`` in ``workdir`` and return the summary (also written to ``summary.json``).

    A workdir with checkpoints of the same config resumes; one with a
    finished run returns its summary; one with a different config raises
    :class:`RunConflictError` unless ``force`` (the old run is moved aside)
    or that run failed before its first checkpoint. ``resume=True`` requires a
    checkpoint to resume from. A diverging run returns ``status="diverged"``;
    an exception is recorded as ``status="failed"`` and raised. Errors in the
    config, task, optimizer or model are raised before the workdir is created.
    Another process training in ``workdir`` raises :class:`WorkdirBusyError`,
    a workdir that cannot be written :class:`WorkdirNotWritableError`, one
    whose checkpoints are all corrupt :class:`CheckpointCorruptError`, and
    SIGINT :class:`TrainingInterrupted` (see the module doc).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    wd = pathlib.Path(workdir)
    t = cfg.train
    # everything that can be checked is, before anything is written (the config checked itself when made)
    task = tasks_lib.get(cfg.task.name, **cfg.task.options)
    tx = build_optimizer(cfg.optim, t.steps)
    info = _task_info(task)
    devices = _device_setup(t.batch_size, t.eval_batch_size or t.batch_size)
    model = build_model(cfg, info)
    _trace_one_step(model, task, cfg)
    record = run_record(cfg)
    if resume and not _checkpoint_steps(wd):
        raise FileNotFoundError(f"--resume: {str(wd)!r} has no checkpoint to resume from.")
    with WorkdirLock(wd):
        try:
            return _train_locked(cfg, task, info, tx, model, devices, record, wd, force=force, resume=resume,
                                 quiet=quiet, log=log)
        except OSError as e:
            if _is_not_writable(e, wd):
                raise _not_writable(wd, e) from None
            raise


def _train_locked(cfg, task, info, tx, model, devices, record, wd: pathlib.Path, *, force, resume, quiet, log):
    _prepare_workdir(wd, record, force, log)
    summary_path = wd / "summary.json"
    if summary_path.exists() and not force:
        done = json.loads(summary_path.read_text())
        if done.get("status") in ("completed", "stopped_early", "diverged"):
            log(f"{wd}: this run already finished ({done['status']}); summary.json is its record")
            return done
    if is_primary():
        _atomic_json(wd / "task.json", info)
        task.save(wd)
    try:
        return _fit(cfg, task, info, tx, model, devices, record, wd, force=force, resume=resume, quiet=quiet, log=log)
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit, WorkdirError)) or _is_not_writable(e, wd) \
                or not is_primary():
            raise
        try:
            _atomic_json(summary_path, {"status": "failed", "error": f"{type(e).__name__}: {e}", "workdir": str(wd)})
        except OSError:
            pass
        raise


def _truncate_metrics(path: pathlib.Path, step: int) -> None:
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


class _StopOnInterrupt:
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


def _fit(cfg: Config, task, info, tx, model, devices, record, wd: pathlib.Path, *, force, resume, quiet,
         log) -> dict:
    t = cfg.train
    _, params, _ = nnx.split(model, nnx.Param, ...)
    stateful = info["stateful"]
    carry0 = model.initialize_carry(t.batch_size) if stateful else {}
    state = {"params": params, "opt_state": tx.init(params), "carry": carry0}
    ckpt = _Checkpoints(wd, t.keep_checkpoints, log)
    meta = {"step": 0, "lr_scale": 1.0, "best_valid": None, "best_step": None, "bad_evals": 0, "plateau_bad": 0,
            "history": [], "wall_seconds": 0.0}
    restored = ckpt.restore_newest(state) if ckpt.has_any() else None
    if restored is not None:
        state, meta, which, _ = restored
        ckpt.delete_bad()
        log(f"resuming {wd} from step {meta['step']}" if which == "last" else
            f"resuming {wd} from the best checkpoint at step {meta['step']}")
    elif ckpt.bad:
        bad = ", ".join(f"{w} {s}" for w, s in ckpt.bad)
        if not force:
            ckpt.close()
            raise CheckpointCorruptError(f"workdir {str(wd)!r} has no intact checkpoint to resume from (corrupt or "
                                         f"unreadable: {bad}); use --force to move the run aside and start over")
        ckpt.close()
        _move_aside(wd, f"no intact checkpoint: {bad}", log)
        if is_primary():
            _atomic_json(wd / "config.json", record)
            _atomic_json(wd / "task.json", info)
            task.save(wd)
        ckpt = _Checkpoints(wd, t.keep_checkpoints, log)
    elif resume:
        ckpt.close()
        raise FileNotFoundError(f"--resume: {str(wd)!r} has no checkpoint to resume from.")
    try:
        return _fit_loop(cfg, task, info, tx, model, devices, wd, ckpt, state, meta, quiet=quiet, log=log)
    finally:
        ckpt.close()


def _fit_loop(cfg: Config, task, info, tx, model, devices, wd: pathlib.Path, ckpt: _Checkpoints, state, meta, *,
              quiet, log) -> dict:
    t = cfg.train
    eval_bs = t.eval_batch_size or t.batch_size
    put_data, put_repl, n_dev, replicated = devices
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    stateful = info["stateful"]
    # the losses of the steps after the last record (an interrupt checkpoint keeps them: the next record averages
    # over them as an uninterrupted run's does)
    pending_losses = [(int(s), np.float32(v)) for s, v in meta.pop("pending_losses", None) or []]

    def loss_fn(params, carry, batch, key):
        m = nnx.merge(graphdef, params, rest)
        out, new_carry = m(batch["inputs"], carry if stateful else None, key=key, train=True)
        return task.loss(out, batch), (new_carry if stateful else {})

    def reset(carry, batch):  # a new epoch (or split) starts from zeros
        return jax.tree.map(lambda c: jnp.where(batch["reset"], jnp.zeros_like(c), c), carry)

    def train_step(params, opt_state, carry, batch, key, lr_scale):
        if stateful:
            carry = reset(carry, batch)
        (loss, new_carry), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, carry, batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: u * lr_scale, updates)
        return optax.apply_updates(params, updates), opt_state, jax.lax.stop_gradient(new_carry), loss

    def eval_step(params, carry, batch):
        m = nnx.merge(graphdef, params, rest)
        if stateful:
            carry = reset(carry, batch)
        out, new_carry = m(batch["inputs"], carry if stateful else None, train=False)
        sums = task.metric_sums(out, batch)
        if jax.process_count() > 1:  # per-row sums live on several hosts: replicate them for the host-side sum
            sums = jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, replicated), sums)
        return sums, (new_carry if stateful else {})

    train_step = jax.jit(train_step, donate_argnums=(0, 1, 2))
    eval_step = jax.jit(eval_step)
    eval_cache: dict[str, list] = {}

    def evaluate(params, split) -> dict:
        if split not in eval_cache:
            eval_cache[split] = [{**{k: put_data(v) for k, v in b.arrays().items()}, "reset": np.bool_(b.reset)}
                                 for b in task.batches(split, batch_size=eval_bs)]
        carry = model.initialize_carry(eval_bs) if stateful else {}
        carry = put_data(carry) if stateful and n_dev > 1 else carry
        parts = []
        for b in eval_cache[split]:
            sums, carry = eval_step(params, carry, b)
            parts.append(sums)
        return task.summarize_batches(parts)

    params, opt_state = put_repl(state["params"]), put_repl(state["opt_state"])
    carry = put_data(state["carry"]) if stateful and n_dev > 1 else state["carry"]
    step = int(meta["step"])
    last_saved = step if step else None  # where a resume would start
    base_key = jax.random.fold_in(jax.random.key(t.seed), 1)
    kill_at = int(os.environ.get(DEBUG_KILL_ENV, "0") or 0)
    interrupt_at = int(os.environ.get(DEBUG_INTERRUPT_ENV, "0") or 0)
    if is_primary():
        _truncate_metrics(wd / "metrics.jsonl", step)  # one record per (kind, step), also after a resume
    metrics = _Metrics(wd, quiet)
    bar = None
    if not quiet and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=t.steps, initial=step, desc=f"{info['name']}:{cfg.model.cell}", unit="step",
                   dynamic_ncols=True, file=sys.stderr)
    status, reason, diverged_at = "completed", None, None
    start_wall = time.perf_counter() - float(meta["wall_seconds"])
    pending: list[tuple[int, Any]] = pending_losses
    last_log_time, last_log_step = time.perf_counter(), step

    def checkpoint_meta():
        return {**meta, "step": step, "wall_seconds": time.perf_counter() - start_wall}

    batches = prefetch(task.batches("train", batch_size=t.batch_size, seed=t.seed, start_step=step), size=4)
    try:
        with _StopOnInterrupt(log) as stop:
            while step < t.steps:
                batch = next(batches)
                tokens_per_step = batch.inputs.shape[0] * batch.inputs.shape[1]  # B x T input steps
                arrays = {k: put_data(v) for k, v in batch.arrays().items()}
                arrays["reset"] = np.bool_(batch.reset)
                key = jax.random.fold_in(base_key, step)
                params, opt_state, carry, loss = train_step(params, opt_state, carry, arrays, key,
                                                            np.float32(meta["lr_scale"]))
                step += 1
                pending.append((step, loss))
                at_eval = step % t.eval_every == 0 or step == t.steps
                out_of_time = bool(t.max_minutes) and step < t.steps and \
                    time.perf_counter() - start_wall > 60 * t.max_minutes
                at_eval = at_eval or out_of_time  # evaluate and checkpoint where the time runs out
                if step % t.log_every == 0 or at_eval:
                    losses = np.asarray(jax.device_get([l for _, l in pending]), np.float64)
                    bad = np.flatnonzero(~np.isfinite(losses))
                    if bad.size:
                        diverged_at = pending[bad[0]][0]
                        status, reason = "diverged", f"non-finite training loss at step {diverged_at}"
                        metrics.write({"kind": "diverged", "step": diverged_at})
                        break
                    now = time.perf_counter()
                    rate = (step - last_log_step) * tokens_per_step / max(now - last_log_time, 1e-9)
                    last_log_time, last_log_step = now, step
                    rec = {"kind": "train", "step": step, "loss": float(losses.mean()), "tokens_per_s": rate,
                           "lr_scale": meta["lr_scale"]}
                    metrics.write(rec)
                    if bar is not None:
                        bar.update(step - bar.n)
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rate:,.0f}")
                    pending = []
                if at_eval:
                    valid = evaluate(params, "valid")
                    metrics.write({"kind": "valid", "step": step, **valid})
                    improved = record_evaluation(meta, valid, step, cfg.optim)
                    if bar is not None:
                        bar.write(f"step {step}: valid " + ", ".join(f"{k} {v:.4f}" for k, v in valid.items()))
                    elif not quiet:
                        log(f"step {step}/{t.steps}: valid " + ", ".join(f"{k} {v:.4g}" for k, v in valid.items()))
                    cur = {"params": params, "opt_state": opt_state, "carry": carry}
                    if improved:
                        ckpt.save("best", step, cur, checkpoint_meta())
                    ckpt.save("last", step, cur, checkpoint_meta())
                    last_saved = step
                    if t.early_stop_patience and meta["bad_evals"] >= t.early_stop_patience:
                        status, reason = "stopped_early", (f"no validation improvement in {meta['bad_evals']} "
                                                           f"evaluations (best at step {meta['best_step']})")
                        break
                    if out_of_time:
                        status, reason = "stopped_early", f"time limit of {t.max_minutes} minutes"
                        break
                if kill_at and step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if interrupt_at and step == interrupt_at:
                    os.kill(os.getpid(), signal.SIGINT)
                if stop.set and step < t.steps:
                    if last_saved != step:
                        values = jax.device_get([v for _, v in pending])
                        held = [(s, float(v)) for (s, _), v in zip(pending, values)]
                        if all(math.isfinite(v) for _, v in held):  # else the resume shows the divergence
                            ckpt.save("last", step, {"params": params, "opt_state": opt_state, "carry": carry},
                                      {**checkpoint_meta(), "pending_losses": held})
                            last_saved = step
                    raise TrainingInterrupted(wd, step, last_saved)
    except BaseException as e:
        metrics.close()
        if isinstance(e, KeyboardInterrupt) and not isinstance(e, TrainingInterrupted):  # a second Ctrl-C
            raise TrainingInterrupted(wd, step, last_saved) from None
        raise
    finally:
        batches.close()
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - start_wall
    best = ckpt.restore("best", {"params": params, "opt_state": opt_state, "carry": carry})
    valid = test = None
    if best is not None:
        best_params = put_repl(best[0]["params"])
        valid, test = evaluate(best_params, "valid"), evaluate(best_params, "test")
        metrics.write({"kind": "test", "step": meta["best_step"], **test})
    metrics.close()
    summary = run_summary(cfg, task, info, wd, status=status, reason=reason, steps=step, diverged_at=diverged_at,
                          best_step=meta["best_step"], wall=wall, valid=valid, test=test, devices=n_dev)
    if not quiet:
        log(format_summary(summary))
    return summary


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


def load_model(workdir, which: str = "best") -> tuple[SequenceModel, Config, dict]:
    """The trained model of a run directory (its ``best`` or ``last`` checkpoint), its config and task info.

    A population member (no checkpoints) raises FileNotFoundError.
    """
    wd = pathlib.Path(workdir)
    cfg, info = load_run(wd)
    model = build_model(cfg, info)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = build_optimizer(cfg.optim, cfg.train.steps)
    carry = model.initialize_carry(cfg.train.batch_size) if info["stateful"] else {}
    target = {"params": params, "opt_state": tx.init(params), "carry": carry}
    ckpt = _Checkpoints(wd, cfg.train.keep_checkpoints, lambda m: print(m, file=sys.stderr))
    restored = ckpt.restore(which, target)
    ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"{str(wd)!r} has no {which} checkpoint to load.")
    return nnx.merge(graphdef, restored[0]["params"], rest), cfg, info


# ---------------------------------------------------------------------------
# Sampling from a trained language model
# ---------------------------------------------------------------------------
def sample(workdir, *, prompt: str = "", length: int = 300, temperature: float = 1.0, seed: int = 0) -> str:
    """Text from the best checkpoint of a char_lm or word_lm run (prompt included)."""
    from lstm_lab.data.vocab import Vocab

    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
        raise ValueError(f"length must be an integer >= 1 (tokens to generate); got {length!r}.")
    if not (isinstance(temperature, (int, float, np.floating)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0 and finite; got {temperature!r}.")
    wd = pathlib.Path(workdir)
    cfg, info = load_run(wd)
    if not (wd / "vocab.json").exists():
        raise ValueError(f"{str(wd)!r} is a {info['name']} run; sampling needs a language model (char_lm, word_lm).")
    vocab = Vocab.load(wd / "vocab.json")
    model, _, _ = load_model(wd)

    @jax.jit
    def step_fn(tokens, carry, key):
        out, carry = model(tokens, carry)
        logits = (out[:, -1] / temperature).at[:, 0].set(-jnp.inf)  # never the unknown token
        return jax.random.categorical(key, logits), carry

    if vocab.kind == "word":
        words = prompt.split() or ["<eos>"]
        ids = vocab.encode(words)
    else:
        text = prompt or "\n"
        ids = vocab.encode(text if vocab.kind == "char" else text.encode())
    carry = model.initialize_carry(1)
    key = jax.random.key(seed)
    # the prompt, then one token at a time
    nxt, carry = step_fn(jnp.asarray(ids[None, :], jnp.int32), carry, jax.random.fold_in(key, 0))
    out = []
    for i in range(length):
        out.append(int(nxt[0]))
        nxt, carry = step_fn(nxt[:, None].astype(jnp.int32), carry, jax.random.fold_in(key, i + 1))
    gen = vocab.decode(out)
    if vocab.kind == "word":
        return (prompt + " " + gen).replace(" <eos> ", "\n").replace("<eos>", "\n")
    return (prompt or "") + gen
