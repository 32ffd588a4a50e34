"""Text sources: local files and TFDS (optional extra), split into train/valid/test."""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

__all__ = ["read_text", "split_contiguous", "tfds_texts", "SPLITS"]

SPLITS = ("train", "valid", "test")


def read_text(path: str | os.PathLike, *, encoding: str = "utf-8") -> str | bytes:
    """The contents of a text file: ``str`` for ``encoding="utf-8"``, ``bytes`` for ``"bytes"``.

    Raises ``FileNotFoundError`` for a missing file, ``ValueError`` for an
    empty file or (utf-8) bytes that are not valid UTF-8, naming the offset.
    """
    if encoding not in ("utf-8", "bytes"):
        raise ValueError(f"encoding must be 'utf-8' or 'bytes'; got {encoding!r}.")
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"text file {str(p)!r} does not exist.")
    if p.is_dir():
        raise IsADirectoryError(f"{str(p)!r} is a directory; expected a text file.")
    raw = p.read_bytes()
    if not raw:
        raise ValueError(f"text file {str(p)!r} is empty.")
    if encoding == "bytes":
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"text file {str(p)!r} is not valid UTF-8: byte {raw[e.start]:#04x} at offset {e.start} "
            f"({e.reason}). Fix the file, or read it byte-level with encoding='bytes'.") from None


def split_contiguous(text, fractions: Sequence[float] = (0.9, 0.05, 0.05), *, source: str = "text") -> dict:
    """Contiguous train/valid/test pieces of ``text`` (str or bytes) by ``fractions``.

    Each piece needs at least 2 characters (one input, one target).

    >>> split_contiguous("abcdefghijklmnopqrst", (0.8, 0.1, 0.1))
    {'train': 'abcdefghijklmnop', 'valid': 'qr', 'test': 'st'}
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers (train, valid, test) summing to 1; "
                         f"got {fractions}.")
    n = len(text)
    a = int(round(n * fractions[0]))
    b = int(round(n * (fractions[0] + fractions[1])))
    pieces = {"train": text[:a], "valid": text[a:b], "test": text[b:]}
    for split, piece in pieces.items():
        if len(piece) < 2:
            raise ValueError(
                f"the {split} split of {source} is empty or too small: {len(piece)} of {n} characters with "
                f"fractions {fractions}. Use a larger text or larger {split} fraction.")
    return pieces


def _decode(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if hasattr(value, "item") and not isinstance(value, str):  # numpy scalars
        return _decode(value.item())
    return str(value)


def tfds_texts(name: str, split: str, *, data_dir: str | None = None, text_key: str = "text") -> list[str]:
    """The text of every example of a TFDS split, via ``tfds.data_source`` (array_record, no TensorFlow).

    Works offline for data prepared in ``data_dir``; nothing is downloaded.
    Text may come as ``str`` or ``bytes`` (mock and real data differ); both decode.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            f"tfds:{name} needs tensorflow-datasets: pip install 'lstm_lab[tfds]' (or pass a local text file "
            f"as the path instead).") from e
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # noqa: BLE001 - TFDS raises many kinds; all mean "not available here"
        where = data_dir or "the default TFDS data_dir (~/tensorflow_datasets)"
        raise FileNotFoundError(
            f"TFDS dataset {name!r} (split {split!r}) is not prepared in {where}, and lstm_lab never downloads. "
            f"On a machine with network: python -c \"import tensorflow_datasets as tfds; "
            f"tfds.builder('{name}', data_dir='DIR', file_format='array_record').download_and_prepare()\" "
            f"then pass data_dir=DIR; or pass a local text file as the path. ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})") from None
    texts = []
    for i in range(len(source)):
        example = source[i]
        if text_key not in example:
            raise KeyError(f"TFDS dataset {name!r} has no feature {text_key!r}; its features are {sorted(example)}. "
                           f"Set text_key.")
        texts.append(_decode(example[text_key]))
    return texts
