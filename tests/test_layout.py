"""The package's shape: imports follow the data (config -> tasks -> models -> training -> sweep -> analysis), and
the core install (the layer, training) needs none of the extras."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "lstm_lab"

# a module of the first package may not import any of the second's (ARCHITECTURE.md's data-flow rule)
FORBIDDEN = [("sweep", "analysis"), ("training", "sweep"), ("training", "analysis"), ("models", "training"),
             ("recurrent", "training"), ("kernels", "training"), ("kernels", "recurrent"), ("cells", "recurrent"),
             ("tasks", "training"), ("tasks", "models"), ("config", "training"), ("data", "training")]


def _imports(path: pathlib.Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _files(part: str) -> list[pathlib.Path]:
    p = PKG / part
    return sorted(p.rglob("*.py")) if p.is_dir() else [p.with_suffix(".py")]


@pytest.mark.parametrize("src,dst", FORBIDDEN, ids=[f"{a}-not-{b}" for a, b in FORBIDDEN])
def test_imports_follow_the_data(src, dst):
    bad = [f"{f.relative_to(PKG.parent)} imports {m}" for f in _files(src) for m in sorted(_imports(f))
           if m == f"lstm_lab.{dst}" or m.startswith(f"lstm_lab.{dst}.")]
    assert not bad, bad


@pytest.mark.integration  # a fresh interpreter
def test_the_core_imports_none_of_the_extras():
    code = ("import sys, lstm_lab, lstm_lab.models, lstm_lab.training, lstm_lab.tasks, lstm_lab.kernels; "
            "lstm_lab.RNN; print(sorted(m for m in ('optuna', 'pandas', 'scipy', 'matplotlib', 'sklearn', "
            "'sqlalchemy', 'tensorboardX', 'torch', 'jax.experimental.pallas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
