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


def as_json(data):
    """``data`` as it reads back from JSON (tuples become lists, NumPy scalars numbers, anything else ``str``)."""
    return json.loads(json.dumps(data, default=json_default))


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


class LockBusy(OSError):
    """A non-waiting :class:`FileLock` found the lock held; ``holder`` is the pid written in the file."""

    def __init__(self, path, holder: str):
        super().__init__(f"{path} is locked by pid {holder}")
        self.holder = holder


class FileLock:
    """An exclusive ``fcntl.flock`` on ``path`` (created, with its directory), as a context manager; the workdir
    lock of a training run and the planning lock of a study.

    The file holds the holder's pid. The kernel releases the lock when the holder exits or is killed, so a file
    left behind is harmless (it is never removed: removing it would race). After locking, the file is checked to
    still be the one at ``path``; if its directory was moved meanwhile, the new file is locked instead.

    ``wait=False``: a held lock raises :class:`LockBusy` at once; ``wait=True``: ``on_wait()`` is called once,
    then it blocks. Other ``OSError``s (permissions, a read-only filesystem) propagate.
    """

    def __init__(self, path, *, wait: bool = True, on_wait=None):
        self.path, self.wait, self.on_wait, self.fd = pathlib.Path(path), wait, on_wait, None

    def acquire(self) -> "FileLock":
        import errno
        import fcntl

        told = False
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise
                    if not self.wait:
                        raise LockBusy(self.path, _lock_holder(fd)) from None
                    if self.on_wait is not None and not told:
                        self.on_wait()
                        told = True
                    fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if same:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except BaseException:
                os.close(fd)
                raise
            if same:
                self.fd = fd
                return self
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _lock_holder(fd: int) -> str:
    import time

    for _ in range(50):  # the holder writes its pid just after it takes the lock
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return "unknown"
