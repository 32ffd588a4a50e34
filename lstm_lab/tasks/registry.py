"""The task registry: ``get(name, **options)``; ``register`` adds a task."""

from __future__ import annotations

import inspect
from typing import Callable

from lstm_lab._hints import did_you_mean

__all__ = ["register", "get", "names", "option_names"]

_REGISTRY: dict[str, Callable] = {}


def register(name: str):
    """Register a :class:`~lstm_lab.tasks.Task` subclass, or a function returning a task, under ``name``.

    Example::

        from lstm_lab import tasks

        @tasks.register("parity")
        class Parity(tasks.Task): ...          # or a function: def parity(T=10): return Parity(T)

        task = tasks.get("parity", T=50)
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register: a task name must be a non-empty string; got {name!r}.")

    def deco(factory):
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"register: a task named {name!r} is already registered ({_REGISTRY[name]!r}).")
        _REGISTRY[name] = factory
        return factory

    return deco


def names() -> list[str]:
    """The registered task names."""
    return sorted(_REGISTRY)


def option_names(name: str) -> dict[str, object]:
    """The options a task takes, with their defaults (``inspect.Parameter.empty`` when required)."""
    factory = _lookup(name)
    sig = inspect.signature(factory)
    return {p.name: p.default for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}


def _lookup(name: str):
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; registered: {', '.join(names())}.{did_you_mean(name, _REGISTRY)}")
    return _REGISTRY[name]


def get(name: str, **options):
    """The task ``name`` built with ``options``; unknown names and options raise with a did-you-mean."""
    factory = _lookup(name)
    sig = inspect.signature(factory)
    if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        known = option_names(name)
        for key in options:
            if key not in known:
                raise ValueError(f"task {name!r} has no option {key!r}; its options are "
                                 f"{', '.join(known) or '(none)'}.{did_you_mean(key, known)}")
        missing = [k for k, v in known.items() if v is inspect.Parameter.empty and k not in options]
        if missing:
            raise ValueError(f"task {name!r} needs option(s) {', '.join(missing)}.")
    return factory(**options)
