"""``impl="scan_vjp"``: the plain scan's forward with a custom VJP, for the LSTM family.

The backward pass runs the recurrence in reverse for the state gradients only — each step's math is
recomputed from the saved previous carry (``jax.vjp`` of :func:`lstm_lab.cells.step` with ``R`` held
constant) — and computes the recurrent weight gradients afterwards as single matmuls over all time steps,
as cuDNN does: ``dR = h_prev^T @ d_pre`` (the pre-activation gradient equals the gradient of ``xp``, since
``xp`` enters the pre-activations additively) and, for FGR, ``dR_gates = gates_prev^T @ d_pre[gates]``.
Peephole gradients are summed in the reverse loop. Residuals: the previous carries and the
pre-activations ``xp + h_prev @ R``, so a backward step is elementwise math plus one matmul
(``d_pre @ R^T``); ``remat=True`` saves ``xp`` instead and recomputes ``h_prev @ R`` in the backward (the
same memory as the inputs; one more matmul per step). A custom VJP has no forward mode (``jax.jvp``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lstm_lab import cells as _cells
from lstm_lab.cells import CellSpec
from lstm_lab.kernels import Kernel, in_step_unsupported
from lstm_lab.kernels.scan import masked_step

__all__ = ["scan_vjp", "KERNEL"]


def _unsupported(spec: CellSpec, hidden_size: int, **_) -> str | None:
    if spec.family != "lstm":
        return f"impl='scan_vjp' supports the LSTM family; {spec.name!r} is a {spec.family}"
    return in_step_unsupported("scan_vjp", spec)


def scan_vjp(spec: CellSpec, params: dict[str, jax.Array], xp: jax.Array, carry0, mask: jax.Array | None = None, *,
             unroll: int = 1, remat: bool = False):
    """Run one direction of one layer over time (arguments as :class:`lstm_lab.kernels.Kernel`'s ``run``):
    ``(ys [T, B, H], final_carry)``. ``unroll`` goes to ``jax.lax.scan`` (forward and backward)."""
    why = _unsupported(spec, 0)
    if why:
        raise ValueError(f"{why} (use impl='scan').")
    if mask is None:
        mask = jnp.ones(xp.shape[:2], bool)
    mats = {k: params[k] for k in ("R", "R_gates") if k in params}
    ew = {k: params[k] for k in spec.peephole_names()}
    return _lstm_vjp_core((spec, int(unroll), bool(remat)), mats, ew, xp, carry0, mask)


def _lstm_vjp_forward(spec, unroll, remat, mats, ew, xp, carry0, mask):
    params = {**mats, **ew}
    R = mats["R"]

    def body(carry, inp):
        xp_t, m_t = inp
        rec = jnp.matmul(carry.h.astype(R.dtype), R, preferred_element_type=xp_t.dtype)
        new, y = masked_step(spec, params, carry, xp_t, m_t, rec=rec)
        return new, (y, carry, None if remat else xp_t + rec)

    cf, (ys, prev, pre) = jax.lax.scan(body, carry0, (xp, mask), unroll=unroll)
    return ys, cf, prev, pre


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lstm_vjp_core(static, mats, ew, xp, carry0, mask):
    ys, cf, _, _ = _lstm_vjp_forward(*static, mats, ew, xp, carry0, mask)
    return ys, cf


def _lstm_vjp_fwd(static, mats, ew, xp, carry0, mask):
    ys, cf, prev, pre = _lstm_vjp_forward(*static, mats, ew, xp, carry0, mask)
    return (ys, cf), (mats, ew, xp if pre is None else pre, mask, prev)


def _lstm_vjp_bwd(static, res, cts):
    spec, unroll, remat = static
    mats, ew, a_or_xp, mask, prev = res
    dys, dcf = cts
    R = mats["R"]

    def body(acc, inp):
        dcarry, dew = acc
        carry_prev, a_t, m_t, dy_t = inp
        if remat:  # a_t is xp_t: recompute the recurrent product
            a_t = a_t + jnp.matmul(carry_prev.h.astype(R.dtype), R, preferred_element_type=a_t.dtype)
        zero = jnp.zeros_like(a_t)
        _, vjp = jax.vjp(lambda c, a, e: masked_step(spec, {**mats, **e}, c, a, m_t, rec=zero), carry_prev, a_t, ew)
        dc_prev, da_t, de = vjp((dcarry, dy_t))
        dh = dc_prev.h + jnp.matmul(da_t.astype(R.dtype), R.T, preferred_element_type=da_t.dtype)
        return (dc_prev._replace(h=dh.astype(dc_prev.h.dtype)), jax.tree.map(jnp.add, dew, de)), da_t

    (dc0, dew), dxp = jax.lax.scan(body, (dcf, jax.tree.map(jnp.zeros_like, ew)), (prev, a_or_xp, mask, dys),
                                   reverse=True, unroll=unroll)
    T, B, nH = dxp.shape
    acc = dxp.dtype
    flat = dxp.reshape(T * B, nH)
    dmats = {"R": jnp.matmul(prev.h.reshape(T * B, -1).astype(R.dtype).T, flat.astype(R.dtype),
                             preferred_element_type=acc).astype(R.dtype)}
    if "R_gates" in mats:
        parts = _cells._split(flat, spec.gate_names())
        d_extra = jnp.concatenate([parts[g] for g in spec.recurrent_gate_names()], axis=-1)
        Rg = mats["R_gates"]
        dmats["R_gates"] = jnp.matmul(prev.gates.reshape(T * B, -1).astype(Rg.dtype).T, d_extra.astype(Rg.dtype),
                                      preferred_element_type=acc).astype(Rg.dtype)
    return dmats, dew, dxp.astype(a_or_xp.dtype), dc0, None


_lstm_vjp_core.defvjp(_lstm_vjp_fwd, _lstm_vjp_bwd)


KERNEL = Kernel("scan_vjp", scan_vjp, unsupported=_unsupported, forward_mode=False)
