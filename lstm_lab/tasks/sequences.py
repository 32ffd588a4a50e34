"""A task of whole sequences of different lengths: :class:`SequenceSet`.

Give it, per split, a list of ``(inputs, targets)`` pairs — one sequence each, any length — and a loss; it does
the rest every dataset of whole sequences needs:

* **padding** to one length per batch, with ``weights`` 0 on the padding and the rows' ``lengths`` in the batch
  (the model hands them to the RNN, which freezes each row's carry past its end);
* **length buckets**: a batch is padded to the smallest of a few lengths (quantiles of the training lengths,
  rounded up to a multiple of 8) that holds its longest sequence, so the model compiles a few shapes, not one
  per batch;
* **seeded epochs**: epoch ``e`` visits every training sequence once, in batches drawn from
  ``default_rng([seed, e])`` (shuffled, then sorted by length within windows of ``8 * batch_size`` so that a
  batch pads little; a short batch is filled up with weight-0 rows), so batch ``k`` depends only on
  ``(seed, k)`` and a run resumes exactly;
* **evaluation** that scores every target of ``valid``/``test`` exactly once (sequences sorted by length, so
  that little is padding);
* the **loss**: ``categorical`` (integer targets per step, cross-entropy), ``bernoulli`` (0/1 targets per step
  and label, multi-label cross-entropy summed over labels) or ``mse`` (real targets, squared error summed over
  the last axis); see :mod:`lstm_lab.tasks.losses`.

A dataset of your own, complete (``lstm-lab train my_exp.py --import my_tasks.py`` trains it)::

    import numpy as np
    from lstm_lab import tasks

    @tasks.register("next_sine", replace=True)
    def next_sine(n: int = 200, seed: int = 0):
        rng = np.random.default_rng(seed)

        def one():  # predict x[t + 1] from x[.. t] on a sine of random length and frequency
            x = np.sin(np.arange(rng.integers(10, 40) + 1) * rng.uniform(0.1, 0.5))[:, None]
            return x[:-1], x[1:]

        splits = {s: [one() for _ in range(n)] for s in ("train", "valid", "test")}
        return tasks.SequenceSet(splits, loss="mse", name="next_sine", options={"n": n, "seed": seed})

>>> import numpy as np
>>> seqs = [(np.eye(3, dtype=np.float32)[[0, 1, 2, 0][:n]], np.array([1, 2, 0, 1][:n])) for n in (2, 4, 3)]
>>> task = SequenceSet({"train": seqs, "valid": seqs, "test": seqs}, loss="categorical", output_size=3)
>>> [(b.inputs.shape, b.lengths.tolist(), float(b.weights.sum()))
...  for _, b in zip(range(2), task.batches("train", batch_size=2, seed=0))]  # epoch 0: 2 batches, one filled up
[((2, 8, 3), [4, 1], 4.0), ((2, 8, 3), [2, 3], 5.0)]
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lstm_lab.data.batching import Batch
from lstm_lab.tasks.base import Task, row_sum
from lstm_lab.tasks.losses import LOSSES

__all__ = ["SequenceSet"]

_SPLITS = ("train", "valid", "test")


class SequenceSet(Task):
    """A fixed set of variable-length sequences per split (see the module doc).

    Args:
      splits: ``{"train": [(inputs, targets), ...], "valid": [...], "test": [...]}``; ``inputs`` ``[T_i, F]``
        floats (``input_kind="real"``) or ``[T_i]`` ints (``"tokens"``), ``targets`` ``[T_i]`` ints
        (``categorical``) or ``[T_i, K]`` (``bernoulli``: 0/1; ``mse``: reals), the same ``T_i``.
      loss: ``"categorical"``, ``"bernoulli"`` or ``"mse"``.
      name: the task's name (in records and messages).
      input_size, output_size: inferred (features of ``inputs``; ``K`` of ``targets``, or for ``categorical`` 1 +
        the largest target) unless given. Token inputs need ``input_size``.
      buckets: at most this many padded lengths for training batches (evaluation adds the longest sequence of
        every split).
      options: what the task was made with (recorded with a run; shown by ``lstm-lab data``).
    """

    input_kind = "real"

    def __init__(self, splits: dict[str, Sequence], *, loss: str, name: str = "sequences",
                 input_kind: str | None = None, input_size: int | None = None, output_size: int | None = None,
                 buckets: int = 6, options: dict[str, Any] | None = None):
        self.name = name
        if loss not in LOSSES:
            raise ValueError(f"{name}: loss must be one of {', '.join(LOSSES)}; got {loss!r}.")
        self.loss_name, self._loss = loss, LOSSES[loss]
        if not isinstance(splits, dict) or sorted(splits) != sorted(_SPLITS):
            got = sorted(splits) if isinstance(splits, dict) else type(splits).__name__
            raise ValueError(f"{name}: splits must be a dict with exactly train, valid and test; got {got}.")
        self.data = {s: [self._check(s, i, pair) for i, pair in enumerate(splits[s])] for s in _SPLITS}
        for s in _SPLITS:
            if not self.data[s]:
                raise ValueError(f"{name}: the {s} split has no sequences.")
        x0, y0 = self.data["train"][0]
        self.input_kind = input_kind or ("tokens" if np.issubdtype(x0.dtype, np.integer) else "real")
        if input_size is None:
            if self.input_kind == "tokens":
                raise ValueError(f"{name}: token inputs need input_size (the vocabulary size).")
            input_size = x0.shape[1]
        if output_size is None:
            output_size = (1 + max(int(y.max()) for seqs in self.data.values() for _, y in seqs)
                           if loss == "categorical" else (y0.shape[1] if y0.ndim == 2 else 1))
        self.input_size, self.output_size = int(input_size), int(output_size)
        self.options = dict(options or {})
        lengths = np.array([len(x) for x, _ in self.data["train"]])
        qs = np.quantile(lengths, np.linspace(0, 1, max(1, int(buckets)) + 1)[1:])
        self.boundaries = sorted({int(math.ceil(q / 8) * 8) for q in qs})
        longest = max(len(x) for seqs in self.data.values() for x, _ in seqs)
        if longest > self.boundaries[-1]:
            self.boundaries.append(int(math.ceil(longest / 8) * 8))
        self._eval_cache: dict[tuple[str, int], list[Batch]] = {}

    def _check(self, split: str, i: int, pair) -> tuple[np.ndarray, np.ndarray]:
        try:
            x, y = pair
        except (TypeError, ValueError):
            raise ValueError(f"{self.name}: {split} sequence {i} must be an (inputs, targets) pair.") from None
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim not in (1, 2) or len(x) == 0:
            raise ValueError(f"{self.name}: {split} sequence {i} has inputs of shape {x.shape}; expected [T] token "
                             f"ids or [T, F] features with T >= 1.")
        if len(y) != len(x):
            raise ValueError(f"{self.name}: {split} sequence {i} has {len(x)} input steps but {len(y)} targets.")
        x = x.astype(np.int32) if np.issubdtype(x.dtype, np.integer) and x.ndim == 1 else x.astype(np.float32)
        y = y.astype(np.int32) if self.loss_name == "categorical" else y.astype(np.float32)
        return x, y

    # -- batches -----------------------------------------------------------------------------------------------
    def _padded_length(self, longest: int) -> int:
        return next(b for b in self.boundaries if b >= longest)

    def _batch(self, seqs: list, batch_size: int, step: int) -> Batch:
        T = self._padded_length(max(len(x) for x, _ in seqs))
        x0, y0 = seqs[0]
        inputs = np.zeros((batch_size, T, *x0.shape[1:]), x0.dtype)
        targets = np.zeros((batch_size, T, *y0.shape[1:]), y0.dtype)
        weights = np.zeros((batch_size, T), np.float32)
        lengths = np.ones(batch_size, np.int32)  # a filler row: one step, weight 0
        for r, (x, y) in enumerate(seqs):
            n = len(x)
            inputs[r, :n], targets[r, :n], weights[r, :n], lengths[r] = x, y, 1.0, n
        return Batch(inputs, targets, weights, reset=True, step=step, lengths=lengths)

    def epoch_plan(self, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
        """The training batches of one epoch, as indices into ``train``: the sequences in the order
        ``default_rng([seed, epoch])`` permutes them, sorted by length within windows of ``8 * batch_size`` (so a
        batch holds sequences of similar lengths and pads little), cut into batches, and the batches shuffled."""
        n = len(self.data["train"])
        rng = np.random.default_rng([int(seed), int(epoch)])
        order = rng.permutation(n)
        window = 8 * batch_size
        plan = []
        for w in range(0, n, window):
            chunk = sorted(order[w:w + window].tolist(), key=lambda j: len(self.data["train"][j][0]))
            plan += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        return [plan[i] for i in rng.permutation(len(plan))]

    def train_batches(self, batch_size: int, *, seed: int = 0, start_step: int = 0) -> Iterator[Batch]:
        train, per_epoch = self.data["train"], self.epoch_steps(batch_size)
        k, plan = int(start_step), None
        while True:
            epoch, i = divmod(k, per_epoch)
            if plan is None or plan[0] != epoch:
                plan = (epoch, self.epoch_plan(batch_size, seed, epoch))
            yield self._batch([train[j] for j in plan[1][i]], batch_size, k)
            k += 1

    def eval_batches(self, split: str, batch_size: int) -> list[Batch]:
        if split not in ("valid", "test"):
            raise ValueError(f"unknown evaluation split {split!r}; expected valid or test.")
        key = (split, batch_size)
        if key not in self._eval_cache:
            seqs = sorted(self.data[split], key=lambda p: len(p[0]))
            self._eval_cache[key] = [self._batch(seqs[i:i + batch_size], batch_size, i // batch_size)
                                     for i in range(0, len(seqs), batch_size)]
        return self._eval_cache[key]

    def epoch_steps(self, batch_size: int) -> int:
        """Training batches per epoch (every training sequence once)."""
        return -(-len(self.data["train"]) // batch_size)

    # -- scoring ---------------------------------------------------------------------------------------------
    def metric_sums(self, outputs: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        w = batch["weights"]
        sums = {"loss_sum": row_sum(w, self._loss(outputs, batch["targets"])), "weight": w.sum(axis=1)}
        if self.loss_name == "categorical":
            hit = (jnp.argmax(outputs, axis=-1) == batch["targets"]).astype(jnp.float32)
            sums["correct"] = row_sum(w, hit)
        return sums

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        out = {"loss": sums["loss_sum"] / max(sums["weight"], 1e-12)}
        if "correct" in sums:
            out["accuracy"] = sums["correct"] / max(sums["weight"], 1e-12)
        return out

    # -- description -------------------------------------------------------------------------------------------
    def split_sizes(self) -> dict[str, int]:
        return {s: len(self.data[s]) for s in _SPLITS}

    def describe(self) -> dict[str, Any]:
        lengths = {s: [len(x) for x, _ in self.data[s]] for s in _SPLITS}
        return {**super().describe(), "loss": self.loss_name, "padded_lengths": self.boundaries,
                "lengths": {s: f"{min(v)}..{max(v)} (mean {np.mean(v):.1f})" for s, v in lengths.items()}}
