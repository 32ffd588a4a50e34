"""Shared helpers. float64 is enabled for the whole suite (reference and
gradient checks need it); every float32 test states its dtypes explicitly, so
this also checks that nothing upcasts by accident."""

from __future__ import annotations

import math
import os
import shutil
import sys
import pathlib
import tempfile

# One persistent XLA compilation cache for the whole session, shared by the xdist workers (they
# inherit the controller's environment) and every training/sweep subprocess the tests start: the
# same programs are compiled again and again there (a resumed run, each trial of a sweep, each
# notebook). A fresh directory per session, removed at the end: nothing carries over between runs.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lstm_lab_test_xla_cache_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # every program: tests repeat many small ones

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import lstm_lab  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    """``slow`` tests run only when ``-m`` names them (``pytest -m slow``); any other run leaves them out,
    so ``pytest -m "not integration"`` needs no ``and not slow``."""
    if "slow" in (config.option.markexpr or ""):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    """Free the session's compiled programs and garbage while the worker still counts as running.

    An xdist worker that reports "finished" must exit within 5 s, or execnet sends it SIGINT; its last
    step is pytest's final ``gc.collect()``, which runs jax's ``_xla_gc_callback``. With hundreds of
    compiled programs alive (and a loaded machine) that collection took longer, so the SIGINT landed
    inside the callback and pytest printed a ``KeyboardInterrupt`` traceback after ``[100%]``. Doing
    the work here, before xdist's ``workerfinished`` (this hook runs inside its wrapper), leaves the
    final collection nothing to do.
    """
    import gc

    jax.clear_caches()
    gc.collect()


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, "workerinput"):  # the controller made it; workers share it
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture
def shared_data():
    """../shared/data: fails under CI=true when missing, skips otherwise."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{SHARED_DATA} is missing (CI=true)")
        pytest.skip(f"{SHARED_DATA} is missing")
    return SHARED_DATA


# Every preset with a CellSpec of its own, in VARIANTS order: the aliases (peephole = vanilla, np = lstm; test_cells
# holds them identical) would compile and check the same programs again.
DISTINCT_PRESETS = [name for i, (name, spec) in enumerate(lstm_lab.VARIANTS.items())
                    if spec not in list(lstm_lab.VARIANTS.values())[:i]]

# The cells every kernel is checked on (tests/test_kernels.py, tests/test_pallas.py): every distinct preset, the GRU
# in its other form, and LSTM-family flag combinations no preset has (peepholes next to a removed gate, several
# gates removed at once), so that every flag appears alone and together with others.
KERNEL_SPECS = {
    **{name: lstm_lab.VARIANTS[name] for name in DISTINCT_PRESETS},
    "gru_reset_after": lstm_lab.CellSpec(family="gru", reset_after=True),
    "nig+noaf+peep": lstm_lab.CellSpec(input_gate=False, output_activation="identity", peepholes=True),
    "nfg+nog+niaf": lstm_lab.CellSpec(forget_gate=False, output_gate=False, input_activation="identity"),
    "cifg+peep": lstm_lab.CellSpec(coupled=True, peepholes=True),
}


def randomize(layer: lstm_lab.RNN, seed: int, scale: float = 0.5) -> lstm_lab.RNN:
    """Overwrite every parameter with random non-zero values (in place)."""
    rng = np.random.default_rng(seed)
    for layer_cells in layer.cells:
        for cell in layer_cells:
            for name in cell.params():
                var = getattr(cell, name)
                value = var[...]
                var[...] = jnp.asarray(rng.normal(0.0, scale, value.shape), value.dtype)
    return layer


def layer_params(layer: lstm_lab.RNN):
    """params[layer][direction] as float64 numpy dicts."""
    return [[{k: np.asarray(v, np.float64) for k, v in cell.params().items()} for cell in lc]
            for lc in layer.cells]


def random_carry(layer: lstm_lab.RNN, batch_shape, seed: int, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    zero = layer.initialize_carry(batch_shape, dtype)
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, 0.5, a.shape), dtype), zero)


def carry_to_ref(carry, batch_shape):
    """Nested carry -> initial[layer][direction] dicts with one flat batch axis."""
    B = math.prod(batch_shape)
    return [[{k: np.asarray(v, np.float64).reshape(B, -1) for k, v in state._asdict().items()}
             for state in layer] for layer in carry]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for servers and coordinators the tests start)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
