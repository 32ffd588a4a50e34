"""Error-message helpers shared by every module that names a bad value."""

from __future__ import annotations

import difflib
from typing import Iterable


def did_you_mean(word: str, options: Iterable[str], *, cutoff: float = 0.5) -> str:
    """``" Did you mean 'x'?"`` for the options closest to ``word`` (all within 0.85
    similarity, else the single best above ``cutoff``), or ``""``.

    >>> did_you_mean("vanila", ["lstm", "vanilla", "nig"])
    " Did you mean 'vanilla'?"
    """
    options = [str(o) for o in options]
    close = difflib.get_close_matches(word, options, n=3, cutoff=0.85) or \
        difflib.get_close_matches(word, options, n=1, cutoff=cutoff)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def error_message(e: BaseException, *, first_line: bool = False) -> str:
    """An exception's message as a user should read it: a KeyError's without the repr quotes that ``str()``
    adds; with ``first_line``, only its first line (or the exception's type when it has no message).

    >>> error_message(KeyError("config: unknown key 'x'."))
    "config: unknown key 'x'."
    """
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
    if first_line:
        return text.splitlines()[0] if text.strip() else type(e).__name__
    return text
