"""The whole-H schedule: one program per ``block_b`` batch rows keeps the whole ``[G, H, H]`` recurrent
matrix (and FGR's ``R_gates``, the peepholes) for all T steps; no exchange between programs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lstm_lab.cells import CellSpec
from lstm_lab.kernels.pallas.plan import has_candidate
from lstm_lab.kernels.pallas.tiles import (DOT_T, Static, cand_out, carry_fields, direct_math, dot, param_names,
                                           reset_gate)

__all__ = ["forward", "backward"]


def _load_params(spec: CellSpec, refs) -> dict:
    """The parameters, loaded once per program as per-gate tiles (Triton cannot slice values)."""
    prm = dict(zip(param_names(spec), refs))
    out = {"R": tuple(prm["R"][j] for j in range(prm["R"].shape[0]))}
    if "R_gates" in prm:
        k = prm["R_gates"].shape[0]
        out["R_gates"] = tuple(tuple(prm["R_gates"][s, d] for d in range(k)) for s in range(k))
    if "peep" in prm:
        out["peep"] = tuple(prm["peep"][j] for j in range(prm["peep"].shape[0]))
    if "b_hn" in prm:
        out["b_hn"] = prm["b_hn"][...]
    return out



def _full_spec(shape):
    nd = len(shape)
    return pl.BlockSpec(tuple(shape), lambda b: (0,) * nd)


def _tile_spec(shape, bB, batch_axis):
    """A block of ``bB`` batch rows (axis ``batch_axis``), everything else whole."""
    block = tuple(bB if i == batch_axis else s for i, s in enumerate(shape))
    return pl.BlockSpec(block, lambda b: tuple(b if i == batch_axis else 0 for i in range(len(shape))))


def _part_spec(shape):
    """Per-program partial sums ``[programs, ...]``: program b writes row b."""
    return pl.BlockSpec((None, *shape[1:]), lambda b: (b,) + (0,) * (len(shape) - 1))


def _call(kernel, st: Static, ins, in_specs, out_shapes, out_specs, Bp):
    kw = {}
    if not st.interpret:
        from jax.experimental.pallas import triton as plgpu
        kw["compiler_params"] = plgpu.CompilerParams(num_warps=st.num_warps, num_stages=1)
    return pl.pallas_call(kernel, grid=(Bp // st.bB,), in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shapes, interpret=st.interpret, **kw)(*ins)



def _recurrent(st: Static, prm, h, gates):
    """Per gate k: the recurrent part of the pre-activation (LSTM: h @ R_k + FGR; RNN: h @ R; GRU, MGU:
    the gates before the candidate only)."""
    spec = st.spec
    names = spec.gate_names()
    R = prm["R"]
    if has_candidate(spec):
        return {k: dot(h, R[j], st.precision) for j, k in enumerate(names[:-1])}
    rec = {k: dot(h, R[j], st.precision) for j, k in enumerate(names)}
    if spec.full_gate_recurrence:
        Rg = prm["R_gates"]
        src = spec.recurrent_gate_names()
        for kd, dst in enumerate(src):
            for ks in range(len(src)):
                rec[dst] = rec[dst] + dot(gates[ks], Rg[ks][kd], st.precision)
    return rec



# ---------------------------------------------------------------------------
# Forward kernel
# ---------------------------------------------------------------------------
def _fwd_kernel(st: Static, save: bool, *refs):
    spec = st.spec
    fields = carry_fields(spec)
    pnames = param_names(spec)
    n_in = 2 + len(pnames) + len(fields)
    xp_ref, mask_ref = refs[0], refs[1]
    prm = _load_params(spec, refs[2:2 + len(pnames)])
    c0 = refs[2 + len(pnames):n_in]
    outs = refs[n_in:]
    seq = dict(zip(fields, outs[:len(fields)]))
    pre_ref = outs[len(fields)] if save else None
    G = len(spec.gate_names())
    k_rec = len(spec.recurrent_gate_names())

    def load0(name, ref):
        if name == "gates":
            return tuple(ref[:, s, :] for s in range(k_rec))
        return ref[...]

    init = tuple(load0(f, r) for f, r in zip(fields, c0))

    def body(t, carry):
        m = mask_ref[t][:, None] > 0
        h = carry[0]
        rec = _recurrent(st, prm, h, carry[2] if spec.full_gate_recurrence else None)
        if not has_candidate(spec):
            a = {k: xp_ref[t, :, j, :] + rec[k] for j, k in enumerate(spec.gate_names())}
            new = direct_math(st, prm, a, carry, m)
            pres = [a[k] for k in spec.gate_names()]
        else:
            ag = tuple(xp_ref[t, :, j, :] + rec[k] for j, k in enumerate(spec.gate_names()[:-1]))
            q = dot(h if spec.reset_after else reset_gate(spec, ag[0]) * h, prm["R"][G - 1], st.precision)
            new = cand_out(st, prm, ag, xp_ref[t, :, G - 1, :], q, h, m)
            pres = [*ag, q]
        for f, v in zip(fields, new):
            if f == "gates":
                for s in range(k_rec):
                    seq[f][t, :, s, :] = v[s]
            else:
                seq[f][t] = v
        if save:
            for j in range(G):
                pre_ref[t, :, j, :] = pres[j]
        return new

    jax.lax.fori_loop(0, st.T, body, init)


def forward(st: Static, save: bool, prm: tuple, xp4, carry0: tuple, mask):
    spec = st.spec
    T, Bp, G, Hp = xp4.shape
    fields = carry_fields(spec)
    ins = [xp4, mask, *prm, *carry0]
    in_specs = ([_tile_spec(xp4.shape, st.bB, 1), _tile_spec(mask.shape, st.bB, 1)]
                + [_full_spec(p.shape) for p in prm] + [_tile_spec(c.shape, st.bB, 0) for c in carry0])
    out_shapes = [jax.ShapeDtypeStruct((T, *c.shape), jnp.float32) for c in carry0]
    if save:
        out_shapes.append(jax.ShapeDtypeStruct((T, Bp, G, Hp), jnp.float32))
    out_specs = [_tile_spec(s.shape, st.bB, 1) for s in out_shapes]
    outs = _call(functools.partial(_fwd_kernel, st, save), st, ins, in_specs, out_shapes, out_specs, Bp)
    return tuple(outs[:len(fields)]), (outs[len(fields)] if save else None)


# ---------------------------------------------------------------------------
# Backward kernel
# ---------------------------------------------------------------------------
def _bwd_kernel(st: Static, *refs):
    spec = st.spec
    fields = carry_fields(spec)
    pnames = param_names(spec)
    names = spec.gate_names()
    G = len(names)
    k_rec = len(spec.recurrent_gate_names())
    it = iter(refs)
    pre_ref = next(it)
    xn_ref = next(it) if has_candidate(spec) else None  # GRU/MGU: x_n is not in pre (gates, q)
    mask_ref = next(it)
    prm = _load_params(spec, [next(it) for _ in pnames])
    c0 = [next(it) for _ in fields]
    seq = [next(it) for _ in fields]
    dseq = [next(it) for _ in fields]
    dxp_ref = next(it)
    dq_ref = next(it) if has_candidate(spec) else None
    dc0 = [next(it) for _ in fields]
    dpeep_ref = next(it) if spec.peepholes else None
    dbhn_ref = next(it) if spec.reset_after else None
    R = prm["R"]

    def load(f, ref, idx):
        if f == "gates":
            return tuple(ref[idx + (slice(None), s, slice(None))] for s in range(k_rec))
        return ref[idx]

    def prev_carry(t):
        tp = jnp.maximum(t - 1, 0)
        return tuple(jax.tree.map(lambda s, z: jnp.where(t > 0, s, z), load(f, sr, (tp,)), load(f, zr, ()))
                     for f, sr, zr in zip(fields, seq, c0))

    ew = {k: prm[k] for k in ("peep", "b_hn") if k in prm}

    def body(i, state):
        t = st.T - 1 - i
        dnext, dew = state
        m = mask_ref[t][:, None] > 0
        dcarry = tuple(jax.tree.map(jnp.add, d, load(f, dr, (t,))) for f, d, dr in zip(fields, dnext, dseq))
        prev = prev_carry(t)
        if not has_candidate(spec):
            a = {k: pre_ref[t, :, j, :] for j, k in enumerate(names)}
            _, vjp = jax.vjp(lambda a_, c_, e_: direct_math(st, {**prm, **e_}, a_, c_, m), a, prev, ew)
            da, dprev, de = vjp(dcarry)
            dxs = [da[k] for k in names]
            dh = dprev[0]
            for j in range(G):
                dh = dh + dot(dxs[j], R[j], st.precision, DOT_T)
            dprev = list(dprev)
            if spec.full_gate_recurrence:
                Rg = prm["R_gates"]
                dg = list(dprev[2])
                for ks in range(k_rec):
                    for kd, dst in enumerate(spec.recurrent_gate_names()):
                        dg[ks] = dg[ks] + dot(da[dst], Rg[ks][kd], st.precision, DOT_T)
                dprev[2] = tuple(dg)
            dprev[0] = dh
        else:
            h = prev[0]
            ag = tuple(pre_ref[t, :, j, :] for j in range(G - 1))
            q = pre_ref[t, :, G - 1, :]
            _, vjp = jax.vjp(lambda g_, xn, q_, h_, e_: cand_out(st, {**prm, **e_}, g_, xn, q_, h_, m),
                             ag, xn_ref[t], q, h, ew)
            dg, dx_n, dq, dh, de = vjp(dcarry)
            dg = list(dg)
            if spec.reset_after:
                dh = dh + dot(dq, R[G - 1], st.precision, DOT_T)
            else:  # q = (r * h) @ R_n: through s = r * h back to a_r and h
                ds = dot(dq, R[G - 1], st.precision, DOT_T)
                _, vjp_s = jax.vjp(lambda a0, h_: reset_gate(spec, a0) * h_, ag[0], h)
                da0_s, dh_s = vjp_s(ds)
                dg[0], dh = dg[0] + da0_s, dh + dh_s
            for j in range(G - 1):
                dh = dh + dot(dg[j], R[j], st.precision, DOT_T)
            dxs = [*dg, dx_n]
            dq_ref[t] = dq
            dprev = [dh]
        for j in range(G):
            dxp_ref[t, :, j, :] = dxs[j]
        return tuple(dprev), jax.tree.map(jnp.add, dew, de)

    d0 = tuple(jax.tree.map(jnp.zeros_like, load(f, zr, ())) for f, zr in zip(fields, c0))
    dcarry0, dew = jax.lax.fori_loop(0, st.T, body, (d0, jax.tree.map(jnp.zeros_like, ew)))
    for f, ref, v in zip(fields, dc0, dcarry0):
        if f == "gates":
            for s in range(k_rec):
                ref[:, s, :] = v[s]
        else:
            ref[...] = v
    if dpeep_ref is not None:
        for j in range(len(spec.peephole_names())):
            dpeep_ref[j, :] = dew["peep"][j]
    if dbhn_ref is not None:
        dbhn_ref[...] = dew["b_hn"]


def backward(st: Static, prm: tuple, res, dseq: tuple):
    spec = st.spec
    pre, mask, carry0, seq, xn = res
    T, Bp, G, Hp = pre.shape
    nprog = Bp // st.bB
    xs = [pre] if xn is None else [pre, xn]
    ins = [*xs, mask, *prm, *carry0, *seq, *dseq]
    in_specs = ([_tile_spec(x.shape, st.bB, 1) for x in xs] + [_tile_spec(mask.shape, st.bB, 1)]
                + [_full_spec(p.shape) for p in prm] + [_tile_spec(c.shape, st.bB, 0) for c in carry0]
                + [_tile_spec(s.shape, st.bB, 1) for s in (*seq, *dseq)])
    out_shapes = [jax.ShapeDtypeStruct((T, Bp, G, Hp), jnp.float32)]
    if has_candidate(spec):
        out_shapes.append(jax.ShapeDtypeStruct((T, Bp, Hp), jnp.float32))
    out_specs = [_tile_spec(s.shape, st.bB, 1) for s in out_shapes]
    out_shapes += [jax.ShapeDtypeStruct(c.shape, jnp.float32) for c in carry0]
    out_specs += [_tile_spec(c.shape, st.bB, 0) for c in carry0]
    if spec.peepholes:
        out_shapes.append(jax.ShapeDtypeStruct((nprog, len(spec.peephole_names()), Hp), jnp.float32))
        out_specs.append(_part_spec(out_shapes[-1].shape))
    if spec.reset_after:
        out_shapes.append(jax.ShapeDtypeStruct((nprog, Hp), jnp.float32))
        out_specs.append(_part_spec(out_shapes[-1].shape))
    return _call(functools.partial(_bwd_kernel, st), st, ins, in_specs, out_shapes, out_specs, Bp)

