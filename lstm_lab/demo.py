"""A short demo: train a small model on the adding problem and print the loss falling.

The adding problem (Hochreiter & Schmidhuber 1997; Le et al. 2015): two input
channels over ``T`` steps, values uniform in [0, 1] and a marker channel with
exactly two ones, one in each half; the target is the sum of the two marked
values. Always predicting 1.0 scores an MSE of about 0.167.

Run it with ``lstm-lab demo`` (``--cell``, ``--steps``, ``--length``, ...).
This stands in for the default study until the study runner exists.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lstm_lab.recurrent import RNN


def adding_batch(key: jax.Array, batch_size: int, length: int) -> tuple[jax.Array, jax.Array]:
    """``x`` ``[batch, length, 2]`` and target ``[batch]`` of the adding problem."""
    k_v, k_a, k_b = jax.random.split(key, 3)
    values = jax.random.uniform(k_v, (batch_size, length))
    half = length // 2
    first = jax.random.randint(k_a, (batch_size,), 0, half)
    second = jax.random.randint(k_b, (batch_size,), half, length)
    t = jnp.arange(length)[None, :]
    marker = ((t == first[:, None]) | (t == second[:, None])).astype(jnp.float32)
    return jnp.stack([values, marker], axis=-1), jnp.sum(values * marker, axis=1)


class Regressor(nnx.Module):
    """RNN -> the last step's output -> a linear read-out."""

    def __init__(self, cell: str, hidden_size: int, *, rngs: nnx.Rngs):
        self.rnn = RNN(2, hidden_size, cell, rngs=rngs)
        self.head = nnx.Linear(hidden_size, 1, rngs=rngs)

    def __call__(self, x):
        y, _ = self.rnn(x)
        return self.head(y[:, -1])[:, 0]


def run_demo(cell: str = "lstm", *, steps: int = 400, length: int = 30, hidden_size: int = 32,
             batch_size: int = 64, learning_rate: float = 1e-2, seed: int = 0, log_every: int = 50,
             print_fn=print) -> list[tuple[int, float]]:
    """Train and return ``[(step, mean training MSE over the last log_every steps), ...]``."""
    model = Regressor(cell, hidden_size, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(learning_rate))
    opt_state = tx.init(params)

    def loss_fn(params, x, target):
        return jnp.mean((nnx.merge(graphdef, params)(x) - target) ** 2)

    @jax.jit
    def train_step(params, opt_state, key):
        x, target = adding_batch(key, batch_size, length)
        loss, grads = jax.value_and_grad(loss_fn)(params, x, target)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    print_fn(f"adding problem, T={length}: {cell} with {hidden_size} units, Adam lr={learning_rate}, "
             f"batch {batch_size}; predicting 1.0 scores MSE ~0.167")
    key = jax.random.key(seed)
    history, window, start = [], [], time.perf_counter()
    for i in range(1, steps + 1):
        key, sub = jax.random.split(key)
        params, opt_state, loss = train_step(params, opt_state, sub)
        window.append(loss)
        if i % log_every == 0 or i == steps:
            mean = float(jnp.mean(jnp.stack(window)))
            window = []
            history.append((i, mean))
            print_fn(f"step {i:5d}  train MSE {mean:.4f}  ({time.perf_counter() - start:.1f}s)")
    return history
