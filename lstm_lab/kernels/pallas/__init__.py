"""One layer direction's whole time loop in one Pallas kernel launch, forward and backward.

The kernel is the plain recurrence with nothing left outside the loop but what can be one
big matmul::

    forward  (one launch; a program per batch tile of ``block_b`` rows)
        R, R_gates, peepholes loaded once, kept by the program for all T steps
        for t in 0..T-1:
            a_k = xp[t, k] + h @ R_k  (+ sum_s gates_s @ R_gates[s, k])      per gate k
            h, c, gates = where(mask[t], cell math(a, c, peepholes), previous)
            write the carry of step t (and, for the backward, the a_k)
    backward (one launch, the same programs)
        for t in T-1..0:
            da, dcarry_prev = vjp of the step's elementwise math      (recomputed from a)
            dh_prev += sum_k da_k @ R_k^T                              (the only matmuls)
            write da (= dxp[t])
    after the loop: dR = h_prev^T @ da over all (t, b) at once, dR_gates likewise.

The elementwise math is :func:`lstm_lab.cells.lstm_pointwise`, :func:`~lstm_lab.cells.gru_gates`,
:func:`~lstm_lab.cells.gru_candidate`, :func:`~lstm_lab.cells.mgu_gate`,
:func:`~lstm_lab.cells.mgu_candidate`, :func:`~lstm_lab.cells.rnn_pointwise`: the functions
:func:`lstm_lab.cells.step` runs,
and its backward is their ``jax.vjp`` traced into the kernel, so every flag combination is
covered by construction.

Layouts: gates are split into a gate axis (``xp`` ``[T, B, G, H]``, ``R`` ``[G, H, H]``) so
each tile the kernel touches is ``[rows, H]``; ``H`` is padded to a power of two (at least
16, Triton's smallest dot) and the batch to a multiple of ``block_b`` (at least 16). Padded
hidden units have zero weights and stay zero-valued in ``h`` and ``c``; padded rows are masked
out. Everything is sliced back before the caller sees it, and autodiff handles the padding.

On GPU the kernel lowers to Triton (``jax.experimental.pallas``'s Triton backend); on any
other backend it runs in Pallas interpret mode, which is how the test suite checks it
against the scan. One program keeps the whole ``[G, H, H]`` recurrent matrix when it fits in
:data:`SMEM_BUDGET` of shared memory; otherwise (or with ``block_h``) the hidden size is split
across programs that exchange ``h`` (backward: ``d_pre``) through global memory and meet at a
barrier every step (:mod:`.split`); Cho et al.'s GRU and the MGU also
exchange ``r * h`` / ``f * h`` (backward: ``dq``) in the middle of the step, at a second barrier.

Modules: :mod:`.plan` (the launch plan and what is refused; no Pallas import), :mod:`.tiles` (what both
schedules share), :mod:`.whole` (the whole-H schedule), :mod:`.split` (the hidden size split across
programs), :mod:`.vjp` (the custom VJP and :func:`~lstm_lab.kernels.pallas.vjp.fused_recurrence`, the
entry point). This module is the registry entry, ``impl="pallas"``; it imports Pallas only when the
kernel runs.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from lstm_lab.kernels import Kernel
from lstm_lab.kernels.pallas.plan import SMEM_BUDGET, pallas_unsupported

__all__ = ["KERNEL", "OPTIONS", "SMEM_BUDGET", "pallas_unsupported", "fused_recurrence"]

# fused_recurrence's keyword options (tests/test_pallas.py holds the two equal)
OPTIONS = ("block_b", "block_h", "block_k", "stream_weights", "num_warps", "interpret", "precision")


def _unsupported(spec, hidden_size, *, dtype=None, param_dtype=None, backend=None, options=None):
    return pallas_unsupported(spec, int(hidden_size), dtype=dtype, param_dtype=param_dtype,
                              block_h=(options or {}).get("block_h"))


def _run(spec, params, xp, carry0, mask=None, **options):
    from lstm_lab.kernels.pallas.vjp import fused_recurrence  # Pallas is imported only when the kernel runs

    if mask is None:
        mask = jnp.ones(xp.shape[:2], bool)
    return fused_recurrence(spec, params, xp, carry0, mask, **options)


@functools.lru_cache(maxsize=None)
def _warn_interpret_once(backend: str) -> None:
    import warnings

    warnings.warn(f"impl='pallas' runs in Pallas interpret mode on {backend!r} (no GPU): the same function, "
                  f"several times slower than impl='auto'; it is for checking the kernel. Pass "
                  f"kernel_options={{'interpret': True}} to silence this.", stacklevel=4)


def _on_build(backend: str, options: dict) -> None:
    if backend != "gpu" and options.get("interpret") is None:
        _warn_interpret_once(backend)


KERNEL = Kernel("pallas", _run, unsupported=_unsupported, options=OPTIONS, forward_mode=False, on_build=_on_build)


def __getattr__(name: str):
    if name == "fused_recurrence":  # imports Pallas
        from lstm_lab.kernels.pallas.vjp import fused_recurrence

        return fused_recurrence
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
