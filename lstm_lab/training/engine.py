"""The one training loop, for a solo run and for a population alike.

:class:`Engine` holds what differs between them — one member, or K members stacked on axis 0 of every array
(the steps of :mod:`lstm_lab.training.steps` under ``jax.vmap``) — and :func:`fit` is the loop: train step,
divergence check, records, evaluation, plateau decay, stop rules, checkpoints, Ctrl-C, and at the end the best
checkpoints' validation and test scores. Each member keeps a solo run's records (:class:`~.records.Member`) and
checkpoints, so a population member's workdir is a solo run's workdir.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lstm_lab.data.batching import prefetch
from lstm_lab.models import SequenceModel
from lstm_lab.training.checkpoints import Checkpoints
from lstm_lab.training.optim import scale_learning_rate
from lstm_lab.training.records import Member, StopOnInterrupt, TrainingInterrupted
from lstm_lab.training.steps import make_steps

__all__ = ["Engine", "fit", "build_model", "task_info", "device_setup"]


def build_model(cfg, info: dict) -> SequenceModel:
    return SequenceModel(info["input_kind"], info["input_size"], info["output_size"], cfg.model,
                         rngs=nnx.Rngs(cfg.train.seed))


def task_info(task) -> dict:
    """What ``task.json`` holds: what the model needs to know of the task."""
    return {"name": task.name, "input_kind": task.input_kind, "input_size": int(task.input_size),
            "output_size": int(task.output_size), "stateful": bool(task.stateful)}


def device_setup(batch_size: int, eval_batch_size: int, devices=None):
    """``(put_data, put_replicated, n_devices, replicated sharding)``: data parallel over ``devices``."""
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


def eval_interval(t, task) -> int:
    """Training steps between evaluations: ``train.eval_every``, or ``train.eval_every_epochs`` epochs of a task
    of a finite set (one with ``epoch_steps``, e.g. a :class:`~lstm_lab.tasks.SequenceSet`)."""
    if not t.eval_every_epochs:
        return t.eval_every
    if not hasattr(task, "epoch_steps"):
        raise ValueError(f"config: train.eval_every_epochs={t.eval_every_epochs} needs a task of a finite set of "
                         f"sequences (one with epoch_steps); {task.name!r} has no epochs: use train.eval_every.")
    return max(1, round(t.eval_every_epochs * task.epoch_steps(t.batch_size)))


_SINGLE = ((lambda a: a), (lambda t: t), 1, None)


def same_shapes(task_name: str, batches: list, step: int) -> None:
    """Refuse (ValueError, one line) a population's member batches of one step that differ in shape and carry no
    ``lengths`` (batches with lengths are padded to one length: see :func:`stack_batches`)."""
    shapes = {tuple(b.inputs.shape) for b in batches}
    if len(shapes) > 1 and any(b.lengths is None for b in batches):
        raise ValueError(
            f"population: task {task_name!r} gives the members batches of different shapes at step {step} "
            f"({', '.join(str(s) for s in sorted(shapes))}: a variable-length task batches each seed differently); "
            f"a population needs one shape per step. Train these trials one at a time (a study's population = 1), "
            f"or give the task's batches their lengths (tasks.SequenceSet does) so that members are padded to one.")


def stack_batches(batches: list) -> dict:
    """The members' batches of one step on a new axis 0; batches with ``lengths`` are first padded (zeros, weight
    0) to the longest member's length (the RNN freezes each row past its length: the padding changes nothing)."""
    T = max(b.inputs.shape[1] for b in batches)
    arrays = []
    for b in batches:
        a = b.arrays()
        if b.inputs.shape[1] < T:
            a = {k: (v if k == "lengths" else np.pad(v, [(0, 0), (0, T - v.shape[1])] + [(0, 0)] * (v.ndim - 2)))
                 for k, v in a.items()}
        arrays.append(a)
    out = {k: np.stack([a[k] for a in arrays]) for k in arrays[0]}
    out["reset"] = np.array([b.reset for b in batches], np.bool_)
    return out


class Engine:
    """The compiled steps and the batches of a run: ``stacked=False`` one member (optionally data parallel over
    ``devices``), ``stacked=True`` K members on axis 0 (one vmapped program; members differ only in
    :data:`~lstm_lab.training.optim.VMAPPED_FIELDS`)."""

    def __init__(self, cfgs: list, task, info: dict, tx, models: list, *, stacked: bool, devices=_SINGLE):
        self.cfgs, self.task, self.info, self.tx, self.models, self.stacked = cfgs, task, info, tx, models, stacked
        self.K = len(cfgs)
        self.t = cfgs[0].train
        self.stateful = info["stateful"]
        self.put_data, self.put_repl, self.n_devices, replicated = devices
        self.eval_every = eval_interval(self.t, task)
        self.parameters = int(sum(np.size(x) for x in jax.tree.leaves(nnx.state(models[0], nnx.Param))))
        train_step, eval_step = make_steps(models[0], task, tx, stateful=self.stateful, replicated=replicated)
        bases = [jax.random.key_data(jax.random.fold_in(jax.random.key(c.train.seed), 1)) for c in cfgs]
        if stacked:
            base, noise = jnp.stack(bases), jnp.asarray([c.model.input_noise for c in cfgs], jnp.float32)

            def step(params, opt_state, carry, batch, s):
                keys = jax.vmap(lambda kd: jax.random.fold_in(jax.random.wrap_key_data(kd), s))(base)
                return jax.vmap(train_step)(params, opt_state, carry, batch, keys, noise)

            eval_fn = jax.vmap(eval_step, in_axes=(0, 0, None))
        else:
            def step(params, opt_state, carry, batch, s):
                return train_step(params, opt_state, carry, batch,
                                  jax.random.fold_in(jax.random.wrap_key_data(bases[0]), s))

            eval_fn = eval_step
        self.step = jax.jit(step, donate_argnums=(0, 1, 2))
        self.eval_step = jax.jit(eval_fn)
        self._eval_cache: dict[str, list] = {}

    # -- state -----------------------------------------------------------------------------------------------
    def initial_state(self, txs: list) -> dict:
        """Parameters (from the models), optimizer states (``txs[m].init``: each member's hyperparameters) and
        carries, stacked when the engine is."""
        states = []
        for mdl, tx in zip(self.models, txs):
            params = nnx.split(mdl, nnx.Param, ...)[1]
            carry = mdl.initialize_carry(self.t.batch_size) if self.stateful else {}
            states.append({"params": params, "opt_state": tx.init(params), "carry": carry})
        return self.stack(states)

    def stack(self, states: list):
        return jax.tree.map(lambda *xs: jnp.stack(xs), *states) if self.stacked else states[0]

    def take(self, tree, m: int):
        """Member ``m``'s part of a (stacked) tree."""
        return jax.tree.map(lambda x: x[m], tree) if self.stacked else tree

    def place(self, state: dict) -> tuple:
        carry = self.put_data(state["carry"]) if self.stateful and self.n_devices > 1 else state["carry"]
        return self.put_repl(state["params"]), self.put_repl(state["opt_state"]), carry

    # -- data ------------------------------------------------------------------------------------------------
    def batches(self, start_step: int):
        """``(host arrays, input steps per member)`` for each training step from ``start_step`` (:meth:`put`
        places them; this runs in a prefetch thread, which must not touch devices): batch ``k`` of a member depends
        only on its seed and ``k``."""
        gens = [self.task.batches("train", batch_size=self.t.batch_size, seed=c.train.seed, start_step=start_step)
                for c in (self.cfgs if self.stacked else self.cfgs[:1])]
        k = start_step
        while True:
            bs = [next(g) for g in gens]
            if self.stacked:
                same_shapes(self.info["name"], bs, k)
                arrays = stack_batches(bs)
            else:
                arrays = {**bs[0].arrays(), "reset": np.bool_(bs[0].reset)}
            k += 1
            yield arrays, bs[0].inputs.shape[0] * bs[0].inputs.shape[1]

    def put(self, arrays: dict) -> dict:
        if self.stacked:
            return arrays
        return {k: (v if k == "reset" else self.put_data(v)) for k, v in arrays.items()}

    def evaluate(self, params, split: str) -> list[dict]:
        """Each member's metrics on ``split`` (every batch, in order; a stateful task carries between them)."""
        bs = self.t.eval_batch_size or self.t.batch_size
        if split not in self._eval_cache:
            put = (lambda a: a) if self.stacked else self.put_data
            self._eval_cache[split] = [{**{k: put(v) for k, v in b.arrays().items()}, "reset": np.bool_(b.reset)}
                                       for b in self.task.batches(split, batch_size=bs)]
        carry = {}
        if self.stateful:
            carry = self.stack([self.models[0].initialize_carry(bs)] * self.K)
            carry = self.put_data(carry) if self.n_devices > 1 else carry
        parts = []
        for b in self._eval_cache[split]:
            sums, carry = self.eval_step(params, carry, b)
            parts.append(jax.device_get(sums) if self.stacked else sums)
        if not self.stacked:
            return [self.task.summarize_batches(parts)]
        return [self.task.summarize_batches([{k: v[m] for k, v in p.items()} for p in parts]) for m in range(self.K)]


def _losses(pending: list) -> np.ndarray:
    """``[steps, members]`` float64 losses of ``pending`` ``(step, loss)`` pairs (one loss, or one per member)."""
    return np.stack([np.asarray(v, np.float64).reshape(-1) for v in jax.device_get([v for _, v in pending])])


def fit(engine: Engine, members: list[Member], ckpts: list[Checkpoints], state: dict, step: int, *, quiet: bool,
        log: Callable[[str], None], callbacks: Sequence[Callable[[int], None]] = (), label: str = "") -> list[dict]:
    """Train from ``state`` at ``step`` (each member's ``meta`` restored with it) to the end; one summary per
    member."""
    t, K = engine.t, engine.K
    params, opt_state, carry = engine.place(state)
    for m in members:
        m.open(step)
    # the losses after the last record, kept by an interrupt's checkpoint: the next record averages them too
    held = [m.meta.pop("pending_losses", None) or [] for m in members]
    pending = [(int(s), np.asarray([h[i][1] for h in held], np.float32)) for i, (s, _) in enumerate(held[0])]
    last_saved = step or None  # where a resume would start
    start_wall = time.perf_counter() - float(members[0].meta["wall_seconds"])
    last_log = (time.perf_counter(), step)
    bar = None
    if not quiet and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=step, desc=label, unit="step", dynamic_ncols=True, file=sys.stderr)

    def save(which: str, m: int, extra=None) -> None:
        meta = {**members[m].meta, "step": step, "wall_seconds": time.perf_counter() - start_wall, **(extra or {})}
        ckpts[m].save(which, step, engine.take({"params": params, "opt_state": opt_state, "carry": carry}, m), meta)

    batches = prefetch(engine.batches(step), size=4)
    try:
        with StopOnInterrupt(log) as stop:
            while step < t.steps and any(m.active for m in members):
                arrays, tokens = next(batches)
                params, opt_state, carry, loss = engine.step(params, opt_state, carry, engine.put(arrays),
                                                             np.int32(step))
                step += 1
                pending.append((step, loss))
                out_of_time = bool(t.max_minutes) and step < t.steps and \
                    time.perf_counter() - start_wall > 60 * t.max_minutes
                at_eval = step % engine.eval_every == 0 or step == t.steps or out_of_time  # also where time runs out
                if step % t.log_every == 0 or at_eval:
                    losses = _losses(pending)
                    now = time.perf_counter()
                    rate = (step - last_log[1]) * tokens / max(now - last_log[0], 1e-9) / K
                    last_log = (now, step)
                    for i, m in enumerate(members):
                        if m.active:
                            m.log_train(step, [s for s, _ in pending], losses[:, i], rate)
                    pending = []
                    if bar is not None:
                        bar.update(step - bar.n)
                        bar.set_postfix(loss=f"{np.nanmean(losses):.4f}", tok_s=f"{rate * K:,.0f}")
                if at_eval and any(m.active for m in members):
                    valid = engine.evaluate(params, "valid")
                    improved, factors = [False] * K, np.ones(K, np.float32)
                    for i, m in enumerate(members):
                        if m.active:
                            improved[i], factors[i] = m.log_valid(step, valid[i])
                            m.check_stops(step, out_of_time)
                    if (factors != 1).any():  # the plateau schedule: each member's learning rate, in its state
                        opt_state = scale_learning_rate(opt_state, factors if engine.stacked else factors[0])
                    if not quiet and not engine.stacked:
                        text = f"step {step}/{t.steps}: valid " + ", ".join(f"{k} {v:.4g}" for k, v in valid[0].items())
                        bar.write(text) if bar is not None else log(text)
                    for i in range(K):
                        if improved[i]:
                            save("best", i)
                        save("last", i)
                    last_saved = step
                for cb in callbacks:
                    cb(step)
                if stop.set and step < t.steps:
                    if last_saved != step:
                        losses = _losses(pending)
                        if np.isfinite(losses).all():  # else the resume shows the divergence
                            for i in range(K):
                                save("last", i, {"pending_losses": [(s, float(v)) for (s, _), v in
                                                                    zip(pending, losses[:, i])]})
                            last_saved = step
                    raise TrainingInterrupted(members[0].wd, step, last_saved)
    except BaseException as e:
        for m in members:
            m.close()
        if isinstance(e, KeyboardInterrupt) and not isinstance(e, TrainingInterrupted):  # a second Ctrl-C
            raise TrainingInterrupted(members[0].wd, step, last_saved) from None
        raise
    finally:
        batches.close()
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - start_wall
    # the best checkpoint of each member (a member without one keeps a placeholder and reports no scores)
    current = {"params": params, "opt_state": opt_state, "carry": carry}
    bests = [ckpts[i].restore("best", engine.take(current, i)) for i in range(K)]
    valid = test = [None] * K
    if any(b is not None for b in bests):
        best_params = engine.put_repl(engine.stack([engine.take(params, i) if b is None else b[0]["params"]
                                                    for i, b in enumerate(bests)]))
        valid, test = engine.evaluate(best_params, "valid"), engine.evaluate(best_params, "test")
    return [m.finish(engine.task, engine.info, step, wall, valid[i] if bests[i] else None,
                     test[i] if bests[i] else None, engine.n_devices, parameters=engine.parameters)
            for i, m in enumerate(members)]

