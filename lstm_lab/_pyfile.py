"""Executing a user's Python file (an experiment or a study file) with errors that point at file:line."""

from __future__ import annotations

import importlib.util
import pathlib
import traceback
import types

from lstm_lab._hints import error_message


class UserFileError(ValueError):
    """A user's Python file failed to execute; the message is one line with ``file:line``."""


def exec_file(path, module_name: str, what: str) -> types.ModuleType:
    """Execute ``path`` as a module named ``module_name``; a syntax error or any exception it raises becomes
    :class:`UserFileError` ``"<what> <path>:<line>: <Error>: <message>"`` (the innermost frame in that file).

    ``what`` names the kind of file in the message, e.g. ``"experiment file"``.
    """
    path = pathlib.Path(path)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        where = f"{e.filename or path}:{e.lineno}" if e.lineno else str(path)
        raise UserFileError(f"{what} {where}: SyntaxError: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 - anything the file raises: where and what, in one line
        resolved = str(path.resolve())
        frames = [f for f in traceback.extract_tb(e.__traceback__)
                  if f.filename and pathlib.Path(f.filename).resolve().as_posix() == pathlib.Path(resolved).as_posix()]
        where = f"{path}:{frames[-1].lineno}" if frames else str(path)
        raise UserFileError(f"{what} {where}: {type(e).__name__}: {error_message(e, first_line=True)}") from None
    return module
