"""``impl="scan"``: ``jax.lax.scan`` of :func:`lstm_lab.cells.step`, with autodiff for the backward pass.

Every cell, dtype and backend; forward and reverse mode; the only kernel that also returns the gate
activations (:func:`lstm_lab.gate_trace`). The other kernels are held to it and to the float64 NumPy
reference (``tests/test_kernels.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lstm_lab import cells as _cells
from lstm_lab.cells import CellSpec
from lstm_lab.kernels import Kernel

__all__ = ["masked_step", "scan", "KERNEL"]


def masked_step(spec: CellSpec, params: dict[str, jax.Array], carry, xp_t: jax.Array, m_t: jax.Array | None, *,
                rec: jax.Array | None = None, trace: bool = False, noise: dict | None = None):
    """:func:`lstm_lab.cells.step` where the rows with ``m_t`` ``[B]`` False keep their carry and output zeros
    (and zero traces); ``m_t`` None: every row steps. ``rec``, ``noise``: as for ``cells.step``."""
    out = _cells.step(spec, params, carry, xp_t, rec=rec, trace=trace, noise=noise)
    if m_t is None:
        return out
    m = m_t[:, None]
    new = jax.tree.map(lambda n, o: jnp.where(m, n, o), out[0], carry)
    zero = lambda v: jnp.where(m, v, jnp.zeros_like(v))  # noqa: E731
    if trace:
        return new, zero(out[1]), {k: zero(v) for k, v in out[2].items()}
    return new, zero(out[1])


def scan(spec: CellSpec, params: dict[str, jax.Array], xp: jax.Array, carry0, mask: jax.Array | None = None, *,
         unroll: int = 1, trace: bool = False, noise: dict | None = None):
    """Run one direction of one layer over time: ``(ys [T, B, H], final_carry, traces or None)``.

    Arguments as :class:`lstm_lab.kernels.Kernel`'s ``run``; ``unroll`` goes to ``jax.lax.scan``;
    ``trace``: also return the gate activations, each ``[T, B, H]``, zero where ``mask`` is False;
    ``noise``: training's masks of the in-step regularization (:func:`lstm_lab.recurrent.run_direction`).
    """
    noise = noise or {}
    per_step = {k: v for k, v in noise.items() if k in _cells.PER_STEP_NOISE}
    fixed = {k: v for k, v in noise.items() if k not in _cells.PER_STEP_NOISE}

    def body(carry, inp):
        xp_t, m_t, n_t = inp
        out = masked_step(spec, params, carry, xp_t, m_t, trace=trace, noise={**fixed, **n_t} or None)
        return out[0], (out[1], out[2] if trace else None)

    carry, (ys, trs) = jax.lax.scan(body, carry0, (xp, mask, per_step), unroll=unroll)
    return ys, carry, trs


def _run(spec, params, xp, carry0, mask=None, *, unroll: int = 1, noise: dict | None = None):
    ys, carry, _ = scan(spec, params, xp, carry0, mask, unroll=unroll, noise=noise)
    return ys, carry


def _trace(spec, params, xp, carry0, mask=None, *, unroll: int = 1, noise: dict | None = None):
    return scan(spec, params, xp, carry0, mask, unroll=unroll, trace=True, noise=noise)


# noise is not a kernel option (the layer passes it when training a regularized cell): options named here
KERNEL = Kernel("scan", _run, trace=_trace, options=("unroll",))
