"""Character- and word-level language modeling with truncated-BPTT streams."""

from __future__ import annotations

import math
import os
import pathlib
from typing import Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from lstm_lab.data.batching import Batch, StreamBatcher, eval_stream_batches
from lstm_lab.data.text import SPLITS, read_text, split_contiguous, tfds_texts
from lstm_lab.data.vocab import Vocab
from lstm_lab.tasks.base import Task, row_sum, sequence_cross_entropy
from lstm_lab.tasks.registry import register

__all__ = ["CharLMTask", "WordLMTask"]

EOS = "<eos>"
TFDS_PREFIX = "tfds:"


class _LMTask(Task):
    """A next-token task over three token streams (train, valid, test)."""

    input_kind = "tokens"
    stateful = True

    def _setup(self, vocab: Vocab, tokens: dict[str, np.ndarray], seq_len: int):
        if not isinstance(seq_len, (int, np.integer)) or isinstance(seq_len, bool) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int; got {seq_len!r}.")
        for split in SPLITS:
            if len(tokens[split]) < 2:
                raise ValueError(f"the {split} split of {self.source!r} is empty or too small "
                                 f"({len(tokens[split])} tokens).")
        self.vocab, self.tokens, self.seq_len = vocab, tokens, int(seq_len)
        self.input_size = self.output_size = len(vocab)
        self._batchers: dict = {}
        self._eval: dict = {}
        self._baseline = None

    def train_batches(self, batch_size, *, seed=0, start_step=0) -> Iterator[Batch]:
        key = (batch_size, int(seed))
        if key not in self._batchers:
            self._batchers[key] = StreamBatcher(self.tokens["train"], batch_size, self.seq_len, seed=seed)
        return self._batchers[key](start_step)

    def eval_batches(self, split, batch_size):
        if split not in ("valid", "test"):
            raise ValueError(f"unknown evaluation split {split!r}; expected valid or test.")
        key = (split, batch_size)
        if key not in self._eval:
            self._eval[key] = eval_stream_batches(self.tokens[split], batch_size, self.seq_len)
        return self._eval[key]

    def metric_sums(self, outputs, batch):
        w = batch["weights"].astype(jnp.float32)
        ce = sequence_cross_entropy(outputs, batch["targets"])
        return {"loss_sum": row_sum(w, ce), "weight": row_sum(w, jnp.ones_like(w))}

    def _unigram_ce(self) -> float:
        """Cross-entropy (nats) of the valid split under the add-one unigram model of train."""
        counts = np.bincount(self.tokens["train"], minlength=len(self.vocab)).astype(np.float64) + 1.0
        logp = np.log(counts / counts.sum())
        return float(-logp[self.tokens["valid"][1:]].mean())

    def split_sizes(self):
        return {split: int(len(t)) for split, t in self.tokens.items()}

    def format_example(self, batch, row=0):
        return self.vocab.decode(batch.inputs[row])

    def save(self, directory) -> None:
        self.vocab.save(pathlib.Path(directory) / "vocab.json")


def _load_vocab(vocab_path):
    return None if vocab_path is None else Vocab.load(vocab_path)


@register("char_lm")
class CharLMTask(_LMTask):
    """Character-level language modeling; loss in nats/char, also bits/char.

    Options:
      path: a local text file (split contiguously by ``splits``), or
        ``"tfds:<name>"`` (e.g. ``"tfds:tiny_shakespeare"``; its train,
        validation and test splits, via ``tfds.data_source``, offline).
      seq_len: the BPTT window ``T``.
      splits: train/valid/test fractions of a local file.
      encoding: ``"utf-8"``, or ``"bytes"`` for byte-level modeling of any file.
      data_dir, text_key: for TFDS.
      vocab_path: a saved ``vocab.json`` to use instead of building one from
        train (a resumed run or a sampler reads its run's vocabulary).

    The vocabulary is the train split's characters; id 0 is reserved for
    characters the train split lacks.
    """

    name = "char_lm"

    def __init__(self, path: str, seq_len: int = 100, *, splits: Sequence[float] = (0.9, 0.05, 0.05),
                 encoding: str = "utf-8", data_dir: str | None = None, text_key: str = "text",
                 vocab_path: str | None = None):
        self.source = str(path)
        self.options = {"path": self.source, "seq_len": seq_len, "splits": tuple(splits), "encoding": encoding,
                        "data_dir": data_dir, "text_key": text_key, "vocab_path": vocab_path}
        if self.source.startswith(TFDS_PREFIX):
            if encoding != "utf-8":
                raise ValueError("encoding='bytes' applies to local files only.")
            name = self.source[len(TFDS_PREFIX):]
            tfds_split = {"train": "train", "valid": "validation", "test": "test"}
            texts = {s: "\n".join(tfds_texts(name, tfds_split[s], data_dir=data_dir, text_key=text_key))
                     for s in SPLITS}
        else:
            texts = split_contiguous(read_text(path, encoding=encoding), splits, source=self.source)
        vocab = _load_vocab(vocab_path) or (Vocab.from_bytes() if encoding == "bytes"
                                            else Vocab.from_chars(texts["train"]))
        self.characters = len(set(texts["train"]) | set(texts["valid"]) | set(texts["test"]))
        self._setup(vocab, {s: vocab.encode(t) for s, t in texts.items()}, seq_len)

    def summarize(self, sums):
        nats = sums["loss_sum"] / sums["weight"]
        return {"loss": nats, "bits_per_char": nats / math.log(2), "tokens": sums["weight"]}

    @property
    def baseline(self):
        if self._baseline is None:
            ce = self._unigram_ce()
            self._baseline = {"loss": ce, "bits_per_char": ce / math.log(2), "model": "unigram (valid)"}
        return self._baseline

    def describe(self):
        info = super().describe()
        info["vocab_size"] = len(self.vocab)
        info["distinct_characters"] = self.characters
        return info


def _words(lines: Sequence[str]) -> list[str]:
    out: list[str] = []
    for line in lines:
        out.extend(line.split())
        out.append(EOS)
    return out


def _ptb_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
    if not directory.exists():
        raise FileNotFoundError(f"word_lm: directory {str(directory)!r} does not exist.")
    if not directory.is_dir():
        raise NotADirectoryError(f"word_lm: {str(directory)!r} is not a directory; expected one holding "
                                 f"*.train.txt, *.valid.txt and *.test.txt (PTB format).")
    files, missing = {}, []
    for split in SPLITS:
        found = sorted(directory.glob(f"*.{split}.txt"))
        if not found:
            missing.append(f"*.{split}.txt")
        elif len(found) > 1:
            raise ValueError(f"word_lm: {str(directory)!r} holds several {split} files: "
                             f"{', '.join(p.name for p in found)}; keep one.")
        else:
            files[split] = found[0]
    if missing:
        raise FileNotFoundError(f"word_lm: {str(directory)!r} lacks {', '.join(missing)} (PTB format: "
                                f"ptb.train.txt, ptb.valid.txt, ptb.test.txt).")
    return files


@register("word_lm")
class WordLMTask(_LMTask):
    """Word-level language modeling (Penn Treebank format); loss in nats/word, also perplexity.

    Options:
      path: a directory with ``*.train.txt``, ``*.valid.txt``, ``*.test.txt``
        (one sentence per line; ``<eos>`` is appended to each line, ``<unk>``
        kept as a word), or ``"tfds:<name>"`` (each line of each example's
        text is a sentence).
      seq_len: the BPTT window (Zaremba et al. 2014 use 35).
      max_vocab: keep the most frequent train words (with ``<unk>`` and
        ``<eos>``); None keeps all.
      data_dir, text_key: for TFDS.
      vocab_path: a saved ``vocab.json`` to use instead.
    """

    name = "word_lm"

    def __init__(self, path: str, seq_len: int = 35, *, max_vocab: int | None = None, data_dir: str | None = None,
                 text_key: str = "text", vocab_path: str | None = None):
        self.source = str(path)
        self.options = {"path": self.source, "seq_len": seq_len, "max_vocab": max_vocab, "data_dir": data_dir,
                        "text_key": text_key, "vocab_path": vocab_path}
        if self.source.startswith(TFDS_PREFIX):
            name = self.source[len(TFDS_PREFIX):]
            tfds_split = {"train": "train", "valid": "validation", "test": "test"}
            lines = {s: [ln for text in tfds_texts(name, tfds_split[s], data_dir=data_dir, text_key=text_key)
                         for ln in text.splitlines()] for s in SPLITS}
        else:
            lines = {s: read_text(p).splitlines() for s, p in _ptb_files(pathlib.Path(os.path.expanduser(path))).items()}
        words = {s: _words(v) for s, v in lines.items()}
        vocab = _load_vocab(vocab_path) or Vocab.from_words(words["train"], max_vocab, specials=(EOS,))
        self._setup(vocab, {s: vocab.encode(w) for s, w in words.items()}, seq_len)

    def summarize(self, sums):
        nats = sums["loss_sum"] / sums["weight"]
        return {"loss": nats, "perplexity": math.exp(min(nats, 700.0)), "tokens": sums["weight"]}

    @property
    def baseline(self):
        if self._baseline is None:
            ce = self._unigram_ce()
            self._baseline = {"loss": ce, "perplexity": math.exp(ce), "model": "unigram (valid)"}
        return self._baseline

    def describe(self):
        info = super().describe()
        info["vocab_size"] = len(self.vocab)
        return info
