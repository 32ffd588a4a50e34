"""The optimizer of a config, with its numeric hyperparameters in the optimizer state.

``build_optimizer(ocfg, steps)`` is ``optax.chain(clip, inject_hyperparams(opt)(...))``: the learning
rate (the peak of its schedule), momentum, Adam's betas and weight decay live in
``opt_state[1].hyperparams`` (:func:`hyperparams`), one array each. That is what lets a population
(:mod:`lstm_lab.training.population`) vary them: each member's optimizer state carries its own values,
and one update function, vmapped, reads them. The ``plateau`` schedule lowers the learning rate by
editing that value (:func:`scale_learning_rate`). :data:`VMAPPED_FIELDS` is the one list of config fields
a population may vary; :func:`population_key` groups configs that differ in nothing else.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import optax

from lstm_lab.config import OptimConfig

__all__ = ["build_optimizer", "hyperparams", "scale_learning_rate", "VMAPPED_FIELDS", "OPTIM_HYPERPARAMS",
           "population_key"]

#: the optimizer's hyperparameters that live in its state (per member in a population)
OPTIM_HYPERPARAMS = {"sgd": ("learning_rate", "momentum"), "adam": ("learning_rate", "b1", "b2"),
                     "adamw": ("learning_rate", "b1", "b2", "weight_decay"), "rmsprop": ("learning_rate", "momentum")}

#: the config fields in which the members of one population may differ (everything else is one program)
VMAPPED_FIELDS = ("optim.learning_rate", "optim.momentum", "optim.b1", "optim.b2", "optim.weight_decay",
                  "model.input_noise", "model.forget_bias", "model.chrono_init", "train.seed")


def population_key(cfg) -> str:
    """Configs with the same key can train in one population (everything but :data:`VMAPPED_FIELDS` equal)."""
    from lstm_lab.config import to_overrides

    flat = {k: v for k, v in to_overrides(cfg).items() if k not in VMAPPED_FIELDS}
    return json.dumps(flat, sort_keys=True, default=str)


def _schedule(ocfg: OptimConfig, total_steps: int, peak):
    """The learning rate at each step, for the peak ``peak`` (a traced value inside the optimizer)."""
    if ocfg.schedule == "cosine":
        if ocfg.warmup_steps:
            return optax.warmup_cosine_decay_schedule(0.0, peak, ocfg.warmup_steps,
                                                      max(total_steps, ocfg.warmup_steps + 1))
        return optax.cosine_decay_schedule(peak, max(total_steps, 1))
    if ocfg.warmup_steps:
        return optax.join_schedules([optax.linear_schedule(0.0, peak, ocfg.warmup_steps),
                                     optax.constant_schedule(peak)], [ocfg.warmup_steps])
    return peak  # constant and plateau (the loop edits the value)


def build_optimizer(ocfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """``optax.chain(clip_by_global_norm (or identity), inject_hyperparams(optimizer))``.

    SGD and RMSprop always keep a momentum buffer (momentum 0 is then a plain step, bitwise), so that every
    value of the momentum is the same program. (Names and ranges were checked when ``ocfg`` was made: an invalid
    OptimConfig cannot exist.)
    """
    def opt(learning_rate, momentum=None, b1=None, b2=None, weight_decay=None):
        lr = _schedule(ocfg, total_steps, learning_rate)
        if ocfg.name == "sgd":
            return optax.sgd(lr, momentum=momentum, nesterov=ocfg.nesterov)
        if ocfg.name == "adam":
            return optax.adam(lr, b1=b1, b2=b2)
        if ocfg.name == "adamw":
            return optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay)
        return optax.rmsprop(lr, momentum=momentum)

    values = {k: float(getattr(ocfg, k)) for k in OPTIM_HYPERPARAMS[ocfg.name]}
    clip = optax.clip_by_global_norm(ocfg.clip_norm) if ocfg.clip_norm > 0 else optax.identity()
    return optax.chain(clip, optax.inject_hyperparams(opt, hyperparam_dtype=jnp.float32)(**values))


def hyperparams(opt_state) -> dict:
    """The optimizer's hyperparameters in ``opt_state`` (made by :func:`build_optimizer`): name -> array."""
    return opt_state[1].hyperparams


def scale_learning_rate(opt_state, factor):
    """``opt_state`` with its learning rate multiplied by ``factor`` (the plateau decay): a new state."""
    inner = opt_state[1]
    hp = dict(inner.hyperparams)
    hp["learning_rate"] = hp["learning_rate"] * jnp.asarray(factor, hp["learning_rate"].dtype)
    return (opt_state[0], inner._replace(hyperparams=hp), *opt_state[2:])
