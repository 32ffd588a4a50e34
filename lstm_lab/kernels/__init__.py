"""Every implementation of the recurrence, behind one registry.

An implementation (a :class:`Kernel`) runs one direction of one layer over time::

    ys, final_carry = kernel.run(spec, params, xp, carry0, mask, **options)

``xp`` ``[T, B, n*H]`` is the projected input ``x @ W + b``; ``params`` the cell's parameters
(``W`` unused); ``carry0`` the initial carry, fields ``[B, size]``, whose dtype is that of the
elementwise math; ``mask`` ``[T, B]`` bool says which steps are valid (past its end a row's carry is
frozen and its output zero) or is None (all valid). ``ys`` is ``[T, B, H]``. Everything else (the input
projection, the reverse direction, stacking, carries in and out) is the layer's,
:class:`lstm_lab.recurrent.RNN`, which picks the kernel by ``RNN(impl=name)``.

=============  ==========================================  ===============================================
name           module                                      what
=============  ==========================================  ===============================================
``scan``       :mod:`lstm_lab.kernels.scan`                ``lax.scan`` of the step, autodiff backward;
                                                           every cell, every dtype, gate traces
``scan_vjp``   :mod:`lstm_lab.kernels.scan_vjp`            the same forward, a custom VJP (LSTM family)
``pallas``     :mod:`lstm_lab.kernels.pallas`              one fused Pallas kernel launch (Triton on GPU)
``native``     :mod:`lstm_lab.kernels.native`              the time loop in C++ (XLA FFI, CPU), the LSTM
                                                           family, GRU, MGU, RNN
``parallel``   :mod:`lstm_lab.kernels.parallel`            a parallel scan in log space (minLSTM, minGRU)
=============  ==========================================  ===============================================

``impl="auto"`` runs what :data:`AUTO_IMPL` says for the backend and cell family (else :data:`DEFAULT`).
A new implementation is one module that defines ``KERNEL = Kernel(...)`` plus one line in ``_BUILTIN``
(or :func:`register` at run time). Built-in modules are imported when first used: importing this registry
imports no kernel, and Pallas is imported only when the Pallas kernel runs.

>>> from lstm_lab import kernels
>>> from lstm_lab.cells import VARIANTS
>>> kernels.names()
('scan', 'scan_vjp', 'pallas', 'native', 'parallel')
>>> print(kernels.impl_unsupported("scan_vjp", VARIANTS["gru"], 8))
impl='scan_vjp' supports the LSTM family; 'gru' is a gru (use impl='scan' or 'auto').
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Callable

import jax

__all__ = ["Kernel", "in_step_unsupported", "register", "unregister", "get", "names", "IMPLS", "DEFAULT", "AUTO_IMPL", "impl_unsupported",
           "resolve_impl", "resolve", "kernel_option_names"]

# name -> the module whose KERNEL it is, imported on first use
_BUILTIN = {
    "scan": "lstm_lab.kernels.scan",
    "scan_vjp": "lstm_lab.kernels.scan_vjp",
    "pallas": "lstm_lab.kernels.pallas",
    "native": "lstm_lab.kernels.native",
    "parallel": "lstm_lab.kernels.parallel",
}
_LOADED: dict[str, "Kernel"] = {}

DEFAULT = "scan"  # runs every cell, dtype and backend, and returns gate traces: what "auto" falls back to

# What impl="auto" runs, per backend and cell family, from benchmarks/layer_speed.py (benchmarks/NOTES.md,
# "impl=auto"): an implementation, or several in order of preference, the first that can run the cell at that
# size and dtype being taken (else DEFAULT). CPU: the native kernel is the fastest for every family at every
# anchor shape (NOTES, session 9); where it cannot run (no compiler, bfloat16), scan_vjp for the LSTM
# family (as fast or faster than the scan at every anchor). GPU (H200, NOTES session 10): scan_vjp for the LSTM
# family, 1.5-1.6x the scan at every group measured. impl="pallas" is faster still for one model at H <= 512
# (1.0-1.6x scan_vjp) but slower at H=1024 (0.6x), and under jax.vmap its split schedule runs a population's
# members one after another, so auto does not take it. The GPU's GRU/MGU/RNN and TPU: the plain scan.
AUTO_IMPL: dict[tuple[str, str], "str | tuple[str, ...]"] = {
    ("cpu", "lstm"): ("native", "scan_vjp"),
    ("cpu", "gru"): "native",
    ("cpu", "mgu"): "native",
    ("cpu", "rnn"): "native",
    ("gpu", "lstm"): "scan_vjp",
}


def in_step_unsupported(name: str, spec) -> str | None:
    """For a kernel that does not implement the in-step regularization (:data:`lstm_lab.cells.IN_STEP_REGULARIZERS`):
    the reason, naming the fields that are on, or None."""
    from lstm_lab.cells import IN_STEP_REGULARIZERS

    on = [f"{k}={getattr(spec, k)!r}" for k in IN_STEP_REGULARIZERS if getattr(spec, k)]
    if on:
        return f"impl={name!r} does not implement {', '.join(on)} inside its recurrence (impl='scan' does)"
    return None


def _supports_everything(spec, hidden_size, **_) -> None:
    return None


def _nothing_to_say(backend: str, options: dict) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One implementation of the recurrence.

    Attributes:
      name: what ``RNN(impl=...)`` and ``model.impl`` call it.
      run: ``run(spec, params, xp, carry0, mask, **options) -> (ys, final_carry)`` (see the module docstring).
      unsupported: ``unsupported(spec, hidden_size, *, dtype, param_dtype, backend, options) -> str | None``:
        why it cannot run this cell at this size, compute and parameter dtype (None: not given), backend and
        options, as a sentence that names the impl and the value; None when it can.
      options: the keyword options ``run`` takes (the layer passes ``unroll``, ``remat`` and its
        ``kernel_options`` where named here); None: ``run``'s keyword-only parameters.
      trace: ``trace(spec, params, xp, carry0, mask, **options) -> (ys, final_carry, traces)`` with the gate
        activations (:func:`lstm_lab.gate_trace`), or None: :func:`lstm_lab.gate_trace` then runs :data:`DEFAULT`.
      forward_mode: ``jax.jvp`` works through it (False for a custom VJP).
      on_build: ``on_build(backend, kernel_options)``, called when a layer is built with this impl (e.g. to
        warn what the backend makes of it).
    """

    name: str
    run: Callable
    unsupported: Callable[..., str | None] = _supports_everything
    options: tuple[str, ...] | None = None
    trace: Callable | None = None
    forward_mode: bool = True
    on_build: Callable[[str, dict], None] = _nothing_to_say

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier() or self.name == "auto":
            raise ValueError(f"Kernel: name must be an identifier other than 'auto'; got {self.name!r}.")
        if self.options is None:
            params = inspect.signature(self.run).parameters.values()
            object.__setattr__(self, "options", tuple(p.name for p in params if p.kind == p.KEYWORD_ONLY))

    def options_from(self, options: dict) -> dict:
        """The entries of ``options`` that :attr:`run` takes."""
        return {k: v for k, v in options.items() if k in self.options}


def register(kernel: Kernel) -> Kernel:
    """Add ``kernel`` to the registry under ``kernel.name`` (an error if the name is taken); returns it."""
    if not isinstance(kernel, Kernel):
        raise TypeError(f"register: expected an lstm_lab.kernels.Kernel; got {type(kernel).__name__}.")
    if kernel.name in _BUILTIN or kernel.name in _LOADED:
        raise ValueError(f"register: a kernel named {kernel.name!r} is already registered; registered: "
                         f"{', '.join(names())}. Pick another name (or unregister({kernel.name!r}) first).")
    _LOADED[kernel.name] = kernel
    return kernel


def unregister(name: str) -> None:
    """Remove a kernel added by :func:`register` (the built-in ones stay)."""
    if name in _BUILTIN:
        raise ValueError(f"unregister: {name!r} is built in.")
    _LOADED.pop(name, None)


def names() -> tuple[str, ...]:
    """Every registered kernel's name: the built-in ones, then those added by :func:`register`."""
    return tuple(_BUILTIN) + tuple(n for n in _LOADED if n not in _BUILTIN)


def get(name: str) -> Kernel:
    """The kernel registered as ``name`` (a built-in one is imported now, if it was not yet)."""
    if name not in _LOADED:
        if name not in _BUILTIN:
            raise ValueError(f"unknown impl {name!r}; expected one of {', '.join(('auto',) + names())}.")
        kernel = importlib.import_module(_BUILTIN[name]).KERNEL
        assert kernel.name == name, (name, kernel.name)
        _LOADED[name] = kernel
    return _LOADED[name]


IMPLS = ("auto",) + names()  # the built-in ones, for config fields; RNN also takes those added by register


def kernel_option_names(exclude: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Every option some registered kernel takes (in registry order), less ``exclude``."""
    seen: dict[str, None] = {}
    for n in names():
        seen.update((o, None) for o in get(n).options if o not in exclude)
    return tuple(seen)


def impl_unsupported(impl: str, spec, hidden_size: int, *, dtype=None, param_dtype=None, backend: str | None = None,
                     kernel_options: dict | None = None) -> str | None:
    """Why :class:`~lstm_lab.recurrent.RNN` cannot run ``impl`` for this cell, size, dtypes and backend
    (default: JAX's), a message naming the value and the fix, or None. The one check behind ``RNN(impl=...)``
    and the ``model.impl`` config field."""
    if impl == "auto":
        return None
    if impl not in names():
        return f"unknown impl {impl!r}; expected one of {', '.join(('auto',) + names())}."
    why = get(impl).unsupported(spec, int(hidden_size), dtype=dtype, param_dtype=param_dtype,
                                backend=backend or jax.default_backend(), options=dict(kernel_options or {}))
    return f"{why} (use impl={DEFAULT!r} or 'auto')." if why else None


def resolve_impl(impl: str, spec, backend: str | None = None, *, hidden_size: int | None = None,
                 dtype=None) -> str:
    """The implementation ``impl`` runs for ``spec`` on ``backend`` (default: JAX's default backend)."""
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    chosen = AUTO_IMPL.get((backend, spec.family), DEFAULT)
    for name in (chosen,) if isinstance(chosen, str) else chosen:
        if not get(name).unsupported(spec, hidden_size or 1, dtype=dtype, param_dtype=None, backend=backend,
                                     options={}):
            return name
    return DEFAULT


def resolve(impl: str, spec, *, hidden_size: int, dtype=None, backend: str | None = None,
            trace: bool = False) -> Kernel:
    """The kernel the layer runs: :func:`resolve_impl`'s, or :data:`DEFAULT` when gate traces are wanted and
    that kernel returns none."""
    kernel = get(resolve_impl(impl, spec, backend, hidden_size=hidden_size, dtype=dtype))
    return get(DEFAULT) if trace and kernel.trace is None else kernel
