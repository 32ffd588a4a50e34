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

Determinism: training batch ``k`` is a pure function of ``(seed, k)``, the
dropout/noise key of step ``k`` is ``fold_in(key(seed), k)``, and a checkpoint
holds the parameters, optimizer state, the carry passed between language-model
windows, the step, the learning-rate scale and the evaluation history, so a
run killed and resumed ends with bitwise the metrics of an uninterrupted one
on the CPU.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lstm_lab
from lstm_lab import tasks as tasks_lib
from lstm_lab._hints import did_you_mean
from lstm_lab._io import atomic_json as _atomic_json, json_default as _json_default
from lstm_lab.config import Config, OptimConfig, to_dict
from lstm_lab.data.batching import prefetch
from lstm_lab.distributed import is_primary
from lstm_lab.models import SequenceModel, cell_from_config

__all__ = ["train", "build_optimizer", "make_optimizer", "load_model", "build_model", "RunConflictError", "STATUSES",
           "load_run", "sample"]

STATUSES = ("completed", "diverged", "stopped_early", "failed")
OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "cosine", "plateau")
DEBUG_KILL_ENV = "LSTM_LAB_DEBUG_SIGKILL_AT_STEP"  # tests: SIGKILL this process after that step


class RunConflictError(RuntimeError):
    """The workdir holds a different run."""


def _choice(kind: str, value: str, options) -> str:
    if value not in options:
        raise ValueError(f"config: {kind}={value!r} is not one of {', '.join(options)}.{did_you_mean(value, options)}")
    return value


# ---------------------------------------------------------------------------
# Optimizer and model
# ---------------------------------------------------------------------------
def build_optimizer(ocfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """An ``optax.chain``: global-norm clipping, then the optimizer with its schedule.

    ``plateau`` is a constant schedule here; the fit loop multiplies the
    updates by a learning-rate scale that it lowers when validation stalls.
    """
    _choice("optim.name", ocfg.name, OPTIMIZERS)
    _choice("optim.schedule", ocfg.schedule, SCHEDULES)
    if not ocfg.learning_rate > 0:
        raise ValueError(f"config: optim.learning_rate must be > 0; got {ocfg.learning_rate!r}.")
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


class _Checkpoints:
    """Orbax CheckpointManagers: ``last`` (keep k) and ``best`` (keep 1). A checkpoint is the
    train state's leaves plus JSON metadata; an unreadable one falls back to the one before."""

    def __init__(self, workdir: pathlib.Path, keep: int, log: Callable[[str], None]):
        import orbax.checkpoint as ocp

        self.ocp, self.log = ocp, log
        root = (workdir / "checkpoints").absolute()
        opts = lambda n: ocp.CheckpointManagerOptions(max_to_keep=n, create=True,  # noqa: E731
                                                      enable_async_checkpointing=False)
        self.managers = {"last": ocp.CheckpointManager(root / "last", options=opts(max(1, keep))),
                         "best": ocp.CheckpointManager(root / "best", options=opts(1))}

    def save(self, which: str, step: int, state, meta: dict) -> None:
        leaves = {f"{i:05d}": _to_host(leaf) for i, leaf in enumerate(jax.tree.leaves(state))}
        mgr = self.managers[which]
        if step in mgr.all_steps():  # the same step again (a resumed run's final save)
            return
        mgr.save(step, args=self.ocp.args.Composite(state=self.ocp.args.StandardSave(leaves),
                                                    meta=self.ocp.args.JsonSave(_normalized(meta))))
        mgr.wait_until_finished()

    def restore(self, which: str, target) -> tuple[Any, dict] | None:
        mgr = self.managers[which]
        treedef = jax.tree.structure(target)
        # shapes and dtypes only: no device-to-host copy (nor a cross-process gather) for a template
        template = {f"{i:05d}": np.empty(np.shape(leaf), getattr(leaf, "dtype", None) or np.asarray(leaf).dtype)
                    for i, leaf in enumerate(jax.tree.leaves(target))}
        for step in sorted(mgr.all_steps(), reverse=True):
            try:
                out = mgr.restore(step, args=self.ocp.args.Composite(
                    state=self.ocp.args.StandardRestore(template), meta=self.ocp.args.JsonRestore()))
                leaves = [out["state"][k] for k in sorted(template)]
                for k, got in zip(sorted(template), leaves):
                    if np.shape(got) != template[k].shape:
                        raise ValueError(f"leaf {k} has shape {np.shape(got)}, expected {template[k].shape}")
                return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in leaves]), dict(out["meta"])
            except Exception as e:  # noqa: BLE001 - a corrupt checkpoint: say so, fall back
                self.log(f"warning: the {which} checkpoint at step {step} is unreadable "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                         f"falling back to the previous one")
        return None

    def has_any(self) -> bool:
        return bool(self.managers["last"].all_steps())

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


def _prepare_workdir(workdir: pathlib.Path, record: dict, force: bool, log) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    cfile = workdir / "config.json"
    if cfile.exists():
        stored = json.loads(cfile.read_text()).get("config")
        if _normalized(stored) != _normalized(record["config"]):
            a = {f"{s}.{k}": v for s, sec in (_normalized(stored) or {}).items() for k, v in sec.items()}
            b = {f"{s}.{k}": v for s, sec in _normalized(record["config"]).items() for k, v in sec.items()}
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            if not force:
                raise RunConflictError(
                    f"workdir {str(workdir)!r} holds a run with a different config (differs in {', '.join(diff)}). "
                    f"Use another --workdir, or --force to move the old run aside.")
            aside = workdir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            aside.mkdir()
            for p in list(workdir.iterdir()):
                if p != aside and not p.name.startswith("replaced-"):
                    shutil.move(str(p), aside / p.name)
            log(f"moved the previous run (config differed in {', '.join(diff)}) to {aside}")
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


def train(cfg: Config, workdir, *, force: bool = False, resume: bool | None = None, quiet: bool = False,
          log: Callable[[str], None] | None = None) -> dict:
    """Train ``cfg`` in ``workdir`` and return the summary (also written to ``summary.json``).

    A workdir with checkpoints of the same config resumes; one with a
    finished run returns its summary; one with a different config raises
    :class:`RunConflictError` unless ``force`` (the old run is moved aside).
    ``resume=True`` requires a checkpoint to resume from. A diverging run
    returns ``status="diverged"``; an exception is recorded as
    ``status="failed"`` and raised.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    wd = pathlib.Path(workdir)
    t = cfg.train
    for name in ("steps", "batch_size", "eval_every", "log_every"):
        if getattr(t, name) < 1:
            raise ValueError(f"config: train.{name} must be >= 1; got {getattr(t, name)!r}.")
    task = tasks_lib.get(cfg.task.name, **cfg.task.options)
    tx = build_optimizer(cfg.optim, t.steps)
    _prepare_workdir(wd, run_record(cfg), force, log)
    summary_path = wd / "summary.json"
    if summary_path.exists() and not force:
        done = json.loads(summary_path.read_text())
        if done.get("status") in ("completed", "stopped_early", "diverged"):
            log(f"{wd}: this run already finished ({done['status']}); summary.json is its record")
            return done
    info = _task_info(task)
    if is_primary():
        _atomic_json(wd / "task.json", info)
        task.save(wd)
    try:
        return _fit(cfg, task, info, tx, wd, resume=resume, quiet=quiet, log=log)
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)) or not is_primary():
            raise
        _atomic_json(summary_path, {"status": "failed", "error": f"{type(e).__name__}: {e}", "workdir": str(wd)})
        raise


def _fit(cfg: Config, task, info, tx, wd: pathlib.Path, *, resume, quiet, log) -> dict:
    t = cfg.train
    eval_bs = t.eval_batch_size or t.batch_size
    put_data, put_repl, n_dev, replicated = _device_setup(t.batch_size, eval_bs)
    model = build_model(cfg, info)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    stateful = info["stateful"]
    carry0 = model.initialize_carry(t.batch_size) if stateful else {}
    state = {"params": params, "opt_state": tx.init(params), "carry": carry0}
    ckpt = _Checkpoints(wd, t.keep_checkpoints, log)
    meta = {"step": 0, "lr_scale": 1.0, "best_valid": None, "best_step": None, "bad_evals": 0, "plateau_bad": 0,
            "history": [], "wall_seconds": 0.0}
    if ckpt.has_any():
        restored = ckpt.restore("last", state)
        if restored is None:
            raise RuntimeError(f"{wd}: no checkpoint could be read; move checkpoints/ aside to start over.")
        state, meta = restored
        log(f"resuming {wd} from step {meta['step']}")
    elif resume:
        raise FileNotFoundError(f"--resume: {str(wd)!r} has no checkpoint to resume from.")

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
    base_key = jax.random.fold_in(jax.random.key(t.seed), 1)
    kill_at = int(os.environ.get(DEBUG_KILL_ENV, "0") or 0)
    metrics = _Metrics(wd, quiet)
    bar = None
    if not quiet and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=t.steps, initial=step, desc=f"{info['name']}:{cfg.model.cell}", unit="step",
                   dynamic_ncols=True, file=sys.stderr)
    status, reason, diverged_at = "completed", None, None
    start_wall = time.perf_counter() - float(meta["wall_seconds"])
    pending: list[tuple[int, jax.Array]] = []
    last_log_time, last_log_step = time.perf_counter(), step

    def checkpoint_meta():
        return {**meta, "step": step, "wall_seconds": time.perf_counter() - start_wall}

    batches = prefetch(task.batches("train", batch_size=t.batch_size, seed=t.seed, start_step=step), size=4)
    try:
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
                if t.early_stop_patience and meta["bad_evals"] >= t.early_stop_patience:
                    status, reason = "stopped_early", (f"no validation improvement in {meta['bad_evals']} "
                                                       f"evaluations (best at step {meta['best_step']})")
                    break
                if out_of_time:
                    status, reason = "stopped_early", f"time limit of {t.max_minutes} minutes"
                    break
            if kill_at and step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
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
    ckpt.close()
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

    wd = pathlib.Path(workdir)
    cfg, info = load_run(wd)
    if not (wd / "vocab.json").exists():
        raise ValueError(f"{str(wd)!r} is a {info['name']} run; sampling needs a language model (char_lm, word_lm).")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature!r}.")
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
