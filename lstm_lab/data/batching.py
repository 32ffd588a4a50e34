"""Batches, and language-model batching for truncated BPTT (Zaremba et al. 2014).

Training: a split's token stream is cut into ``B`` contiguous streams (rows)
and read in windows of ``T``; window ``k + 1`` continues every stream where
window ``k`` stopped, so the training loop passes the carry on, and resets it
where ``batch.reset`` is set (the first window of an epoch). Each epoch starts
at a random offset in ``[0, slack]`` (the tokens an epoch cannot fill),
drawn from ``(seed, epoch)``, so window boundaries move between epochs while
batch ``k`` stays a pure function of ``(seed, k)``: resuming at step ``k``
needs nothing but ``k``.

Evaluation: every target of a split is scored exactly once. The ``N - 1``
(input, next token) pairs are laid out as ``B`` streams of
``ceil((N - 1) / B)`` positions, cut into windows of ``T``; positions past
the end are padding with weight 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import numpy as np

__all__ = ["Batch", "StreamBatcher", "eval_stream_batches", "prefetch"]


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch, as NumPy arrays.

    Attributes:
      inputs: ``[B, T]`` int32 token ids, or ``[B, T, F]`` float32 features.
      targets: ``[B, T]`` int32 classes per step, ``[B, T, K]`` (multi-label 0/1 or real values per step), or
        ``[B]`` float32 (adding).
      weights: float32, ``[B, T]`` (``[B]`` for one target per row): 1 for a scored target, 0 for padding. An
        evaluation sums over weights, so padding never counts.
      lengths: ``[B]`` int32, each row's valid steps (``1..T``), for sequences of different lengths padded to
        one ``T``; the model passes them to the RNN (``seq_lengths``), which freezes the carry past each end, so
        a bidirectional layer never reads padding. None: every row fills ``T``.
      reset: the carry must be reset before this batch (a new epoch or a
        split's first window); always True for tasks whose examples are
        independent.
      step: the index of this batch in its stream.
    """

    inputs: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    reset: bool = True
    step: int = 0
    lengths: np.ndarray | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays, for a jit-compiled step (``lengths`` when the batch has them)."""
        out = {"inputs": self.inputs, "targets": self.targets, "weights": self.weights}
        if self.lengths is not None:
            out["lengths"] = self.lengths
        return out


class StreamBatcher:
    """Endless training windows over one token stream (see the module docstring).

    ``batch(k)`` is the ``k``-th window: ``inputs = data[:, s:s+T]``,
    ``targets = data[:, s+1:s+T+1]`` with ``data`` the stream reshaped to
    ``[B, N // B]`` and ``s = offset(epoch) + T * (k mod windows_per_epoch)``.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, *, seed: int = 0, split: str = "train"):
        tokens = np.asarray(tokens)
        B, T = int(batch_size), int(seq_len)
        if B < 1 or T < 1:
            raise ValueError(f"batch_size and seq_len must be positive; got batch_size={B}, seq_len={T}.")
        L = len(tokens) // B
        if L - 1 < T:
            fixes = []
            if L - 1 >= 1:
                fixes.append(f"a smaller seq_len (at most {L - 1} at batch_size={B})")
            if len(tokens) // (T + 1) >= 1:
                fixes.append(f"a smaller batch_size (at most {len(tokens) // (T + 1)} at seq_len={T})")
            if not fixes:
                fixes.append(f"seq_len at most {len(tokens) - 1} with batch_size=1" if len(tokens) > 1
                             else "more data in this split")
            raise ValueError(
                f"the {split} split has {len(tokens)} tokens: {B} streams of {L} tokens cannot fill one window of "
                f"seq_len={T} (each stream needs seq_len + 1 = {T + 1}). Use {' or '.join(fixes)}.")
        self.data = tokens[:B * L].reshape(B, L)
        self.batch_size, self.seq_len, self.seed = B, T, int(seed)
        self.windows_per_epoch = (L - 1) // T
        self.slack = (L - 1) - self.windows_per_epoch * T

    def offset(self, epoch: int) -> int:
        if self.slack == 0:
            return 0
        return int(np.random.default_rng([self.seed, epoch]).integers(0, self.slack + 1))

    def batch(self, step: int) -> Batch:
        epoch, w = divmod(int(step), self.windows_per_epoch)
        s = self.offset(epoch) + w * self.seq_len
        inputs = self.data[:, s:s + self.seq_len]
        targets = self.data[:, s + 1:s + self.seq_len + 1]
        return Batch(inputs, targets, np.ones(targets.shape, np.float32), reset=w == 0, step=int(step))

    def __call__(self, start_step: int = 0) -> Iterator[Batch]:
        step = int(start_step)
        while True:
            yield self.batch(step)
            step += 1


def eval_stream_batches(tokens: np.ndarray, batch_size: int, seq_len: int) -> list[Batch]:
    """Windows that score every target of ``tokens`` exactly once (see the module docstring)."""
    tokens = np.asarray(tokens)
    B, T = int(batch_size), int(seq_len)
    M = len(tokens) - 1
    if M < 1:
        raise ValueError(f"an evaluation split needs at least 2 tokens; got {len(tokens)}.")
    per_stream = math.ceil(M / B)
    n_windows = math.ceil(per_stream / T)
    cols = n_windows * T
    inputs = np.zeros(B * cols, tokens.dtype)
    targets = np.zeros(B * cols, tokens.dtype)
    weights = np.zeros(B * cols, np.float32)
    # stream b holds pairs [b * per_stream, (b + 1) * per_stream); columns past per_stream are padding
    idx = (np.arange(B)[:, None] * cols + np.arange(per_stream)[None, :]).reshape(-1)[:M]
    inputs[idx], targets[idx], weights[idx] = tokens[:-1], tokens[1:], 1.0
    inputs, targets, weights = (a.reshape(B, cols) for a in (inputs, targets, weights))
    return [Batch(inputs[:, k * T:(k + 1) * T], targets[:, k * T:(k + 1) * T], weights[:, k * T:(k + 1) * T],
                  reset=k == 0, step=k) for k in range(n_windows)]


class prefetch:
    """Iterate ``iterator`` with up to ``size`` items made ahead in a background thread.

    Keeps batch making off the training step's critical path. An exception in
    the producer is raised in the consumer; ``close()`` (or leaving a ``with``
    block) stops the producer and waits for its thread.

    >>> with prefetch(iter(range(5)), size=2) as it:
    ...     list(it)
    [0, 1, 2, 3, 4]
    """

    _DONE = object()

    def __init__(self, iterator, size: int = 2):
        import queue
        import threading

        self._queue: "queue.Queue" = queue.Queue(maxsize=max(1, int(size)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(iter(iterator),), daemon=True)
        self._thread.start()

    def _produce(self, it):
        import queue

        try:
            for item in it:
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(self._DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._queue.put(e)

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._DONE:
            self._queue.put(item)
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self, timeout: float = 10.0):
        """Stop the producer and wait for its thread to end (a thread still making a batch while the interpreter
        shuts down can abort the process from native code)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
