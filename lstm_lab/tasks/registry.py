"""The task registry: ``get(name, **options)``; ``register`` adds a task.

Tasks of other packages register through the ``lstm_lab.tasks`` entry-point group (each entry point names a module
or an object to load; loading it registers its tasks), loaded the first time a name is not found. A module or file
of your own: ``import_tasks("my_tasks.py")`` (what every ``lstm-lab`` command's ``--import`` does), or import it in
the experiment or study file that uses its tasks.
"""

from __future__ import annotations

import inspect
from typing import Callable

from lstm_lab._hints import did_you_mean

__all__ = ["register", "get", "names", "option_names", "import_tasks", "load_entry_points", "ENTRY_POINT_GROUP"]

_REGISTRY: dict[str, Callable] = {}
ENTRY_POINT_GROUP = "lstm_lab.tasks"
_entry_points_loaded = False


def register(name: str, *, replace: bool = False):
    """Register a :class:`~lstm_lab.tasks.Task` subclass, or a function returning a task, under ``name``.

    Example::

        from lstm_lab import tasks

        @tasks.register("parity")
        class Parity(tasks.Task): ...          # or a function: def parity(T=10): return Parity(T)

        task = tasks.get("parity", T=50)

    A second registration of ``name`` with another factory is an error, unless ``replace=True`` (re-running a
    notebook cell that defines the task).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register: a task name must be a non-empty string; got {name!r}.")

    def deco(factory):
        if name in _REGISTRY and _REGISTRY[name] is not factory and not replace:
            raise ValueError(f"register: a task named {name!r} is already registered ({_REGISTRY[name]!r}); "
                             f"register({name!r}, replace=True) replaces it.")
        _REGISTRY[name] = factory
        return factory

    return deco


def names() -> list[str]:
    """The registered task names (entry points' included)."""
    load_entry_points()
    return sorted(_REGISTRY)


def option_names(name: str) -> dict[str, object]:
    """The options a task takes, with their defaults (``inspect.Parameter.empty`` when required)."""
    factory = _lookup(name)
    sig = inspect.signature(factory)
    return {p.name: p.default for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}


def load_entry_points() -> None:
    """Load the ``lstm_lab.tasks`` entry points of the installed packages (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001 - one broken plugin must not hide the others' tasks
            import sys

            print(f"warning: the {ENTRY_POINT_GROUP} entry point {ep.name!r} ({ep.value}) failed to load: "
                  f"{type(e).__name__}: {e}", file=sys.stderr)


def import_tasks(spec: str) -> None:
    """Import the module (``my_pkg.tasks``) or the Python file (``path/to/my_tasks.py``) ``spec``, so that the tasks
    it registers can be used by name; a bad name or file is one line (ValueError)."""
    import importlib
    import pathlib

    if spec.endswith(".py") or "/" in spec or pathlib.Path(spec).is_file():
        path = pathlib.Path(spec)
        if not path.is_file():
            raise ValueError(f"--import {spec!r}: no such file.")
        from lstm_lab._pyfile import exec_file

        exec_file(path, f"lstm_lab_user_{path.stem}", "task file")
        return
    try:
        importlib.import_module(spec)
    except ImportError as e:
        raise ValueError(f"--import {spec!r}: {e} (give a module name on sys.path or a .py file's path).") from None


def _lookup(name: str):
    if name not in _REGISTRY:
        load_entry_points()
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; registered: {', '.join(names())}.{did_you_mean(name, _REGISTRY)} "
                         f"(a task of your own: register it in a module and pass --import MODULE_OR_FILE)")
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
