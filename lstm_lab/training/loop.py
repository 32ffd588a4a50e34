"""One run: ``train(cfg, workdir)``.

Read top to bottom: check everything that can be checked (task, optimizer, devices, model, one traced training
step) before anything is written; lock the workdir; resume from its newest intact checkpoint; run the loop of
:mod:`lstm_lab.training.engine`; the summary.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import sys
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from lstm_lab import tasks as tasks_lib
from lstm_lab.config import Config
from lstm_lab.training.checkpoints import Checkpoints, checkpoint_steps
from lstm_lab.training.engine import Engine, build_model, device_setup, eval_interval, fit, task_info
from lstm_lab.training.optim import build_optimizer
from lstm_lab.training.records import (CheckpointCorruptError, Member, WorkdirError, WorkdirLock, atomic_json,
                                       format_summary, is_not_writable, is_primary, move_aside, not_writable,
                                       open_workdir, run_record)
from lstm_lab.training.steps import make_steps

__all__ = ["train", "signal_at", "trace_one_step"]


def train(cfg: Config, workdir, *, force: bool = False, resume: bool | None = None, quiet: bool = False,
          log: Callable[[str], None] | None = None, callbacks: Sequence[Callable[[int], None]] = ()) -> dict:
    """Train ``cfg`` in ``workdir`` and return the summary (also written to ``summary.json``).

    A workdir with checkpoints of the same config resumes; one with a finished run returns its summary; one with
    a different config raises :class:`RunConflictError` unless ``force`` (the old run is moved aside) or that run
    failed before its first checkpoint. ``resume=True`` requires a checkpoint to resume from. A diverging run
    returns ``status="diverged"``; an exception is recorded as ``status="failed"`` and raised. Errors in the
    config, task, optimizer or model are raised before the workdir is created. Another process training in
    ``workdir`` raises :class:`WorkdirBusyError`, a workdir that cannot be written
    :class:`WorkdirNotWritableError`, one whose checkpoints are all corrupt :class:`CheckpointCorruptError`, and
    SIGINT :class:`TrainingInterrupted` (see :mod:`lstm_lab.training`). ``callbacks``: each is called with the
    step number after every training step (e.g. :func:`signal_at`).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    wd, t = pathlib.Path(workdir), cfg.train
    task = tasks_lib.get(cfg.task.name, **cfg.task.options)
    tx = build_optimizer(cfg.optim, t.steps)
    eval_interval(t, task)
    info = task_info(task)
    devices = device_setup(t.batch_size, t.eval_batch_size or t.batch_size)
    model = build_model(cfg, info)
    trace_one_step(model, task, cfg, tx)
    record = run_record(cfg)
    if resume and not checkpoint_steps(wd):
        raise FileNotFoundError(f"--resume: {str(wd)!r} has no checkpoint to resume from.")
    with WorkdirLock(wd), writable([wd]):
        done = open_workdir(wd, record, task, info, force, log)
        if done is not None:
            log(f"{wd}: this run already finished ({done['status']}); summary.json is its record")
            return done
        with recorded_failure([wd]):
            engine = Engine([cfg], task, info, tx, [model], stacked=False, devices=devices)
            member, state = Member(cfg, wd), engine.initial_state([tx])
            ckpt = Checkpoints(wd, t.keep_checkpoints, log)
            try:
                restored = ckpt.restore_newest(state) if ckpt.has_any() else None
                if restored is not None:
                    state, meta, which, _ = restored
                    member.meta.update(meta)
                    ckpt.delete_bad()
                    log(f"resuming {wd} from step {meta['step']}" if which == "last" else
                        f"resuming {wd} from the best checkpoint at step {meta['step']}")
                elif ckpt.bad:
                    ckpt = _start_over(ckpt, t.keep_checkpoints, force, wd, record, task, info, log)
                elif resume:
                    raise FileNotFoundError(f"--resume: {str(wd)!r} has no checkpoint to resume from.")
                label = f"{info['name']}:{cfg.model.cell}"
                summary, = fit(engine, [member], [ckpt], state, int(member.meta["step"]), quiet=quiet, log=log,
                               callbacks=callbacks, label=label)
            finally:
                ckpt.close()
    if not quiet:
        log(format_summary(summary))
    return summary


def _start_over(ckpt: Checkpoints, keep: int, force: bool, wd: pathlib.Path, record: dict, task, info,
                log) -> Checkpoints:
    """Every checkpoint is corrupt: refuse, or (``force``) move the run aside and start a new one."""
    bad = ", ".join(f"{w} {s}" for w, s in ckpt.bad)
    ckpt.close()
    if not force:
        raise CheckpointCorruptError(f"workdir {str(wd)!r} has no intact checkpoint to resume from (corrupt or "
                                     f"unreadable: {bad}); use --force to move the run aside and start over")
    move_aside(wd, f"no intact checkpoint: {bad}", log)
    if is_primary():
        atomic_json(wd / "config.json", record)
        atomic_json(wd / "task.json", info)
        task.save(wd)
    return Checkpoints(wd, keep, log)


def trace_one_step(model, task, cfg: Config, tx) -> None:
    """Trace (without running) one training step on the first training batch, so that a shape or implementation
    problem of this model on this task is an error before the workdir is touched."""
    t = cfg.train
    batch = next(iter(task.batches("train", batch_size=t.batch_size, seed=t.seed, start_step=0)))
    arrays = {**{k: np.asarray(v) for k, v in batch.arrays().items()}, "reset": np.bool_(batch.reset)}
    train_step, _ = make_steps(model, task, tx, stateful=bool(task.stateful))
    params = nnx.split(model, nnx.Param, ...)[1]
    carry = model.initialize_carry(t.batch_size) if task.stateful else {}
    jax.eval_shape(lambda p: train_step(p, tx.init(p), carry, arrays, jax.random.key(0)), params)


@contextlib.contextmanager
def writable(wds: list[pathlib.Path]):
    """An OSError from writing into one of ``wds`` becomes :class:`WorkdirNotWritableError` (one line)."""
    try:
        yield
    except OSError as e:
        bad = [wd for wd in wds if is_not_writable(e, wd)]
        if bad:
            raise not_writable(bad[0], e) from None
        raise


@contextlib.contextmanager
def recorded_failure(wds: list[pathlib.Path]):
    """An exception in training is recorded in each workdir's summary.json as ``status="failed"`` (and raised)."""
    try:
        yield
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit, WorkdirError)) or not is_primary() \
                or any(is_not_writable(e, wd) for wd in wds):
            raise
        for wd in wds:
            try:
                atomic_json(wd / "summary.json", {"status": "failed", "error": f"{type(e).__name__}: {e}",
                                                  "workdir": str(wd)})
            except OSError:
                pass
        raise


def signal_at(step: int, sig: int = signal.SIGKILL) -> Callable[[int], None]:
    """A callback for :func:`train` that sends this process ``sig`` after training step ``step`` (tests kill and
    interrupt runs with it)."""
    def callback(s: int) -> None:
        if s == step:
            os.kill(os.getpid(), sig)
    return callback
