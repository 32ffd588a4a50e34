"""The kernel's custom VJP over the padded layout, and :func:`fused_recurrence`, the differentiable entry
point: pad, launch the forward (and in the backward pass the backward) schedule, slice back; the recurrent
weight gradients are single matmuls over all steps after the backward launch."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lstm_lab.cells import CellSpec
from lstm_lab.kernels.pallas import plan, split, whole
from lstm_lab.kernels.pallas.plan import has_candidate, is_cho, launch_plan, pow2, unsupported_dtype
from lstm_lab.kernels.pallas.tiles import Static, carry_fields, reset_gate

__all__ = ["fused_recurrence"]


# ---------------------------------------------------------------------------
# custom VJP over the padded layout
# ---------------------------------------------------------------------------
def _schedule(st: Static):
    """The module that runs a launch: :mod:`.split` when the hidden size is split across programs."""
    return split if st.nh > 1 else whole


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(st, prm, xp4, carry0, mask):
    return _schedule(st).forward(st, False, prm, xp4, carry0, mask)[0]


def _core_fwd(st, prm, xp4, carry0, mask):
    seq, pre = _schedule(st).forward(st, True, prm, xp4, carry0, mask)
    xn = xp4[:, :, -1, :] if has_candidate(st.spec) else None
    return seq, (prm, pre, mask, carry0, seq, xn)


def _core_bwd(st, res, dseq):
    spec = st.spec
    prm, pre, mask, carry0, seq, xn = res
    outs = list(_schedule(st).backward(st, prm, (pre, mask, carry0, seq, xn), tuple(dseq)))
    dxp = outs.pop(0)
    dq = outs.pop(0) if has_candidate(spec) else None
    nf = len(carry_fields(spec))
    dcarry0 = tuple(o.astype(c.dtype) for o, c in zip(outs[:nf], carry0))
    outs = outs[nf:]
    T, Bp, G, Hp = pre.shape
    # h_prev for every step: the initial carry, then the carries of steps 0..T-2
    hprev = jnp.concatenate([carry0[0][None].astype(jnp.float32), seq[0][:-1]], 0).reshape(T * Bp, Hp)
    R = prm[0]
    d_rec = dxp.reshape(T * Bp, G, Hp)
    if has_candidate(spec):  # the candidate's weights get q's gradient (its x_n part is not in R)
        d_rec = d_rec.at[:, G - 1, :].set(dq.reshape(T * Bp, Hp))
    lhs = {j: hprev for j in range(G)}
    if is_cho(spec):  # ... and multiply r * h_prev (the MGU: f * h_prev)
        lhs[G - 1] = reset_gate(spec, pre[:, :, 0, :].reshape(T * Bp, Hp)) * hprev
    dR = jnp.stack([jnp.matmul(lhs[j].astype(R.dtype).T, d_rec[:, j, :].astype(R.dtype),
                               preferred_element_type=jnp.float32) for j in range(G)]).astype(R.dtype)
    dprm = [dR]
    if spec.full_gate_recurrence:
        Rg = prm[1]
        k = Rg.shape[0]
        gprev = jnp.concatenate([carry0[2][None].astype(jnp.float32), seq[2][:-1]], 0).reshape(T * Bp, k, Hp)
        rec_idx = [spec.gate_names().index(g) for g in spec.recurrent_gate_names()]
        dprm.append(jnp.einsum("nsh,ndj->sdhj", gprev.astype(Rg.dtype), d_rec[:, rec_idx, :].astype(Rg.dtype),
                               preferred_element_type=jnp.float32).astype(Rg.dtype))
    if spec.peepholes:
        dprm.append(outs.pop(0).sum(0).astype(prm[len(dprm)].dtype))
    if spec.reset_after:
        dprm.append(outs.pop(0).sum(0).astype(prm[len(dprm)].dtype))
    return tuple(dprm), dxp.astype(pre.dtype), dcarry0, None


_core.defvjp(_core_fwd, _core_bwd)


# ---------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------
def fused_recurrence(spec: CellSpec, params: dict[str, jax.Array], xp: jax.Array, carry0, mask: jax.Array, *,
                     block_b: int = 16, block_h: int | None = None, block_k: int = 64,
                     stream_weights: bool | None = None, num_warps: int | None = None,
                     interpret: bool | None = None, precision=None):
    """Run one layer direction forward in time in one kernel launch (differentiable).

    Args:
      spec: any cell (LSTM family, GRU, MGU, tanh RNN).
      params: the cell's parameters (``W`` unused: its product is in ``xp``).
      xp: ``[T, B, G*H]`` projected inputs ``x @ W + b`` (float32).
      carry0: the initial carry (fields ``[B, size]``).
      mask: ``[T, B]`` bool, step ``t`` of row ``b`` is valid (past it the carry is frozen).
      block_b: batch rows per program (a power of two, at least 16); raised when a split hidden
        size would otherwise make more programs than the GPU holds at once.
      block_h: hidden columns per program (a power of two, at least 16): below the padded hidden size, the hidden size is split across programs that meet at a barrier every
        step. None: the whole hidden size in one program when its weights fit in
        :data:`~lstm_lab.kernels.pallas.plan.SMEM_BUDGET`, else the widest column block whose weights fit.
      block_k: with a split hidden size, the contraction chunk of the recurrent matmuls.
      stream_weights: with a split hidden size, load the weights at each use (through L2) instead of
        once per launch; None: when they do not fit in :data:`~lstm_lab.kernels.pallas.plan.SMEM_BUDGET`.
      num_warps: Triton warps per program (default 8: compiled for sm_90, 4 warps spill registers at
        H=128 and in the split kernel, 8 do not or less; benchmarks/NOTES.md).
      interpret: run in Pallas interpret mode (default: unless the backend is GPU).
      precision: of the kernel's matmuls (``jax.lax.Precision``; None: the backend's default,
        which on GPU lets float32 use TF32).

    Returns:
      ``(ys [T, B, H], final_carry)``; ``ys`` is zero where ``mask`` is False.
    """
    why = unsupported_dtype(dtype=params["R"].dtype)
    if why:
        raise ValueError(why + ".")
    for name, v in (("block_b", block_b), ("block_h", block_h), ("block_k", block_k)):
        if v is not None and (not isinstance(v, int) or v < 16 or v & (v - 1)):
            raise ValueError(f"fused_recurrence: {name} must be a power of two >= 16; got {v!r}.")
    T, B, GH = xp.shape
    names = spec.gate_names()
    G = len(names)
    H = GH // G
    Hp = pow2(H)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    sms = (None if interpret else getattr(jax.devices()[0], "core_count", None)) or plan.SM_COUNT
    layout = launch_plan(spec, H, B, jnp.dtype(params["R"].dtype).itemsize, block_b, block_h, sms, stream_weights)
    if isinstance(layout, str):
        raise ValueError(layout + ".")
    bB, bH, stream = layout
    Bp = -(-B // bB) * bB
    num_warps = 8 if num_warps is None else num_warps  # fewer registers and spills than 4 at every anchor
    st = Static((spec, T, bB, Hp, bool(interpret), int(num_warps), precision, bH, min(block_k, Hp), stream))
    acc = jnp.float32
    dH, dB = Hp - H, Bp - B

    xp4 = jnp.pad(xp.astype(acc).reshape(T, B, G, H), ((0, 0), (0, dB), (0, 0), (0, dH)))
    m = jnp.pad(mask.astype(jnp.int32), ((0, 0), (0, dB)))
    R = params["R"]
    prm = [jnp.pad(R.reshape(H, G, H).transpose(1, 0, 2), ((0, 0), (0, dH), (0, dH)))]
    k = len(spec.recurrent_gate_names())
    if spec.full_gate_recurrence:
        Rg = params["R_gates"].reshape(k, H, k, H).transpose(0, 2, 1, 3)
        prm.append(jnp.pad(Rg, ((0, 0), (0, 0), (0, dH), (0, dH))))
    if spec.peepholes:
        prm.append(jnp.pad(jnp.stack([params[p] for p in spec.peephole_names()]).astype(acc), ((0, 0), (0, dH))))
    if spec.reset_after:
        prm.append(jnp.pad(params["b_hn"].astype(acc), ((0, dH),)))
    c0 = [jnp.pad(carry0.h.astype(acc), ((0, dB), (0, dH)))]
    if spec.family == "lstm":
        c0.append(jnp.pad(carry0.c.astype(acc), ((0, dB), (0, dH))))
    if spec.full_gate_recurrence:
        c0.append(jnp.pad(carry0.gates.astype(acc).reshape(B, k, H), ((0, dB), (0, 0), (0, dH))))
    seq = _core(st, tuple(prm), xp4, tuple(c0), m)

    out_dtype = carry0.h.dtype
    ys = jnp.where(mask[:, :, None], seq[0][:, :B, :H], 0).astype(out_dtype)
    last = [s[-1, :B] for s in seq]
    fields = {"h": last[0][:, :H]}
    if spec.family == "lstm":
        fields["c"] = last[1][:, :H]
    if spec.full_gate_recurrence:
        fields["gates"] = last[2][:, :, :H].reshape(B, k * H)
    cf = type(carry0)(**{f: v.astype(getattr(carry0, f).dtype) for f, v in fields.items()})
    return ys, cf
