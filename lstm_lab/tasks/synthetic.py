"""Generated long-range tasks: the copy-memory task and the adding problem."""

from __future__ import annotations

import math
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from lstm_lab.data.batching import Batch
from lstm_lab.tasks.base import Task, pad_examples, row_sum, sequence_cross_entropy
from lstm_lab.tasks.registry import register

__all__ = ["CopyTask", "AddingTask"]

_EVAL_SPLIT_IDS = {"valid": 1, "test": 2}


def _check_int(name, value, minimum):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}.")
    return int(value)


class _Generated(Task):
    """Train batch ``k`` from ``default_rng([seed, k])``; valid/test fixed sets from ``eval_seed``."""

    def __init__(self, eval_size: int, eval_seed: int):
        self.eval_size = _check_int("eval_size", eval_size, 1)
        self.eval_seed = int(eval_seed)
        self._eval_cache: dict[str, dict[str, np.ndarray]] = {}

    def generate(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def train_batches(self, batch_size, *, seed=0, start_step=0) -> Iterator[Batch]:
        step = int(start_step)
        while True:
            arrays = self.generate(np.random.default_rng([int(seed), step]), batch_size)
            yield Batch(arrays["inputs"], arrays["targets"], arrays["weights"], reset=True, step=step)
            step += 1

    def eval_arrays(self, split: str) -> dict[str, np.ndarray]:
        if split not in self._eval_cache:
            rng = np.random.default_rng([self.eval_seed, _EVAL_SPLIT_IDS[split]])
            self._eval_cache[split] = self.generate(rng, self.eval_size)
        return self._eval_cache[split]

    def eval_batches(self, split, batch_size):
        if split not in _EVAL_SPLIT_IDS:
            raise ValueError(f"unknown evaluation split {split!r}; expected valid or test.")
        return pad_examples(self.eval_arrays(split), batch_size)

    def split_sizes(self):
        return {"train": "endless (generated)", "valid": self.eval_size, "test": self.eval_size}


@register("copy")
class CopyTask(_Generated):
    """The copy-memory task (Arjovsky, Shah & Bengio 2016).

    Alphabet: 0 blank, 1..8 data symbols, 9 delimiter. Input, length
    ``T + 20``: 10 data symbols uniform in 1..8, ``T - 1`` blanks, the
    delimiter, 10 blanks. Target: ``T + 10`` blanks, then the 10 data symbols.
    Loss: mean cross-entropy over all ``T + 20`` steps; the memoryless
    baseline (blanks, then uniform over the 8 symbols) scores
    ``10 * log(8) / (T + 20)``. Also reported: accuracy on the last 10 steps.

    Options: ``T`` (the delay, >= 1), ``eval_size`` (examples in valid and in
    test), ``eval_seed``.
    """

    name = "copy"
    input_kind = "tokens"
    input_size = 10
    output_size = 10
    BLANK, DELIM, N_DATA, N_SYMBOLS = 0, 9, 10, 8

    def __init__(self, T: int = 100, *, eval_size: int = 1000, eval_seed: int = 1234):
        super().__init__(eval_size, eval_seed)
        self.T = _check_int("T", T, 1)
        self.length = self.T + 20
        self.options = {"T": self.T, "eval_size": self.eval_size, "eval_seed": self.eval_seed}

    def generate(self, rng, n):
        T = self.T
        data = rng.integers(1, 1 + self.N_SYMBOLS, (n, self.N_DATA), dtype=np.int32)
        inputs = np.zeros((n, T + 20), np.int32)
        inputs[:, :10] = data
        inputs[:, T + 9] = self.DELIM
        targets = np.zeros((n, T + 20), np.int32)
        targets[:, T + 10:] = data
        return {"inputs": inputs, "targets": targets, "weights": np.ones((n, T + 20), np.float32)}

    @property
    def baseline(self):
        return {"loss": 10 * math.log(self.N_SYMBOLS) / (self.T + 20), "accuracy_last10": 1 / self.N_SYMBOLS}

    def baseline_outputs(self, batch: dict) -> jax.Array:
        """Logits of the memoryless predictor: blank for ``T + 10`` steps, then uniform over 1..8."""
        n = batch["targets"].shape[0]
        blank = jnp.full((10,), -1e9).at[self.BLANK].set(0.0)
        uniform = jnp.full((10,), -1e9).at[1:1 + self.N_SYMBOLS].set(0.0)
        per_step = jnp.concatenate([jnp.tile(blank, (self.T + 10, 1)), jnp.tile(uniform, (10, 1))])
        return jnp.broadcast_to(per_step, (n, self.T + 20, 10))

    def metric_sums(self, outputs, batch):
        w = batch["weights"].astype(jnp.float32)
        ce = sequence_cross_entropy(outputs, batch["targets"])
        hit = (jnp.argmax(outputs[:, -10:], axis=-1) == batch["targets"][:, -10:]).astype(jnp.float32)
        return {"loss_sum": row_sum(w, ce), "weight": row_sum(w, jnp.ones_like(w)),
                "correct_last10": row_sum(w[:, -10:], hit), "count_last10": row_sum(w[:, -10:], jnp.ones_like(hit))}

    def summarize(self, sums):
        loss = sums["loss_sum"] / sums["weight"]
        return {"loss": loss, "accuracy_last10": sums["correct_last10"] / sums["count_last10"],
                "loss_over_baseline": loss / self.baseline["loss"]}

    def format_example(self, batch, row=0):
        sym = lambda a: "".join("-" if v == 0 else ":" if v == 9 else str(int(v)) for v in a)  # noqa: E731
        return f"input  {sym(batch.inputs[row])}\ntarget {sym(batch.targets[row])}   (- blank, : delimiter)"


@register("adding")
class AddingTask(_Generated):
    """The adding problem (Hochreiter & Schmidhuber 1997; Le, Jaitly & Hinton 2015).

    Input ``[T, 2]``: values uniform in [0, 1] and a marker channel with
    exactly two ones, one in each half (positions uniform in ``[0, T//2)`` and
    ``[T//2, T)``). Target: the sum of the two marked values, read from the
    model's output at the last step. Loss: MSE; always predicting 1.0 scores
    ``Var(X1 + X2) = 1/6``.

    Options: ``T`` (length, >= 2), ``eval_size``, ``eval_seed``.
    """

    name = "adding"
    input_kind = "real"
    input_size = 2
    output_size = 1

    def __init__(self, T: int = 100, *, eval_size: int = 1000, eval_seed: int = 1234):
        super().__init__(eval_size, eval_seed)
        self.T = _check_int("T", T, 2)
        self.options = {"T": self.T, "eval_size": self.eval_size, "eval_seed": self.eval_seed}

    def generate(self, rng, n):
        T, half = self.T, self.T // 2
        values = rng.random((n, T), dtype=np.float32)
        first = rng.integers(0, half, n)
        second = rng.integers(half, T, n)
        marker = np.zeros((n, T), np.float32)
        marker[np.arange(n), first] = 1.0
        marker[np.arange(n), second] = 1.0
        return {"inputs": np.stack([values, marker], axis=-1),
                "targets": (values * marker).sum(axis=1).astype(np.float32), "weights": np.ones(n, np.float32)}

    @property
    def baseline(self):
        return {"loss": 1 / 6, "mse": 1 / 6}

    def baseline_outputs(self, batch):
        n = batch["targets"].shape[0]
        return jnp.ones((n, self.T, 1), jnp.float32)

    def metric_sums(self, outputs, batch):
        w = batch["weights"].astype(jnp.float32)
        err = (outputs[:, -1, 0].astype(jnp.float32) - batch["targets"]) ** 2
        return {"loss_sum": jnp.where(w > 0, w * err, 0.0), "weight": w}

    def summarize(self, sums):
        mse = sums["loss_sum"] / sums["weight"]
        return {"loss": mse, "mse": mse, "loss_over_baseline": mse * 6}

    def format_example(self, batch, row=0):
        x = batch.inputs[row]
        marked = [f"{v:.3f}@{t}" for t, (v, m) in enumerate(x) if m == 1]
        return (f"values {' '.join(f'{v:.2f}' for v in x[:12, 0])} ... ({len(x)} steps)\n"
                f"marked {', '.join(marked)}  ->  target {float(batch.targets[row]):.4f}")
