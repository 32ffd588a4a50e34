"""Data: text sources (local files, TFDS), vocabularies, and batching for truncated BPTT."""

from lstm_lab.data.batching import Batch, StreamBatcher, eval_stream_batches, prefetch
from lstm_lab.data.text import read_text, split_contiguous, tfds_texts
from lstm_lab.data.vocab import Vocab

__all__ = ["Batch", "StreamBatcher", "Vocab", "eval_stream_batches", "prefetch", "read_text", "split_contiguous",
           "tfds_texts"]
