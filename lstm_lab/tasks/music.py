"""Polyphonic music: predict the next piano-roll frame (Boulanger-Lewandowski, Bengio & Vincent 2012).

``tasks.get("music", path="../shared/data/jsb-chorales-quarter.json")`` reads a JSON file (or the same gzipped,
``.json.gz``) laid out as ``{"train": [...], "valid": [...], "test": [...]}``: each split a list of pieces, each
piece a list of time steps, each step the list of MIDI pitches sounding (21..108, the 88 piano keys). A step is
encoded as an 88-dimensional 0/1 vector; the model reads frames ``1..t`` and predicts frame ``t + 1`` with 88
independent Bernoulli outputs (logits).

Metric: the negative log-likelihood per time step, in nats: the binary cross-entropy summed over the 88 keys,
averaged over every predicted frame of the split (Boulanger-Lewandowski et al. 2012; Chung et al. 2014). The first
frame of a piece is input only (``score_first=False``, the default, as in the RNN-RBM line of work that these
numbers come from: frames ``2..T`` are scored); ``score_first=True`` also scores frame 1, predicted from an all-zero
frame. Baseline: every key on with its training frequency (add-one smoothed), whatever came before: 10.98
nats/step on JSB Chorales valid.
"""

from __future__ import annotations

import gzip
import json
import math
import pathlib

import numpy as np

from lstm_lab.tasks.registry import register
from lstm_lab.tasks.sequences import SequenceSet

__all__ = ["MusicTask", "LOWEST", "KEYS"]

LOWEST, KEYS = 21, 88  # MIDI 21 (A0) .. 108 (C8)


def _load(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise ValueError(f"music: {str(path)!r} does not exist (a JSON piano-roll file: "
                         f"{{\"train\": [...], \"valid\": [...], \"test\": [...]}}).")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        data = json.loads(raw.decode())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"music: {str(path)!r} is not JSON{' (gzipped)' if path.name.endswith('.gz') else ''}: "
                         f"{str(e).splitlines()[0][:200]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"music: {str(path)!r} holds a {type(data).__name__}; expected an object with the splits "
                         f"train, valid and test.")
    missing = [s for s in ("train", "valid", "test") if s not in data]
    if missing:
        raise ValueError(f"music: {str(path)!r} has no {', '.join(missing)} split (it has "
                         f"{', '.join(map(repr, data)) or 'nothing'}).")
    return data


def _roll(piece, split: str, i: int) -> np.ndarray:
    """One piece as a ``[T, 88]`` 0/1 array; a bad step is one line naming the piece and the step."""
    if not isinstance(piece, list) or not piece:
        raise ValueError(f"music: {split} piece {i} is {'empty' if piece == [] else type(piece).__name__}; expected "
                         f"a non-empty list of time steps.")
    roll = np.zeros((len(piece), KEYS), np.float32)
    for t, step in enumerate(piece):
        if not isinstance(step, list) or not all(isinstance(p, (int, float)) and float(p).is_integer()
                                                 for p in step):
            raise ValueError(f"music: {split} piece {i}, step {t}: expected a list of MIDI pitches; got {step!r}.")
        bad = [p for p in step if not LOWEST <= p < LOWEST + KEYS]
        if bad:
            raise ValueError(f"music: {split} piece {i}, step {t}: pitch {bad[0]} is outside the piano's MIDI "
                             f"{LOWEST}..{LOWEST + KEYS - 1}.")
        roll[t, [int(p) - LOWEST for p in step]] = 1.0
    return roll


@register("music")
class MusicTask(SequenceSet):
    """Next-frame prediction on piano rolls (see the module doc). Options: ``path``, ``score_first``, ``buckets``."""

    name = "music"

    def __init__(self, path: str, *, score_first: bool = False, buckets: int = 6):
        p = pathlib.Path(path).expanduser()
        data = _load(p)
        rolls = {s: [_roll(piece, s, i) for i, piece in enumerate(data[s])] for s in ("train", "valid", "test")}
        for s, pieces in rolls.items():
            if not pieces:
                raise ValueError(f"music: the {s} split of {str(p)!r} has no pieces.")
            if not score_first and min(len(r) for r in pieces) < 2:
                i = next(i for i, r in enumerate(pieces) if len(r) < 2)
                raise ValueError(f"music: {s} piece {i} has one step; with score_first=False a piece needs two "
                                 f"(the first is input only).")

        def pairs(r):
            if score_first:
                return np.concatenate([np.zeros((1, KEYS), np.float32), r[:-1]]), r
            return r[:-1], r[1:]

        self.score_first = bool(score_first)
        frames = np.concatenate(rolls["train"])
        self.key_frequency = (frames.sum(0) + 1.0) / (len(frames) + 2.0)  # add-one smoothed
        super().__init__({s: [pairs(r) for r in rolls[s]] for s in rolls}, loss="bernoulli", name="music",
                         input_kind="real", input_size=KEYS, output_size=KEYS, buckets=buckets,
                         options={"path": str(path), "score_first": self.score_first, "buckets": buckets})
        self._baseline = self._frequency_baseline("valid")

    def _frequency_baseline(self, split: str) -> dict[str, float]:
        p = self.key_frequency
        y = np.concatenate([t for _, t in self.data[split]])
        nll = float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).sum(1).mean())
        return {"model": "each key at its training frequency", "loss": nll, "nll": nll}

    def summarize(self, sums):
        out = super().summarize(sums)
        return {"loss": out["loss"], "nll": out["loss"], "bits_per_step": out["loss"] / math.log(2)}

    @property
    def baseline(self):
        return self._baseline

    def format_example(self, batch, row: int = 0) -> str:
        n = int(batch.lengths[row]) if batch.lengths is not None else batch.inputs.shape[1]
        steps = [" ".join(str(LOWEST + k) for k in np.flatnonzero(f)) or "-" for f in batch.targets[row, :min(n, 8)]]
        return f"{n} predicted frames; the first targets (MIDI pitches): " + " | ".join(steps)
