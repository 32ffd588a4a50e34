"""Populations: many trials of one shape trained as one program, ``jax.vmap`` over their parameters,
optimizer states and per-trial hyperparameters.

``train_population(cfgs, workdirs)`` trains K configs that differ only in what
:func:`population_key` leaves out — the learning rate, momentum, Adam's betas,
weight decay, input noise, the initialisation (forget bias, chrono) and the
seed (parameters, data order, dropout and noise keys) — and returns one run
summary per member, equal to what :func:`lstm_lab.training.train` returns for
that config alone (same evaluations, early stopping, divergence handling and
best-validation test score; ``tests/test_population.py`` holds them equal).

Each member keeps its own run directory (config.json, metrics.jsonl,
summary.json), locked for the whole call as a solo run locks its own
(:class:`lstm_lab.training.WorkdirLock`); the config, task, optimizers and
model are checked before any of them is written. A population keeps no
checkpoints: one cut off is trained again from the start, its metrics.jsonl
rewritten (a sweep re-runs its trials).
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

__all__ = ["population_key", "train_population", "VMAPPED_FIELDS"]

VMAPPED_FIELDS = ("optim.learning_rate", "optim.momentum", "optim.b1", "optim.b2", "optim.weight_decay",
                  "model.input_noise", "model.forget_bias", "model.chrono_init", "train.seed")


def population_key(cfg) -> str:
    """Configs with the same key can train in one population (everything but :data:`VMAPPED_FIELDS` equal)."""
    from lstm_lab.config import to_overrides

    flat = {k: v for k, v in to_overrides(cfg).items() if k not in VMAPPED_FIELDS}
    return json.dumps(flat, sort_keys=True, default=str)


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _stacked_batches(task, batch_size: int, seeds: list[int]):
    gens = [task.batches("train", batch_size=batch_size, seed=s, start_step=0) for s in seeds]
    while True:
        bs = [next(g) for g in gens]
        arrays = {k: np.stack([b.arrays()[k] for b in bs]) for k in bs[0].arrays()}
        arrays["reset"] = np.array([b.reset for b in bs], np.bool_)
        yield arrays, bs[0].inputs.shape[0] * bs[0].inputs.shape[1]


def train_population(cfgs: list, workdirs: list, *, quiet: bool = True, log: Callable[[str], None] | None = None,
                     force: bool = False) -> list[dict]:
    """Train ``cfgs`` together (one ``jax.vmap``-ed program); one summary per member (see module doc)."""
    from lstm_lab import tasks as tasks_lib
    from lstm_lab import training as tr

    log = log or (lambda msg: print(msg, file=sys.stderr))
    if len(cfgs) != len(workdirs) or not cfgs:
        raise ValueError(f"train_population: {len(cfgs)} configs and {len(workdirs)} workdirs; need the same, >= 1.")
    keys = {population_key(c) for c in cfgs}
    if len(keys) != 1:
        raise ValueError("train_population: the configs differ in more than the vmapped fields "
                         f"({', '.join(VMAPPED_FIELDS)}); group them with population_key().")
    K = len(cfgs)
    cfg0 = cfgs[0]
    t = cfg0.train
    for c in cfgs:
        tr.build_optimizer(c.optim, t.steps)  # the checks of a solo run
    task = tasks_lib.get(cfg0.task.name, **cfg0.task.options)
    info = tr._task_info(task)
    models = [tr.build_model(c, info) for c in cfgs]
    tr._trace_one_step(models[0], task, cfg0)  # the members differ in no shape
    records = [tr.run_record(c, population=K) for c in cfgs]
    wds = [pathlib.Path(w) for w in workdirs]
    if len({w.absolute() for w in wds}) != K:
        raise ValueError("train_population: two members share a workdir; give each its own.")
    with contextlib.ExitStack() as locks:  # nothing above wrote anything; every member's workdir is locked
        for wd in wds:
            locks.enter_context(tr.WorkdirLock(wd))
        try:
            return _train_locked(cfgs, wds, records, models, task, info, quiet=quiet, log=log, force=force)
        except OSError as e:
            bad = [wd for wd in wds if tr._is_not_writable(e, wd)]
            if bad:
                raise tr._not_writable(bad[0], e) from None
            raise


def _train_locked(cfgs, wds, records, models, task, info, *, quiet, log, force) -> list[dict]:
    from lstm_lab import training as tr

    K = len(cfgs)
    done: dict[int, dict] = {}
    for m, (c, wd) in enumerate(zip(cfgs, wds)):
        tr._prepare_workdir(wd, records[m], force, log)
        sp = wd / "summary.json"
        if sp.exists() and not force:
            s = json.loads(sp.read_text())
            if s.get("status") in ("completed", "stopped_early", "diverged"):
                done[m] = s
        tr._atomic_json(wd / "task.json", info)
        task.save(wd)
        if m not in done:
            (wd / "metrics.jsonl").write_text("")  # a population starts over (it keeps no checkpoints)
    if len(done) == K:
        return [done[m] for m in range(K)]
    todo = [m for m in range(K) if m not in done]
    sub = _fit_population([cfgs[m] for m in todo], [wds[m] for m in todo], [models[m] for m in todo], task, info,
                          quiet=quiet, log=log)
    out = dict(done)
    out.update(zip(todo, sub))
    return [out[m] for m in range(K)]


def _fit_population(cfgs, wds, models, task, info, *, quiet, log) -> list[dict]:
    from lstm_lab import training as tr
    from lstm_lab.data.batching import prefetch

    K = len(cfgs)
    cfg0 = cfgs[0]
    t = cfg0.train
    eval_bs = t.eval_batch_size or t.batch_size
    stateful = info["stateful"]
    graphdef, _, rest = nnx.split(models[0], nnx.Param, ...)
    params = _stack([nnx.split(mdl, nnx.Param, ...)[1] for mdl in models])
    template = models[0]
    f32 = lambda name: jnp.asarray([getattr(c.optim, name) for c in cfgs], jnp.float32)  # noqa: E731
    hyper = {name: f32(name) for name in tr.VMAPPABLE_OPTIM}
    noise = jnp.asarray([c.model.input_noise for c in cfgs], jnp.float32)
    seeds = [c.train.seed for c in cfgs]
    base_keys = jnp.stack([jax.random.key_data(jax.random.fold_in(jax.random.key(s), 1)) for s in seeds])

    def make_tx(h):
        return tr.make_optimizer(cfg0.optim, t.steps, hyper=h)

    opt_state = jax.vmap(lambda h, p: make_tx(h).init(p))(hyper, params)
    carry = _stack([template.initialize_carry(t.batch_size)] * K) if stateful else {}

    def reset(c, r):
        return jax.tree.map(lambda x: jnp.where(r, jnp.zeros_like(x), x), c)

    def member_step(params, opt_state, carry, batch, reset_flag, key_data, step, lr_scale, h, noise_std):
        key = jax.random.fold_in(jax.random.wrap_key_data(key_data), step)
        if stateful:
            carry = reset(carry, reset_flag)

        def loss_fn(p, c):
            mdl = nnx.merge(graphdef, p, rest)
            out, new_c = mdl(batch["inputs"], c if stateful else None, key=key, train=True, input_noise=noise_std)
            return task.loss(out, batch), (new_c if stateful else {})

        (loss, new_carry), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, carry)
        tx = make_tx(h)
        updates, opt_state = tx.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: u * lr_scale, updates)
        return optax.apply_updates(params, updates), opt_state, jax.lax.stop_gradient(new_carry), loss

    def pop_step(params, opt_state, carry, batch, reset_flags, step, lr_scale):
        return jax.vmap(member_step, in_axes=(0, 0, 0, 0, 0, 0, None, 0, 0, 0))(
            params, opt_state, carry, batch, reset_flags, base_keys, step, lr_scale, hyper, noise)

    def member_eval(params, carry, batch):
        mdl = nnx.merge(graphdef, params, rest)
        if stateful:
            carry = reset(carry, batch["reset"])
        out, new_c = mdl(batch["inputs"], carry if stateful else None, train=False)
        return task.metric_sums(out, batch), (new_c if stateful else {})

    pop_step = jax.jit(pop_step, donate_argnums=(0, 1, 2))
    pop_eval = jax.jit(jax.vmap(member_eval, in_axes=(0, 0, None)))
    eval_cache: dict[str, list] = {}

    def evaluate(params, split) -> list[dict]:
        if split not in eval_cache:
            eval_cache[split] = [{**b.arrays(), "reset": np.bool_(b.reset)}
                                 for b in task.batches(split, batch_size=eval_bs)]
        c = _stack([template.initialize_carry(eval_bs)] * K) if stateful else {}
        parts = []
        for b in eval_cache[split]:
            sums, c = pop_eval(params, c, b)
            parts.append(jax.device_get(sums))
        return [task.summarize_batches([{k: v[m] for k, v in p.items()} for p in parts]) for m in range(K)]

    metrics = [tr._Metrics(wd, True) for wd in wds]
    meta = [{"lr_scale": 1.0, "best_valid": None, "best_step": None, "bad_evals": 0, "plateau_bad": 0, "history": []}
            for _ in range(K)]
    status = ["completed"] * K
    reason: list = [None] * K
    diverged_at: list = [None] * K
    end_step = [t.steps] * K
    active = np.ones(K, bool)
    best_params = None
    has_best = np.zeros(K, bool)
    step = 0
    start = time.perf_counter()
    pending = []
    last_t, last_s = time.perf_counter(), 0
    bar = None
    if not quiet and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=t.steps, desc=f"population x{K}", unit="step", dynamic_ncols=True, file=sys.stderr)
    batches = prefetch(_stacked_batches(task, t.batch_size, [c.train.seed for c in cfgs]), size=4)
    try:
        while step < t.steps and active.any():
            arrays, tokens = next(batches)
            reset_flags = arrays.pop("reset")
            lr_scale = np.asarray([m["lr_scale"] for m in meta], np.float32)
            params, opt_state, carry, loss = pop_step(params, opt_state, carry, arrays, reset_flags,
                                                      np.int32(step), lr_scale)
            step += 1
            pending.append(loss)
            at_eval = step % t.eval_every == 0 or step == t.steps
            out_of_time = bool(t.max_minutes) and step < t.steps and time.perf_counter() - start > 60 * t.max_minutes
            at_eval = at_eval or out_of_time
            if step % t.log_every == 0 or at_eval:
                losses = np.asarray(jax.device_get(pending), np.float64)  # [n, K]
                now = time.perf_counter()
                rate = (step - last_s) * tokens / max(now - last_t, 1e-9)
                last_t, last_s = now, step
                for m in np.flatnonzero(active):
                    bad = np.flatnonzero(~np.isfinite(losses[:, m]))
                    if bad.size:
                        diverged_at[m] = step - len(pending) + int(bad[0]) + 1
                        status[m], reason[m] = "diverged", f"non-finite training loss at step {diverged_at[m]}"
                        metrics[m].write({"kind": "diverged", "step": diverged_at[m]})
                        active[m], end_step[m] = False, step
                        continue
                    metrics[m].write({"kind": "train", "step": step, "loss": float(losses[:, m].mean()),
                                      "tokens_per_s": rate / K, "lr_scale": meta[m]["lr_scale"], "population": K})
                pending = []
                if bar is not None:
                    bar.update(step - bar.n)
            if at_eval and active.any():
                valid = evaluate(params, "valid")
                improved = np.zeros(K, bool)
                for m in np.flatnonzero(active):
                    metrics[m].write({"kind": "valid", "step": step, **valid[m]})
                    improved[m] = tr.record_evaluation(meta[m], valid[m], step, cfg0.optim)
                if improved.any():
                    sel = jnp.asarray(improved)
                    pick = lambda new, old: jnp.where(sel.reshape((K,) + (1,) * (new.ndim - 1)), new, old)  # noqa
                    best_params = (jax.tree.map(jnp.copy, params) if best_params is None
                                   else jax.tree.map(pick, params, best_params))
                    has_best |= improved
                for m in np.flatnonzero(active):
                    if t.early_stop_patience and meta[m]["bad_evals"] >= t.early_stop_patience:
                        status[m] = "stopped_early"
                        reason[m] = (f"no validation improvement in {meta[m]['bad_evals']} evaluations "
                                     f"(best at step {meta[m]['best_step']})")
                        active[m], end_step[m] = False, step
                    elif out_of_time:
                        status[m], reason[m] = "stopped_early", f"time limit of {t.max_minutes} minutes"
                        active[m], end_step[m] = False, step
    finally:
        batches.close()
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - start
    valid = test = [None] * K
    if best_params is not None:
        valid, test = evaluate(best_params, "valid"), evaluate(best_params, "test")
    summaries = []
    for m, (c, wd) in enumerate(zip(cfgs, wds)):
        v, te = (valid[m], test[m]) if has_best[m] else (None, None)
        if te is not None:
            metrics[m].write({"kind": "test", "step": meta[m]["best_step"], **te})
        metrics[m].close()
        summaries.append(tr.run_summary(
            c, task, info, wd, status=status[m], reason=reason[m], steps=end_step[m] if not active[m] else step,
            diverged_at=diverged_at[m], best_step=meta[m]["best_step"], wall=wall, valid=v, test=te, devices=1,
            population=K))
    if not quiet:
        log(f"population of {K}: {sum(x == 'completed' for x in status)} completed in {wall:.1f}s")
    return summaries
