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
from lstm_lab.kernels import Kernel
from lstm_lab.kernels.scan import masked_step

__all__ = ["scan_vjp", "KERNEL"]


def _unsupported(spec: CellSpec, hidden_size: int, **_) -> str | None:
    if spec.family != "lstm":
        return f"impl='scan_vjp' supports the LSTM family; {spec.name!r} is a {spec.family}"
    return None


def scan_vjp(spec: CellSpec, params: dict[str, jax.Array], xp: jax.Array, carry0, mask: jax.Array | None = None, *,
             unroll: int = 1, remat: bool = False, noise: dict | None = None):
    """Run one direction of one layer over time (arguments as :class:`lstm_lab.kernels.Kernel`'s ``run``):
    ``(ys [T, B, H], final_carry)``. ``unroll`` goes to ``jax.lax.scan`` (forward and backward); ``noise``:
    training's masks of the cell's in-step regularization (:func:`lstm_lab.recurrent.run_direction`)."""
    why = _unsupported(spec, 0)
    if why:
        raise ValueError(f"{why} (use impl='scan').")
    if mask is None:
        mask = jnp.ones(xp.shape[:2], bool)
    mats = {k: params[k] for k in ("R", "R_gates") if k in params}
    ew = {k: params[k] for k in spec.peephole_names()}
    if any(getattr(spec, k) for k in _cells.IN_STEP_REGULARIZERS):
        ew.update({k: params[k] for k in ("ln_h_g", "ln_c_g", "ln_c_b") if k in params})
        noise = noise or {}
        steps = {k: v for k, v in noise.items() if k in _cells.PER_STEP_NOISE}
        fixed = {k: v for k, v in noise.items() if k not in _cells.PER_STEP_NOISE}
        return _reg_vjp_core((spec, int(unroll), bool(remat)), mats, ew, xp, carry0, mask, fixed, steps)
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


# ---------------------------------------------------------------------------------------------------------
# With the in-step regularization (layer_norm, recurrent/variational dropout, zoneout): the recurrent product
# r = (h_prev * h_mask) @ R no longer enters the pre-activations additively (layer_norm normalizes it), so the
# residuals are r itself (or, with remat, nothing: recomputed) beside xp, and a backward step takes the vjp of
# the step in (carry, xp_t, r_t, elementwise parameters); then dh += (dr @ R^T) * h_mask, and after the loop
# dR = (h_prev * h_mask)^T @ dr and dR_gates = gates_prev^T @ dxp[gates] as above. The masks are constants.
# ---------------------------------------------------------------------------------------------------------
def _h_in(h, fixed):
    return h * fixed["h_mask"] if "h_mask" in fixed else h


def _reg_vjp_forward(spec, unroll, remat, mats, ew, xp, carry0, mask, fixed, steps):
    params = {**mats, **ew}
    R = mats["R"]

    def body(carry, inp):
        xp_t, m_t, n_t = inp
        rec = jnp.matmul(_h_in(carry.h, fixed).astype(R.dtype), R, preferred_element_type=xp_t.dtype)
        new, y = masked_step(spec, params, carry, xp_t, m_t, rec=rec, noise={**fixed, **n_t} or None)
        return new, (y, carry, None if remat else rec)

    cf, (ys, prev, recs) = jax.lax.scan(body, carry0, (xp, mask, steps), unroll=unroll)
    return ys, cf, prev, recs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _reg_vjp_core(static, mats, ew, xp, carry0, mask, fixed, steps):
    ys, cf, _, _ = _reg_vjp_forward(*static, mats, ew, xp, carry0, mask, fixed, steps)
    return ys, cf


def _reg_vjp_fwd(static, mats, ew, xp, carry0, mask, fixed, steps):
    ys, cf, prev, recs = _reg_vjp_forward(*static, mats, ew, xp, carry0, mask, fixed, steps)
    return (ys, cf), (mats, ew, xp, recs, mask, prev, fixed, steps)


def _reg_vjp_bwd(static, res, cts):
    spec, unroll, remat = static
    mats, ew, xp, recs, mask, prev, fixed, steps = res
    dys, dcf = cts
    R = mats["R"]

    def body(acc, inp):
        dcarry, dew = acc
        carry_prev, xp_t, r_t, m_t, n_t, dy_t = inp
        if remat:
            r_t = jnp.matmul(_h_in(carry_prev.h, fixed).astype(R.dtype), R, preferred_element_type=xp_t.dtype)
        noise_t = {**fixed, **n_t} or None
        _, vjp = jax.vjp(lambda c, x, r, e: masked_step(spec, {**mats, **e}, c, x, m_t, rec=r, noise=noise_t),
                         carry_prev, xp_t, r_t, ew)
        dc_prev, dx_t, dr_t, de = vjp((dcarry, dy_t))
        dh = dc_prev.h + _h_in(jnp.matmul(dr_t.astype(R.dtype), R.T, preferred_element_type=dr_t.dtype), fixed)
        return (dc_prev._replace(h=dh.astype(dc_prev.h.dtype)), jax.tree.map(jnp.add, dew, de)), (dx_t, dr_t)

    (dc0, dew), (dxp, drec) = jax.lax.scan(
        body, (dcf, jax.tree.map(jnp.zeros_like, ew)),
        (prev, xp, xp if remat else recs, mask, steps, dys), reverse=True, unroll=unroll)
    T, B, nH = dxp.shape
    acc = dxp.dtype
    h_in = _h_in(prev.h, fixed).reshape(T * B, -1)
    dmats = {"R": jnp.matmul(h_in.astype(R.dtype).T, drec.reshape(T * B, nH).astype(R.dtype),
                             preferred_element_type=acc).astype(R.dtype)}
    if "R_gates" in mats:
        parts = _cells._split(dxp.reshape(T * B, nH), spec.gate_names())
        d_extra = jnp.concatenate([parts[g] for g in spec.recurrent_gate_names()], axis=-1)
        Rg = mats["R_gates"]
        dmats["R_gates"] = jnp.matmul(prev.gates.reshape(T * B, -1).astype(Rg.dtype).T, d_extra.astype(Rg.dtype),
                                      preferred_element_type=acc).astype(Rg.dtype)
    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)  # noqa: E731  (the masks are constants)
    return dmats, dew, dxp.astype(xp.dtype), dc0, None, zeros(fixed), zeros(steps)


_reg_vjp_core.defvjp(_reg_vjp_fwd, _reg_vjp_bwd)


# noise is not a kernel option (the layer passes it when training a regularized cell): options named here
KERNEL = Kernel("scan_vjp", scan_vjp, unsupported=_unsupported, forward_mode=False, options=("unroll", "remat"))
