"""Vocabularies: built from the train split, saved with the run, id 0 reserved for unknowns."""

from __future__ import annotations

import collections
import json
import os
from typing import Iterable, Sequence

import numpy as np

__all__ = ["Vocab"]

UNK = "<unk>"


class Vocab:
    """A token <-> id map. Id 0 is the unknown token; every token not in the
    vocabulary encodes to it.

    >>> v = Vocab.from_chars("hello")
    >>> v.tokens, v.encode("hex").tolist(), v.decode([2, 3, 0])
    (['<unk>', 'e', 'h', 'l', 'o'], [2, 1, 0], 'hl<unk>')
    """

    def __init__(self, tokens: Sequence[str], *, kind: str = "word", unk: str = UNK):
        if kind not in ("char", "word", "byte"):
            raise ValueError(f"Vocab kind must be 'char', 'word' or 'byte'; got {kind!r}.")
        tokens = list(tokens)
        if not tokens or tokens[0] != unk:
            raise ValueError(f"Vocab: id 0 must be the unknown token {unk!r}; got {tokens[:1]}.")
        if len(set(tokens)) != len(tokens):
            raise ValueError("Vocab: tokens must be distinct.")
        self.tokens, self.kind, self.unk = tokens, kind, unk
        self.index = {t: i for i, t in enumerate(tokens)}
        if kind == "char":  # vectorised lookup by code point
            points = np.array([ord(t) for t in tokens[1:]], np.int64)
            order = np.argsort(points)
            self._points, self._ids = points[order], (np.arange(1, len(tokens))[order]).astype(np.int32)

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and (self.tokens, self.kind) == (other.tokens, other.kind)

    @classmethod
    def from_chars(cls, text: str) -> "Vocab":
        """Every distinct character of ``text``, sorted, after ``<unk>``."""
        return cls([UNK, *sorted(set(text))], kind="char")

    @classmethod
    def from_words(cls, words: Iterable[str], max_size: int | None = None, specials: Sequence[str] = ()) -> "Vocab":
        """Words by descending frequency (ties alphabetical), ``<unk>`` first; at most ``max_size`` in all."""
        counts = collections.Counter(words)
        counts.pop(UNK, None)
        ranked = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
        for s in specials:  # specials always kept
            if s in ranked:
                ranked.remove(s)
        ranked = [s for s in specials if s != UNK] + ranked
        if max_size is not None:
            if max_size < 2:
                raise ValueError(f"max_vocab must be at least 2 (<unk> and one word); got {max_size}.")
            ranked = ranked[:max_size - 1]
        return cls([UNK, *ranked], kind="word")

    @classmethod
    def from_bytes(cls) -> "Vocab":
        """The 256 byte values (as characters U+0000..U+00FF), for byte-level text."""
        return cls([UNK, *(chr(b) for b in range(256))], kind="byte")

    def encode(self, seq) -> np.ndarray:
        """Ids (int32) of a string (char), a bytes object (byte) or a list of words (word)."""
        if self.kind == "char":
            points = np.frombuffer(seq.encode("utf-32-le"), np.uint32).astype(np.int64)
            pos = np.clip(np.searchsorted(self._points, points), 0, len(self._points) - 1)
            return np.where(self._points[pos] == points, self._ids[pos], 0).astype(np.int32)
        if self.kind == "byte":
            return np.frombuffer(bytes(seq), np.uint8).astype(np.int32) + 1
        return np.fromiter((self.index.get(w, 0) for w in seq), np.int32, count=len(seq))

    def decode(self, ids) -> str:
        tokens = [self.tokens[int(i)] for i in np.asarray(ids).reshape(-1)]
        return ("" if self.kind in ("char", "byte") else " ").join(tokens)

    def to_json(self) -> dict:
        return {"kind": self.kind, "unk": self.unk, "tokens": self.tokens}

    @classmethod
    def from_json(cls, data: dict) -> "Vocab":
        return cls(data["tokens"], kind=data["kind"], unk=data["unk"])

    def save(self, path: str | os.PathLike) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, ensure_ascii=False)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocab":
        with open(path, encoding="utf-8") as f:
            return cls.from_json(json.load(f))
