"""Populations: K trials of one shape trained as one program, ``jax.vmap`` over their parameters, optimizer
states (which hold each member's learning rate, momentum, betas and weight decay) and input noise.

``train_population(cfgs, workdirs)`` trains configs that differ only in
:data:`~lstm_lab.training.optim.VMAPPED_FIELDS` — the optimizer's numbers, input noise, the initialisation
(forget bias, chrono) and the seed (parameters, data order, dropout and noise keys) — and returns one summary per
member, equal to what :func:`~lstm_lab.training.train` returns for that config alone: the same step definition,
the same loop (:func:`~lstm_lab.training.engine.fit`), the same records and checkpoints in each member's own
workdir (locked for the whole call). A population that is killed resumes from the newest step at which every
member has an intact checkpoint (none: it starts over); members that already finished are not trained again.
"""

from __future__ import annotations

import contextlib
import pathlib
import sys
from typing import Callable, Sequence

from lstm_lab import tasks as tasks_lib
from lstm_lab.training.checkpoints import Checkpoints
from lstm_lab.training.engine import Engine, build_model, eval_interval, fit, same_shapes, task_info
from lstm_lab.training.loop import recorded_failure, trace_one_step, writable
from lstm_lab.training.optim import VMAPPED_FIELDS, build_optimizer, population_key
from lstm_lab.training.records import Member, WorkdirLock, open_workdir, run_record

__all__ = ["train_population", "population_key", "VMAPPED_FIELDS"]


def train_population(cfgs: list, workdirs: list, *, quiet: bool = True, log: Callable[[str], None] | None = None,
                     force: bool = False, callbacks: Sequence[Callable[[int], None]] = ()) -> list[dict]:
    """Train ``cfgs`` together (one ``jax.vmap``-ed program); one summary per member (see the module doc)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if len(cfgs) != len(workdirs) or not cfgs:
        raise ValueError(f"train_population: {len(cfgs)} configs and {len(workdirs)} workdirs; need the same, >= 1.")
    if len({population_key(c) for c in cfgs}) != 1:
        raise ValueError("train_population: the configs differ in more than the vmapped fields "
                         f"({', '.join(VMAPPED_FIELDS)}); group them with population_key().")
    wds = [pathlib.Path(w) for w in workdirs]
    if len({w.absolute() for w in wds}) != len(wds):
        raise ValueError("train_population: two members share a workdir; give each its own.")
    t = cfgs[0].train
    txs = [build_optimizer(c.optim, t.steps) for c in cfgs]  # each member's hyperparameters, in its opt state
    task = tasks_lib.get(cfgs[0].task.name, **cfgs[0].task.options)
    eval_interval(t, task)
    info = task_info(task)
    models = [build_model(c, info) for c in cfgs]
    trace_one_step(models[0], task, cfgs[0], txs[0])  # the members differ in no shape
    same_shapes(info["name"], [next(iter(task.batches("train", batch_size=t.batch_size, seed=c.train.seed)))
                               for c in cfgs], 0)  # nor do their first batches (later ones: checked as they come)
    records = [run_record(c, population=len(cfgs)) for c in cfgs]
    with contextlib.ExitStack() as stack:  # nothing above wrote anything; every member's workdir is locked
        for wd in wds:
            stack.enter_context(WorkdirLock(wd))
        stack.enter_context(writable(wds))
        done = {m: open_workdir(wd, records[m], task, info, force, log) for m, wd in enumerate(wds)}
        todo = [m for m in range(len(cfgs)) if done[m] is None]
        if todo:
            stack.enter_context(recorded_failure([wds[m] for m in todo]))
            engine = Engine([cfgs[m] for m in todo], task, info, txs[0], [models[m] for m in todo], stacked=True)
            members = [Member(cfgs[m], wds[m], population=len(cfgs)) for m in todo]
            ckpts = [stack.enter_context(contextlib.closing(Checkpoints(wds[m], t.keep_checkpoints, log)))
                     for m in todo]
            state, step = _resume(engine, members, ckpts, engine.initial_state([txs[m] for m in todo]), log)
            for m, summary in zip(todo, fit(engine, members, ckpts, state, step, quiet=quiet, log=log,
                                            callbacks=callbacks, label=f"population x{len(todo)}")):
                done[m] = summary
            if not quiet:
                n = sum(done[m]["status"] == "completed" for m in todo)
                log(f"population of {len(todo)}: {n} completed in {done[todo[0]]['wall_seconds']:.1f}s")
    return [done[m] for m in range(len(cfgs))]


def _resume(engine: Engine, members: list[Member], ckpts: list[Checkpoints], state, log):
    """The newest step at which every member has an intact ``last`` checkpoint: ``(stacked state, step)``, the
    members' bookkeeping restored with it; else the initial state at step 0."""
    common = set.intersection(*(set(c.steps()["last"]) for c in ckpts))
    for step in sorted(common, reverse=True):
        got = [c.restore_newest(engine.take(state, i), ("last",), steps={step}) for i, c in enumerate(ckpts)]
        if all(g is not None for g in got):
            for m, c, g in zip(members, ckpts, got):
                m.meta.update(g[1])
                c.delete_bad()
            log(f"resuming the population ({len(members)} members) from step {step}")
            return engine.stack([g[0] for g in got]), step
    if any(c.has_any() for c in ckpts):
        log("population: no step with an intact checkpoint of every member; starting over")
    return state, 0
