"""Trials per minute: K trials trained one after another (``training.train``) vs as one vmapped population
(``population.train_population``), on the quick study's copy-task config.

    python benchmarks/population_throughput.py --population 16 [--steps 300] [--impl auto] [--out results.json]
    python benchmarks/population_throughput.py --impl scan_vjp,native     # the kernels side by side

Both sides include compilation and evaluation, as a sweep pays them. Sequential
time is measured on ``--sequential`` trials (default 4) and scaled to K.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time

import jax
import numpy as np

from lstm_lab.config import Config, apply_overrides
from lstm_lab.training import train_population
from lstm_lab.training import train


def configs(k: int, steps: int, hidden: int, cell: str, impl: str = "auto"):
    rng = np.random.default_rng(0)
    base = {"task.name": "copy", "task.options": {"T": 5}, "model.hidden_size": hidden, "model.cell": cell,
            "model.impl": impl,
            "optim.name": "adam", "train.batch_size": 32, "train.steps": steps, "train.eval_every": max(1, steps // 3),
            "train.log_every": 50, "train.eval_batch_size": 250, "train.keep_checkpoints": 1}
    return [apply_overrides(Config(), {**base, "optim.learning_rate": float(np.exp(rng.uniform(np.log(1e-3),
                                                                                                  np.log(3e-2)))),
                                       "model.input_noise": float(rng.uniform(0, 0.3)), "train.seed": i})
            for i in range(k)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--sequential", type=int, default=4, help="trials timed one after another")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--cell", default="vanilla")
    ap.add_argument("--impl", default="auto", help="model.impl; several, comma-separated, are measured in turn")
    ap.add_argument("--out", help="write the result(s) as JSON")
    a = ap.parse_args()
    rows = [measure(a, impl) for impl in a.impl.split(",")]
    print(f"{'impl':<10}{'mode':<12}{'trials/min':>12}")
    for row in rows:
        print(f"{row['impl']:<10}{'sequential':<12}{row['sequential_trials_per_min']:>12.1f}")
        print(f"{row['impl']:<10}{'population':<12}{row['population_trials_per_min']:>12.1f}   (K={a.population}, "
              f"{row['speedup']:.2f}x sequential)")
    if len(rows) > 1:
        base = rows[0]
        for row in rows[1:]:
            print(f"population trials/min, {row['impl']} / {base['impl']}: "
                  f"{row['population_trials_per_min'] / base['population_trials_per_min']:.2f}x")
    print(f"on {rows[0]['backend']} ({rows[0]['device']}, {rows[0]['cpu_count']} cores; {rows[0]['cpu_model']})")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows[0] if len(rows) == 1 else rows, f, indent=2)


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def measure(a, impl: str) -> dict:
    cfgs = configs(a.population, a.steps, a.hidden, a.cell, impl)
    tmp = tempfile.mkdtemp()
    try:
        t0 = time.perf_counter()
        for i, c in enumerate(cfgs[:a.sequential]):
            train(c, f"{tmp}/seq{i}", quiet=True, log=lambda m: None)
        seq = (time.perf_counter() - t0) / a.sequential
        t0 = time.perf_counter()
        train_population(cfgs, [f"{tmp}/pop{i}" for i in range(a.population)], quiet=True)
        pop = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"impl": impl, "population": a.population, "steps": a.steps, "hidden": a.hidden, "cell": a.cell,
            "sequential_s_per_trial": seq, "population_s": pop, "sequential_trials_per_min": 60 / seq,
            "population_trials_per_min": 60 * a.population / pop, "speedup": seq * a.population / pop,
            "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
            "cpu_count": __import__("os").cpu_count(), "machine": platform.machine(), "cpu_model": _cpu_model()}


if __name__ == "__main__":
    main()
