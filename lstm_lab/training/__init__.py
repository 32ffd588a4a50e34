"""Training: one run (:func:`train`), a vmapped population of runs (:func:`train_population`), a trained model
(:func:`load_model`) and samples from it (:func:`sample`).

``train(cfg, workdir)`` runs one experiment and returns its summary (the CLI ``lstm-lab train`` is a thin layer
over it). A workdir holds::

    config.json        the full config, cell spec, seed, package version, git commit
    task.json          what the model needs to know of the task (sizes, kind)
    vocab.json         language models: the vocabulary built from train
    metrics.jsonl      one JSON record per log or evaluation
    events.out.tfevents.*   the same for TensorBoard (with the ``tensorboard`` extra)
    checkpoints/last/  the most recent checkpoints (train.keep_checkpoints)
    checkpoints/best/  the checkpoint with the best validation loss
    summary.json       written atomically when the run ends
    .lock              the lock file of the process training here (see Integrity)

A population member's workdir holds the same files.

The package, in the order a run uses it: :mod:`~.optim` (the optimizer; hyperparameters in its state),
:mod:`~.steps` (the one train step and eval step), :mod:`~.records` (metrics, bookkeeping, stop rules, workdir),
:mod:`~.checkpoints` (verified, by name), :mod:`~.engine` (the one loop), :mod:`~.loop` (``train``),
:mod:`~.population` (``train_population``), :mod:`~.sampling`.

Determinism: training batch ``k`` is a pure function of ``(seed, k)``, the dropout/noise key of step ``k`` is
``fold_in(fold_in(key(seed), 1), k)``, and a checkpoint holds the parameters, the optimizer state (with its
learning rate, after any plateau decay), the carry passed between language-model windows, the step and the
evaluation history, so a run (or a population) killed and resumed ends with bitwise the metrics of an
uninterrupted one on the CPU.

Integrity:

* Checkpoints are verified and restored by name (:mod:`~.checkpoints`): each array's sha256, shape and dtype are
  in the checkpoint's metadata; a restore recomputes them. A checkpoint that fails (or cannot be read) is reported
  in one line and the next newest is tried: the older ``last`` ones, then ``best`` (a complete resume point too).
  Corrupt ones are deleted once an intact one is found; if none is intact, :class:`CheckpointCorruptError`
  (``force=True`` moves the run aside and starts over).
* One process per workdir: ``train`` holds an exclusive ``fcntl.flock`` on ``<workdir>/.lock`` (the holder's pid
  inside) from before anything is written until it returns; the kernel drops it when the process dies, so a
  killed run leaves no stale lock. A second run raises :class:`WorkdirBusyError`. Multi-host: process 0 holds it.
* ``metrics.jsonl`` holds exactly one record per (kind, step): a run that starts or resumes at step S first
  rewrites the file (temp file + ``os.replace``) to the records of steps <= S, without ``test`` records (written
  again at the end). TensorBoard event files are appended to and may repeat steps after a resume.
* Nothing is written before the config, task, optimizer, devices and model (built, and one training step traced)
  are checked. A previous attempt that ``failed`` and left no checkpoint never blocks a new config (it is moved
  aside).
* SIGINT (Ctrl-C) in a single-process run stops after the current step, saves a ``last`` checkpoint there (with
  the not yet logged losses, so a resume stays exact) and raises :class:`TrainingInterrupted` (a
  KeyboardInterrupt); no ``failed`` record is written. A second Ctrl-C stops at once; the resume then starts from
  the last checkpoint.
"""

from lstm_lab.config import OPTIMIZERS, SCHEDULES  # noqa: F401 - re-exported
from lstm_lab.training.engine import build_model, device_setup, task_info
from lstm_lab.training.loop import signal_at, train
from lstm_lab.training.optim import VMAPPED_FIELDS, build_optimizer, hyperparams, population_key
from lstm_lab.training.population import train_population
from lstm_lab.training.records import (STATUSES, CheckpointCorruptError, RunConflictError, TrainingInterrupted,
                                       WorkdirBusyError, WorkdirError, WorkdirLock, WorkdirNotWritableError,
                                       format_summary, load_run, run_record)
from lstm_lab.training.sampling import load_model, sample

__all__ = ["train", "train_population", "population_key", "VMAPPED_FIELDS", "build_optimizer", "hyperparams",
           "load_model", "sample", "build_model", "load_run", "run_record", "format_summary", "signal_at",
           "device_setup", "task_info", "STATUSES", "RunConflictError", "WorkdirError", "WorkdirBusyError",
           "WorkdirNotWritableError", "CheckpointCorruptError", "TrainingInterrupted", "WorkdirLock"]
