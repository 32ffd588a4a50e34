"""``impl="parallel"``: minLSTM and minGRU over time with a parallel scan, in log space.

Their gates and candidate see only ``x_t`` (Feng et al. 2024), so the recurrence ``h_t = a_t * h_{t-1} + b_t`` is
linear in ``h`` with ``a_t``, ``b_t`` known for every step at once (:func:`lstm_lab.cells.min_coefficients`, both
positive). With ``A_t = sum_{s<=t} log a_s`` and ``L_t = log sum_{s<=t} b_s * prod_{s<r<=t} a_r``::

    h_t = exp(L_t) + h_0 * exp(A_t)

where ``(A, L)`` is one ``jax.lax.associative_scan`` of ``(A1, L1) o (A2, L2) = (A1 + A2, logaddexp(L1 + A2, L2))``:
``O(log T)`` steps deep instead of ``T``, every product a sum of logs (the paper's log-space form, so no product of
many gates underflows before it is used), and ``h_0`` of any sign (it is not taken to the log). A masked step is
``a = 1, b = 0``: the carry passes through. ``impl="scan"`` computes the same function step by step
(``tests/test_modern_cells.py`` holds them equal).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lstm_lab import cells as _cells
from lstm_lab.cells import CellSpec
from lstm_lab.kernels import Kernel

__all__ = ["parallel", "KERNEL"]

_NO_INPUT = -1e30  # log b of a masked step: exp() is exactly 0, and unlike -inf it has finite gradients


def _combine(left, right):
    a1, l1 = left
    a2, l2 = right
    return a1 + a2, jnp.logaddexp(l1 + a2, l2)


def parallel(spec: CellSpec, params: dict[str, jax.Array], xp: jax.Array, carry0, mask: jax.Array | None = None):
    """Run one direction of one layer over time (arguments as :class:`lstm_lab.kernels.Kernel`'s ``run``):
    ``(ys [T, B, H], final_carry)``."""
    acc = carry0.h.dtype
    log_a, log_b = _cells.min_coefficients(spec, _cells._split(xp.astype(acc), spec.gate_names()))
    if mask is not None:
        m = mask[..., None]
        log_a = jnp.where(m, log_a, 0.0)
        log_b = jnp.where(m, log_b, jnp.asarray(_NO_INPUT, acc))
    A, L = jax.lax.associative_scan(_combine, (log_a, log_b), axis=0)
    h = jnp.exp(L) + carry0.h[None] * jnp.exp(A)
    ys = h if mask is None else jnp.where(mask[..., None], h, jnp.zeros_like(h))
    return ys.astype(xp.dtype) if xp.dtype != acc else ys, _cells.HiddenState(h[-1])


def _unsupported(spec: CellSpec, hidden_size: int, **_) -> str | None:
    if spec.family not in _cells.INPUT_ONLY:
        return (f"impl='parallel' needs a cell whose gates see only the input ({', '.join(_cells.INPUT_ONLY)}); "
                f"{spec.name!r} is a {spec.family}, whose gates read h_(t-1)")
    return None


KERNEL = Kernel("parallel", parallel, unsupported=_unsupported)
