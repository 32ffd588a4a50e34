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
