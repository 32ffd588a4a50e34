"""A short demo: train a small model on the adding problem and print the loss falling.

Uses the ``adding`` task of :mod:`lstm_lab.tasks` (two input channels over
``T`` steps, values and a marker with two ones; the target is the sum of the
two marked values; always predicting 1.0 scores an MSE of 1/6).

Run it with ``lstm-lab demo`` (``--cell``, ``--steps``, ``--length``, ...): about 10 s on a 2-core CPU.
It ends with the validation MSE against the baseline. ``lstm-lab sweep experiments/quick.py`` is the
default study.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lstm_lab import tasks
from lstm_lab.recurrent import RNN


class Regressor(nnx.Module):
    """RNN -> a linear read-out at every step (the task reads the last)."""

    def __init__(self, in_features: int, cell: str, hidden_size: int, *, rngs: nnx.Rngs):
        self.rnn = RNN(in_features, hidden_size, cell, rngs=rngs)
        self.head = nnx.Linear(hidden_size, 1, rngs=rngs)

    def __call__(self, x):
        y, _ = self.rnn(x)
        return self.head(y)


def run_demo(cell: str = "lstm", *, steps: int = 400, length: int = 30, hidden_size: int = 32,
             batch_size: int = 64, learning_rate: float = 1e-2, seed: int = 0, log_every: int = 50,
             print_fn=print) -> list[tuple[int, float]]:
    """Train and return ``[(step, mean training MSE over the last log_every steps), ...]``."""
    task = tasks.get("adding", T=length)
    model = Regressor(task.input_size, cell, hidden_size, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(learning_rate))
    opt_state = tx.init(params)

    def loss_fn(params, batch):
        return task.loss(nnx.merge(graphdef, params)(batch["inputs"]), batch)

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    print_fn(f"adding problem, T={length}: {cell} with {hidden_size} units, Adam lr={learning_rate}, "
             f"batch {batch_size}; predicting 1.0 scores MSE {task.baseline['mse']:.3f}")
    history, window, start = [], [], time.perf_counter()
    batches = task.batches("train", batch_size=batch_size, seed=seed)
    for i in range(1, steps + 1):
        params, opt_state, loss = train_step(params, opt_state, next(batches).arrays())
        window.append(loss)
        if i % log_every == 0 or i == steps:
            mean = float(jnp.mean(jnp.stack(window)))
            window = []
            history.append((i, mean))
            print_fn(f"step {i:5d}  train MSE {mean:.4f}  ({time.perf_counter() - start:.1f}s)")
    forward = jax.jit(lambda params, x: nnx.merge(graphdef, params)(x))
    valid = task.evaluate(lambda b: forward(params, b.arrays()["inputs"]), "valid", 256)["mse"]
    base = task.baseline["mse"]
    verdict = "learned the task" if valid < 0.1 * base else ("beats the baseline" if valid < base else
                                                             "does not beat the baseline yet (more --steps)")
    print_fn(f"done: validation MSE {valid:.4f} = {100 * valid / base:.1f}% of the baseline {base:.3f} "
             f"(always predicting 1.0) after {steps} steps in {time.perf_counter() - start:.1f}s: {verdict}")
    return history
