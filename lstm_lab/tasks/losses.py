"""Per-position losses of a sequence model's outputs (jit-able; float32): what a task's ``metric_sums`` weighs and
sums. Each takes ``outputs [..., K]`` and returns one loss per position ``[...]``.

>>> import jax.numpy as jnp
>>> round(float(bernoulli(jnp.zeros((1, 3)), jnp.array([[1.0, 0.0, 1.0]]))[0]), 4)  # 3 keys at p = 1/2
2.0794
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["LOSSES", "categorical", "bernoulli", "mse"]


def categorical(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Cross-entropy (nats) of integer ``targets [...]`` under ``logits [..., V]``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def bernoulli(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Multi-label (independent Bernoulli) negative log-likelihood in nats, summed over the last axis: ``targets
    [..., K]`` in {0, 1}, ``logits [..., K]``. Stable for any logit: ``softplus(z) - y z`` (= ``-y log s(z) - (1 - y)
    log(1 - s(z))``)."""
    z = logits.astype(jnp.float32)
    return jnp.sum(jax.nn.softplus(z) - targets.astype(jnp.float32) * z, axis=-1)


def mse(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Squared error summed over the last axis (``targets [..., K]``; ``[...]`` for one value per position)."""
    out = outputs.astype(jnp.float32)
    y = targets.astype(jnp.float32)
    if y.ndim == out.ndim - 1:
        y = y[..., None]
    return jnp.sum((out - y) ** 2, axis=-1)


#: the ``loss=`` names a :class:`~lstm_lab.tasks.SequenceSet` takes
LOSSES = {"categorical": categorical, "bernoulli": bernoulli, "mse": mse}
