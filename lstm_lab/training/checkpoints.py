"""Verified checkpoints of a run's state, saved and restored BY NAME.

A checkpoint is the train state ``{"params": nnx.State, "opt_state": ..., "carry": ...}`` as a nested dict of
named arrays (``params/rnn/layers/0/W`` ...: the pytree's paths) plus JSON metadata. Restoring maps every array
back by its name, so two same-shaped arrays that change places between versions cannot restore into each other's
slots; a name missing on either side is an error that lists them. The metadata's ``checksums`` hold the sha256 of
every array's bytes with its shape and dtype; a restore recomputes them. A checkpoint that fails is reported in one
line and the next newest is tried (the older ``last`` ones, then ``best``); see :class:`Checkpoints`.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lstm_lab._io import as_json

__all__ = ["Checkpoints", "CorruptCheckpoint", "named_arrays", "checkpoint_steps", "FORMAT"]

FORMAT = 2  # 1: arrays keyed by leaf position, which a restore could not check against the model's names
_OLD_FORMAT = ("an older lstm_lab wrote it (checkpoint format {}: arrays by position, not by name), which this "
               "version cannot map onto the model")


class CorruptCheckpoint(ValueError):
    """A checkpoint whose contents do not match its checksums or the model."""


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def named_arrays(tree) -> dict[str, Any]:
    """``{"params/rnn/W": leaf, ...}``: every leaf of ``tree`` by its path (dict keys, attribute names, indices)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join(_key_name(k) for k in path)
        if name in out:
            raise ValueError(f"two arrays of the train state have the same name {name!r}")
        out[name] = leaf
    return out


def _nest(flat: dict) -> dict:
    """``{"a/b": x}`` -> ``{"a": {"b": x}}`` (what orbax stores: one folder level per name part)."""
    out: dict = {}
    for name, v in flat.items():
        d = out
        *parents, last = name.split("/")
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = v
    return out


def _flat(nested: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in nested.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _to_host(leaf) -> np.ndarray:
    """A leaf as a NumPy array; an array sharded over several processes is gathered first."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(leaf)


def _digest(a: np.ndarray) -> dict:
    """What a checkpoint's metadata records of one array: the sha256 of its bytes (C order), shape and dtype."""
    a = np.asarray(a)
    data = np.ascontiguousarray(a).reshape(-1).view(np.uint8)  # (ascontiguousarray makes a scalar 1-d)
    return {"sha256": hashlib.sha256(data).hexdigest(), "shape": list(a.shape), "dtype": str(a.dtype)}


def checkpoint_steps(workdir) -> list[int]:
    """Checkpoint steps on disk (``last`` and ``best``), without opening orbax."""
    out = []
    for which in ("last", "best"):
        d = pathlib.Path(workdir) / "checkpoints" / which
        if d.is_dir():
            out += [int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(out)


def _names_differ(have, want) -> str:
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    part = lambda label, xs: f"{label} {', '.join(xs[:4])}{' ...' if len(xs) > 4 else ''}"  # noqa: E731
    return "; ".join(p for p in (part("the model has", missing) if missing else "",
                                 part("the checkpoint has", extra) if extra else "") if p)


class Checkpoints:
    """Orbax CheckpointManagers: ``last`` (keep k) and ``best`` (keep 1), in ``<workdir>/checkpoints``."""

    def __init__(self, workdir, keep: int, log: Callable[[str], None]):
        import orbax.checkpoint as ocp

        self.ocp, self.log = ocp, log
        self.root = (pathlib.Path(workdir) / "checkpoints").absolute()
        opts = lambda n: ocp.CheckpointManagerOptions(max_to_keep=n, create=True,  # noqa: E731
                                                      enable_async_checkpointing=False)
        self.managers = {"last": ocp.CheckpointManager(self.root / "last", options=opts(max(1, keep))),
                         "best": ocp.CheckpointManager(self.root / "best", options=opts(1))}
        self.bad: list[tuple[str, int]] = []  # (which, step) found corrupt or unreadable by restore_newest()

    def save(self, which: str, step: int, state, meta: dict) -> None:
        arrays = {k: _to_host(v) for k, v in named_arrays(state).items()}
        mgr = self.managers[which]
        if step in mgr.all_steps():  # the same step again (a resumed run's final save)
            return
        meta = {**meta, "format": FORMAT, "checksums": {k: _digest(v) for k, v in arrays.items()}}
        mgr.save(step, args=self.ocp.args.Composite(
            state=self.ocp.args.StandardSave(_nest(arrays)),
            meta=self.ocp.args.JsonSave(as_json(meta))))
        mgr.wait_until_finished()

    def _load(self, which: str, step: int, template: dict) -> tuple[dict, dict]:
        try:
            out = self.managers[which].restore(step, args=self.ocp.args.Composite(
                state=self.ocp.args.StandardRestore(_nest(template)), meta=self.ocp.args.JsonRestore()))
        except Exception:
            meta = self._meta(which, step)
            if meta is not None and meta.get("format", 1) != FORMAT:
                raise CorruptCheckpoint(_OLD_FORMAT.format(meta.get("format", 1))) from None
            if meta is not None and sorted(meta.get("checksums") or {}) != sorted(template):
                raise CorruptCheckpoint(f"its arrays do not match the model's: "
                                        f"{_names_differ(meta.get('checksums') or {}, template)}") from None
            raise
        meta = dict(out["meta"])
        if meta.get("format", 1) != FORMAT:
            raise CorruptCheckpoint(_OLD_FORMAT.format(meta.get("format", 1)))
        sums = meta.pop("checksums", None) or {}
        arrays = {k: np.asarray(v) for k, v in _flat(dict(out["state"])).items()}
        if sorted(arrays) != sorted(template) or sorted(sums) != sorted(template):
            raise CorruptCheckpoint(f"its arrays do not match the model's: {_names_differ(arrays, template)}")
        if int(meta.get("step", step)) != step:
            raise CorruptCheckpoint(f"its metadata says step {meta.get('step')!r}")
        for k, want in sums.items():
            have, t = _digest(arrays[k]), template[k]
            if have["shape"] != list(t.shape):
                raise CorruptCheckpoint(f"array {k} has shape {tuple(have['shape'])}, the model's {tuple(t.shape)}")
            if (want.get("shape"), want.get("dtype")) != (have["shape"], have["dtype"]):
                raise CorruptCheckpoint(f"array {k} is {have['dtype']}{have['shape']}, its checksum was taken of "
                                        f"{want.get('dtype')}{want.get('shape')}")
            if want.get("sha256") != have["sha256"]:
                raise CorruptCheckpoint(f"array {k} ({have['dtype']}{have['shape']}) does not match its sha256 "
                                        f"checksum")
        return arrays, meta

    def _meta(self, which: str, step: int) -> dict | None:
        """A checkpoint's JSON metadata alone (read from its file), or None."""
        path = self.root / which / str(step) / "meta" / "metadata"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def restore_newest(self, target, order=("last", "best"), steps=None) -> tuple[Any, dict, str, int] | None:
        """The first intact checkpoint, trying each manager in ``order`` newest first (only ``steps`` when
        given): ``(state shaped like target, meta, which, step)``, or None. Each one that fails is reported in one
        line and remembered in ``self.bad``."""
        named = named_arrays(target)
        # shapes and dtypes only: no device-to-host copy (nor a cross-process gather) for a template
        template = {k: np.empty(np.shape(v), getattr(v, "dtype", None) or np.asarray(v).dtype)
                    for k, v in named.items()}
        candidates = [(step, which) for which in order for step in sorted(self.managers[which].all_steps(),
                                                                              reverse=True)
                      if steps is None or step in steps]
        for i, (step, which) in enumerate(candidates):
            try:
                arrays, meta = self._load(which, step, template)
            except Exception as e:  # noqa: BLE001 - a corrupt checkpoint: say so, fall back
                why = str(e).splitlines()[0][:300] if str(e) else ""
                why = why if isinstance(e, CorruptCheckpoint) else f"{type(e).__name__}: {why}"
                nxt = (f"falling back to the {candidates[i + 1][1]} checkpoint at step {candidates[i + 1][0]}"
                       if i + 1 < len(candidates) else "no other checkpoint to fall back to")
                state = "is corrupt" if isinstance(e, CorruptCheckpoint) else "is unreadable"
                self.log(f"warning: the {which} checkpoint at step {step} {state} ({why}); {nxt}")
                self.bad.append((which, step))
                continue
            leaves = [jnp.asarray(arrays[k]) for k in named]
            return jax.tree.unflatten(jax.tree.structure(target), leaves), meta, which, step
        return None

    def restore(self, which: str, target) -> tuple[Any, dict] | None:
        """The newest intact checkpoint of ``which`` as ``(state, meta)``, or None."""
        out = self.restore_newest(target, (which,))
        return None if out is None else out[:2]

    def steps(self) -> dict[str, list[int]]:
        return {w: sorted(m.all_steps()) for w, m in self.managers.items()}

    def has_any(self) -> bool:
        return any(self.steps().values())

    def delete_bad(self) -> None:
        """Delete the checkpoints restore found corrupt (a later save of the same step would otherwise be skipped)."""
        for which, step in self.bad:
            if step in self.managers[which].all_steps():
                self.managers[which].delete(step)
        self.bad = []

    def close(self):
        for m in self.managers.values():
            m.close()
