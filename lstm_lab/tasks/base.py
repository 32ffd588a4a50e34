"""The task interface: data for each split, the loss, the metrics, the baseline."""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from lstm_lab.data.batching import Batch
from lstm_lab.data.text import SPLITS
from lstm_lab.tasks.losses import categorical as sequence_cross_entropy  # per-position cross-entropy (nats)

__all__ = ["Task", "Batch", "SPLITS", "pad_examples", "row_sum", "sequence_cross_entropy"]


def pad_examples(arrays: dict[str, np.ndarray], batch_size: int) -> list[Batch]:
    """Cut a fixed set of examples into batches; the last is padded with weight-0 examples."""
    n = len(arrays["targets"])
    batches = []
    for k, start in enumerate(range(0, n, batch_size)):
        part = {key: a[start:start + batch_size] for key, a in arrays.items()}
        short = batch_size - len(part["targets"])
        if short:
            part = {key: np.concatenate([a, np.zeros((short, *a.shape[1:]), a.dtype)]) for key, a in part.items()}
        batches.append(Batch(part["inputs"], part["targets"], part["weights"], reset=True, step=k))
    return batches


def row_sum(weights: jax.Array, values: jax.Array) -> jax.Array:
    """``sum(weights * values)`` over all but the first axis; padding (weight 0) contributes exactly 0."""
    prod = jnp.where(weights > 0, weights * values, 0.0)
    return prod.reshape(prod.shape[0], -1).sum(axis=1)


class Task(abc.ABC):
    """A benchmark: what goes in, what comes out, how it is scored.

    A model for a task reads ``inputs`` (``input_kind`` ``"tokens"``: int ids
    in ``[0, input_size)``; ``"real"``: ``input_size`` float features) and
    produces ``outputs [B, T, output_size]`` (one vector per step); the task
    scores them against ``targets``.

    Subclasses set the class attributes and implement :meth:`train_batches`,
    :meth:`eval_batches`, :meth:`metric_sums` and :meth:`summarize`.
    """

    name: ClassVar[str] = "task"
    #: "tokens" (int ids, an embedding first) or "real" (float features).
    input_kind: ClassVar[str] = "tokens"
    #: True when consecutive batches continue the same streams (pass the carry on).
    stateful: ClassVar[bool] = False

    input_size: int
    output_size: int
    options: dict[str, Any]

    # -- data ------------------------------------------------------------
    @abc.abstractmethod
    def train_batches(self, batch_size: int, *, seed: int = 0, start_step: int = 0) -> Iterator[Batch]:
        """The endless training stream; batch ``k`` is a pure function of ``(seed, k)``."""

    @abc.abstractmethod
    def eval_batches(self, split: str, batch_size: int) -> list[Batch]:
        """The fixed, finite batches of ``valid`` or ``test``; together they score every target once."""

    def batches(self, split: str, *, batch_size: int, seed: int = 0, start_step: int = 0):
        """``train``: an endless iterator from ``start_step``; ``valid``/``test``: a list."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}.")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}.")
        if split == "train":
            return self.train_batches(int(batch_size), seed=seed, start_step=start_step)
        return self.eval_batches(split, int(batch_size))

    # -- scoring -----------------------------------------------------------
    @abc.abstractmethod
    def metric_sums(self, outputs: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Weighted sums per batch row (jit-able): ``{name: [B]}``, always ``loss_sum`` and ``weight``.

        Rows add up (in float64, on the host) across rows and batches, so an
        evaluation is exact however it is batched; keeping one sum per row
        keeps float32 rounding to a row's length.
        """

    @abc.abstractmethod
    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        """Metrics from summed :meth:`metric_sums`; always ``loss``."""

    def loss(self, outputs: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
        """The training objective: the weighted mean loss of one batch (jit-able)."""
        sums = self.metric_sums(outputs, batch)
        return jnp.sum(sums["loss_sum"]) / jnp.maximum(jnp.sum(sums["weight"]), 1e-9)

    def summarize_batches(self, sums_per_batch: list[dict]) -> dict[str, float]:
        """:meth:`summarize` of many batches' :meth:`metric_sums`, added up in float64 on the host."""
        keys = sums_per_batch[0].keys()
        totals = {k: float(sum(np.sum(np.asarray(s[k], np.float64)) for s in sums_per_batch)) for k in keys}
        return {k: float(v) for k, v in self.summarize(totals).items()}

    def evaluate(self, outputs_fn, split: str, batch_size: int) -> dict[str, float]:
        """Score ``outputs_fn(batch) -> outputs`` over a whole split (no carry passing)."""
        return self.summarize_batches([self.metric_sums(outputs_fn(b), b.arrays())
                                       for b in self.eval_batches(split, batch_size)])

    # -- description ---------------------------------------------------------
    @property
    def baseline(self) -> dict[str, float] | None:
        """The memoryless predictor's metrics, where the task has one."""
        return None

    def split_sizes(self) -> dict[str, int]:
        """Examples (or tokens for language models) per split."""
        return {}

    def format_example(self, batch: Batch, row: int = 0) -> str:
        """One row of a batch, decoded for a person to read."""
        return f"inputs {batch.inputs[row]}\ntargets {batch.targets[row]}"

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "options": dict(self.options), "input": (self.input_kind, self.input_size),
                "output_size": self.output_size, "splits": self.split_sizes(), "baseline": self.baseline}

    def save(self, directory) -> None:
        """Write what a run needs to read its data again (e.g. the vocabulary)."""

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"


