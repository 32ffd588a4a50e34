"""Small file helpers shared by training runs and studies (no JAX import)."""

from __future__ import annotations

import json
import os
import pathlib


def json_default(o):
    """JSON for NumPy scalars and tuples; ``str`` for anything else."""
    import numpy as np

    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def atomic_json(path: pathlib.Path, data) -> None:
    """Write ``data`` as JSON to ``path`` so that a reader (or a crash) never sees half a file."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=json_default)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_jsonl(path: pathlib.Path, kinds=None) -> list[dict]:
    """The records of a ``metrics.jsonl`` (optionally only those whose ``kind`` is in ``kinds``), by step.
    Training writes one record per (kind, step) (a resume first cuts the file back to its checkpoint's step);
    a file that repeats some anyway (written by an older version) gives the last record of each. A missing file,
    a torn last line (a killed writer) or a line that is not a JSON object gives what could be read."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    out: dict = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict):
            continue
        if kinds is None or rec.get("kind") in kinds:
            out[(rec.get("kind"), rec.get("step"))] = rec
    return sorted(out.values(), key=lambda r: (r.get("step") or 0))
