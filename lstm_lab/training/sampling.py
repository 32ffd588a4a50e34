"""A trained run's model (:func:`load_model`) and text sampled from a language model (:func:`sample`)."""

from __future__ import annotations

import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lstm_lab.config import Config
from lstm_lab.models import SequenceModel
from lstm_lab.training.checkpoints import Checkpoints
from lstm_lab.training.engine import build_model
from lstm_lab.training.optim import build_optimizer
from lstm_lab.training.records import load_run

__all__ = ["load_model", "sample"]


def load_model(workdir, which: str = "best") -> tuple[SequenceModel, Config, dict]:
    """The trained model of a run directory (its ``best`` or ``last`` checkpoint), its config and task info.

    A population member's workdir is a solo run's: it loads the same way.
    """
    wd = pathlib.Path(workdir)
    cfg, info = load_run(wd)
    model = build_model(cfg, info)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = build_optimizer(cfg.optim, cfg.train.steps)
    carry = model.initialize_carry(cfg.train.batch_size) if info["stateful"] else {}
    target = {"params": params, "opt_state": tx.init(params), "carry": carry}
    ckpt = Checkpoints(wd, cfg.train.keep_checkpoints, lambda m: print(m, file=sys.stderr))
    restored = ckpt.restore(which, target)
    ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"{str(wd)!r} has no {which} checkpoint to load.")
    return nnx.merge(graphdef, restored[0]["params"], rest), cfg, info


def sample(workdir, *, prompt: str = "", length: int = 300, temperature: float = 1.0, seed: int = 0) -> str:
    """Text from the best checkpoint of a char_lm or word_lm run (prompt included)."""
    from lstm_lab.data.vocab import Vocab

    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
        raise ValueError(f"length must be an integer >= 1 (tokens to generate); got {length!r}.")
    if not (isinstance(temperature, (int, float, np.floating)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0 and finite; got {temperature!r}.")
    wd = pathlib.Path(workdir)
    cfg, info = load_run(wd)
    if not (wd / "vocab.json").exists():
        raise ValueError(f"{str(wd)!r} is a {info['name']} run; sampling needs a language model (char_lm, word_lm).")
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
