"""SequenceModel: input encoder -> RNN stack -> optional dropout -> dense head.

One vector of ``output_size`` per time step: logits for token and class
tasks, a real value for regression (the task decides which step it reads).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lstm_lab.config import ModelConfig, cell_from_config
from lstm_lab.recurrent import RNN

__all__ = ["SequenceModel", "cell_from_config"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


def _dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class SequenceModel(nnx.Module):
    """Encoder -> :class:`~lstm_lab.RNN` -> head.

    Args:
      input_kind: ``"tokens"`` (an embedding of ``input_size`` ids) or
        ``"real"`` (``input_size`` features, fed to the RNN directly, or
        through a linear encoder of ``embed_dim`` when it is set).
      input_size, output_size: from the task.
      cfg: :class:`~lstm_lab.config.ModelConfig` (validated when it was made: names, ranges, and
        whether ``impl`` can run this cell at this size and dtype).

    Call: ``outputs, carry = model(inputs, carry=None, key=None, train=False, lengths=None)``
    with ``inputs`` ``[B, T]`` ids or ``[B, T, F]`` floats; ``outputs``
    ``[B, T, output_size]`` in float32. Training (``train=True``) applies
    Gaussian input noise and dropout, drawn from ``key``.
    """

    def __init__(self, input_kind: str, input_size: int, output_size: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if input_kind not in ("tokens", "real"):
            raise ValueError(f"input_kind must be 'tokens' or 'real'; got {input_kind!r}.")
        self.cfg = cfg
        self.input_kind = input_kind
        spec = cell_from_config(cfg.cell)
        embed_dim = cfg.embed_dim or cfg.hidden_size
        if input_kind == "tokens":
            self.encoder = nnx.Embed(input_size, embed_dim, rngs=rngs)
            rnn_in = embed_dim
        elif cfg.embed_dim:
            self.encoder = nnx.Linear(input_size, cfg.embed_dim, rngs=rngs)
            rnn_in = cfg.embed_dim
        else:
            self.encoder = None
            rnn_in = input_size
        self.rnn = RNN(rnn_in, cfg.hidden_size, spec, num_layers=cfg.num_layers, bidirectional=cfg.bidirectional,
                       dropout=cfg.dropout, dtype=_DTYPES[cfg.dtype], forget_bias=cfg.forget_bias,
                       chrono_init=cfg.chrono_init or None, unroll=cfg.unroll, impl=cfg.impl, rngs=rngs)
        out_in = cfg.hidden_size * (2 if cfg.bidirectional else 1)
        if cfg.tie_weights:
            if input_kind != "tokens":
                raise ValueError("model.tie_weights needs a token task (an embedding to tie to).")
            self.head = None
            self.head_bias = nnx.Param(jnp.zeros((output_size,), jnp.float32))
        else:
            self.head = nnx.Linear(out_in, output_size, rngs=rngs)

    def initialize_carry(self, batch_size: int):
        return self.rnn.initialize_carry((batch_size,))

    def __call__(self, inputs, carry=None, *, key: jax.Array | None = None, train: bool = False,
                 input_noise: jax.Array | None = None, lengths: jax.Array | None = None):
        """``input_noise`` (a traced scalar) replaces ``cfg.input_noise`` when given (vmapped populations);
        ``lengths`` ``[B]`` (sequences of different lengths padded to one ``T``) go to the RNN as ``seq_lengths``:
        past each row's end its carry is frozen and its outputs are zero (a bidirectional layer reads no padding)."""
        cfg = self.cfg
        if train and key is None and (cfg.dropout or cfg.output_dropout or cfg.input_noise or
                                      self.rnn.dropout is not None or self.rnn.spec.stochastic()):
            raise ValueError("SequenceModel: train=True with dropout or input noise needs a PRNG key.")
        keys = jax.random.split(key, 4) if key is not None else [None] * 4
        if self.input_kind == "tokens":
            x = self.encoder(inputs)
        else:
            x = inputs.astype(jnp.float32)
            if self.encoder is not None:
                x = self.encoder(x)
        if train and input_noise is not None:
            x = x + input_noise.astype(x.dtype) * jax.random.normal(keys[0], x.shape, x.dtype)
        elif train and cfg.input_noise > 0:
            x = x + cfg.input_noise * jax.random.normal(keys[0], x.shape, x.dtype)
        if train and cfg.dropout > 0:
            x = _dropout(x, cfg.dropout, keys[1])
        y, carry = self.rnn(x, seq_lengths=lengths, initial_carry=carry, deterministic=not train,
                            dropout_key=keys[2])
        y = y.astype(jnp.float32)
        if train and cfg.output_dropout > 0:
            y = _dropout(y, cfg.output_dropout, keys[3])
        out = self.encoder.attend(y) + self.head_bias[...] if self.head is None else self.head(y)
        return out.astype(jnp.float32), carry
