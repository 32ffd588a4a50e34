"""One training step and one evaluation step: the only definition of them.

A solo run jits them; a population (:mod:`lstm_lab.training.population`) jits them under ``jax.vmap``
(members on axis 0 of the parameters, optimizer state, carry, batch, key and input noise). The
optimizer's hyperparameters are in its state (:mod:`lstm_lab.training.optim`), so a step takes none.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

__all__ = ["make_steps"]


def _reset(carry, flag):
    """A new epoch (or split) starts from zeros."""
    return jax.tree.map(lambda c: jnp.where(flag, jnp.zeros_like(c), c), carry)


def make_steps(model, task, tx: optax.GradientTransformation, *, stateful: bool,
               replicated=None) -> tuple[Callable, Callable]:
    """``train_step(params, opt_state, carry, batch, key, input_noise=None) -> (params, opt_state, carry, loss)``
    and ``eval_step(params, carry, batch) -> (metric sums, carry)``, not jitted.

    ``model`` gives the graph (its parameters are passed in); ``batch`` is the task's arrays plus ``reset`` (a
    stateful task's carry restarts from zeros where it is set; ``lengths``, when a task's batches have them, go to
    the model); ``input_noise`` (a scalar array) replaces the
    model's configured input noise (a population's members differ in it). ``replicated``: multi-host runs
    replicate the metric sums (a sharding) so that the host sums them.
    """
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    weight_noise = float(model.cfg.weight_noise)

    def noisy(params, key):
        """Graves (2011) weight noise: the weight matrices (not biases or peepholes) plus N(0, std^2), drawn anew
        at every step; the gradient is taken there and applied to the noiseless weights."""
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.fold_in(key, 0x5EED), len(leaves))
        return jax.tree.unflatten(treedef, [p + weight_noise * jax.random.normal(k, p.shape, p.dtype) if p.ndim >= 2
                                            else p for p, k in zip(leaves, keys)])

    def loss_fn(params, carry, batch, key, input_noise):
        if weight_noise:
            params = noisy(params, key)
        out, new_carry = nnx.merge(graphdef, params, rest)(batch["inputs"], carry if stateful else None, key=key,
                                                           train=True, input_noise=input_noise,
                                                           lengths=batch.get("lengths"))
        return task.loss(out, batch), (new_carry if stateful else {})

    def train_step(params, opt_state, carry, batch, key, input_noise=None):
        if stateful:
            carry = _reset(carry, batch["reset"])
        (loss, new_carry), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, carry, batch, key, input_noise)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, jax.lax.stop_gradient(new_carry), loss

    def eval_step(params, carry, batch):
        if stateful:
            carry = _reset(carry, batch["reset"])
        out, new_carry = nnx.merge(graphdef, params, rest)(batch["inputs"], carry if stateful else None, train=False,
                                                           lengths=batch.get("lengths"))
        sums = task.metric_sums(out, batch)
        if replicated is not None and jax.process_count() > 1:  # per-row sums live on several hosts
            sums = jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, replicated), sums)
        return sums, (new_carry if stateful else {})

    return train_step, eval_step
