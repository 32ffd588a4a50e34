"""The split schedule (large H): the hidden size split across programs.

The grid is (batch tiles, Hp // bH): program (b, j) owns rows b*bB.. and hidden columns J = j*bH.. of every gate,
and keeps only its columns of R (forward: R_k[:, J]; backward: R_k[J, :]), so the weights are spread over
the programs (cuDNN's persistent kernels do the same). Per step the programs of a batch tile exchange what
the matmul needs through global memory — forward h_t (and FGR's gates_t), backward d_pre_t — and meet at a
barrier (an atomic counter per batch tile and a spin loop; the programs must all be resident at once: at
most one per SM). Cho's GRU meets twice per step: forward after publishing r_t * h_{t-1} (its candidate's
product needs all of it), backward after publishing dq_t (ds = dq @ R_n^T needs all of it, then r's gradient
joins d_pre). In interpret mode programs run one after another, so there the kernel runs every column block
of a phase in turn inside one program instead of the barrier: the same code computes each block, only the
schedule differs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lstm_lab.kernels.pallas.plan import barriers_per_step, has_candidate, is_cho
from lstm_lab.kernels.pallas.tiles import (DOT_T, Static, cand_out, carry_fields, direct_math, dot, param_names,
                                           reset_gate)

__all__ = ["forward", "backward"]


def _columns(st: Static, j):
    return pl.ds(j * st.bH, st.bH)


def _chunks(st: Static):
    return [pl.ds(c * st.bK, st.bK) for c in range(st.Hp // st.bK)]


def _program(st: Static):
    """This program's batch tile, its rows, the column blocks it computes (interpret mode: every one, in turn) and
    the contraction chunks."""
    b = pl.program_id(0)
    return b, pl.ds(b * st.bB, st.bB), (range(st.nh) if st.interpret else [pl.program_id(1)]), _chunks(st)


def _shared_load(st: Static, ref, idx):
    """Load what other programs wrote during this launch: volatile on a GPU (L1 is not coherent across SMs;
    a ".cg" cache modifier would do, but jax 0.10's Triton lowering cannot look it up)."""
    if st.interpret:
        return ref[idx]
    from jax.experimental.pallas import triton as plgpu
    return plgpu.load(ref.at[idx], volatile=True)


def _sync(st: Static, count_ref, b, target):
    """The step barrier on a GPU; nothing in interpret mode (there one program runs every block of a
    phase before the next phase)."""
    if not st.interpret:
        _barrier(st, count_ref, b, target)


def _barrier(st: Static, count_ref, b, target):
    """Wait until ``count_ref[b]`` reaches ``target`` after adding this program's 1 (GPU only).

    A CTA barrier first, so that every thread's stores of this step precede the (acquire-release,
    GPU-scope) atomic that publishes them; another after the spin, so that no thread reads the other
    programs' data before the counter said it is there."""
    from jax.experimental.pallas import triton as plgpu
    plgpu.debug_barrier()
    plgpu.atomic_add(count_ref, (b,), jnp.int32(1))
    jax.lax.while_loop(lambda v: v < target, lambda v: plgpu.atomic_add(count_ref, (b,), jnp.int32(0)),
                       jnp.int32(0))
    plgpu.debug_barrier()


class _Weights:
    """A program's column block of a weight tensor, by contraction chunk: loaded once before the time
    loop (resident) or at each use inside it (streamed through L2, when resident would not fit)."""

    def __init__(self, st: Static, ref, index):
        self.ref, self.index, self.chunks = ref, index, _chunks(st)  # index(chunk) -> the tile's ref index
        self.tiles = None if st.stream else [ref[index(ch)] for ch in self.chunks]

    def __call__(self, c):
        return self.ref[self.index(self.chunks[c])] if self.tiles is None else self.tiles[c]


def _split_fwd_kernel(st: Static, save: bool, *refs):
    spec = st.spec
    fields = carry_fields(spec)
    names = spec.gate_names()
    G = len(names)
    rec_names = spec.recurrent_gate_names()
    k_rec = len(rec_names)
    it = iter(refs)
    xp_ref, mask_ref = next(it), next(it)
    prm_refs = dict(zip(param_names(spec), [next(it) for _ in param_names(spec)]))
    c0 = [next(it) for _ in fields]
    _count_in = next(it)
    seq = [next(it) for _ in fields]
    pre_ref = next(it) if save else None
    s_ref = next(it) if is_cho(spec) else None  # Cho's GRU: r * h of this step, [Bp, Hp]
    count_ref = next(it)
    b, rows, blocks, chunks = _program(st)
    bars = barriers_per_step(spec)

    def own(j):  # the weights (R_k[:, J], R_gates[s, d][:, J]) and the initial carry of column block j
        cols = _columns(st, j)
        R = [_Weights(st, prm_refs["R"], lambda ch, k=k: (k, ch, cols)) for k in range(G)]
        Rg = ([[_Weights(st, prm_refs["R_gates"], lambda ch, s_=s_, d=d: (s_, d, ch, cols)) for d in range(k_rec)]
               for s_ in range(k_rec)] if spec.full_gate_recurrence else None)
        peep = tuple(prm_refs["peep"][p_, cols] for p_ in range(len(spec.peephole_names()))) if spec.peepholes else ()
        if has_candidate(spec):  # GRU with reset_after: the "peephole" slot carries b_hn
            return (R, None, prm_refs["b_hn"][cols] if spec.reset_after else None), (c0[0][rows, cols],)
        init = [c0[f][rows, cols] for f in range(min(len(fields), 2))]  # h (and c)
        if spec.full_gate_recurrence:
            init.append(tuple(c0[2][rows, s_, cols] for s_ in range(k_rec)))
        return (R, Rg, peep), tuple(init)

    owned = [own(j) for j in blocks]

    def prev_chunk(t, f_ref, z_ref, ch, s_=None):
        tp = jnp.maximum(t - 1, 0)
        idx = (rows, ch) if s_ is None else (rows, s_, ch)
        return jnp.where(t > 0, _shared_load(st, f_ref, (tp, *idx)), z_ref[idx])

    def body(t, carries):
        m = mask_ref[t, rows][:, None] > 0
        pres = []
        for j, ((R, Rg, peep), _), carry in zip(blocks, owned, carries):
            cols = _columns(st, j)
            a = [xp_ref[t, rows, k, cols] for k in range(G)]
            x_n = None
            if has_candidate(spec):  # the last product is q = h @ R_n (or (r*h) @ R_n), without x_n
                x_n, a[-1] = a[-1], jnp.zeros_like(a[-1])
            for c, ch in enumerate(chunks):  # one chunk of h (and of FGR's gates) live at a time
                h_c = prev_chunk(t, seq[0], c0[0], ch)
                for k in range(G - 1 if is_cho(spec) else G):
                    a[k] = a[k] + dot(h_c, R[k](c), st.precision)
                if spec.full_gate_recurrence:
                    for s_ in range(k_rec):
                        g_c = prev_chunk(t, seq[2], c0[2], ch, s_)
                        for d, dst in enumerate(rec_names):
                            kd = names.index(dst)
                            a[kd] = a[kd] + dot(g_c, Rg[s_][d](c), st.precision)
            if is_cho(spec):  # publish this block's r * h: every block's q needs all of it
                s_ref[rows, cols] = reset_gate(spec, a[0]) * carry[0]
            pres.append((a, x_n))
        if is_cho(spec):
            _sync(st, count_ref, b, (bars * t + 1) * st.nh)
            for ((R, _, _), _), (a, _) in zip(owned, pres):
                for c, ch in enumerate(chunks):
                    a[-1] = a[-1] + dot(_shared_load(st, s_ref, (rows, ch)), R[-1](c), st.precision)
        new_carries = []
        for j, ((R, Rg, peep), _), carry, (a, x_n) in zip(blocks, owned, carries, pres):
            cols = _columns(st, j)
            if has_candidate(spec):
                new = cand_out(st, {"b_hn": peep}, tuple(a[:-1]), x_n, a[-1], carry[0], m)
                seq[0][t, rows, cols] = new[0]
                if save:
                    for k in range(G):
                        pre_ref[t, rows, k, cols] = a[k]
                new_carries.append(new)
                continue
            a = dict(zip(names, a))
            new = direct_math(st, {"peep": peep}, a, carry, m)
            for f in range(min(len(fields), 2)):  # h (and c)
                seq[f][t, rows, cols] = new[f]
            if spec.full_gate_recurrence:
                for s_ in range(k_rec):
                    seq[2][t, rows, s_, cols] = new[2][s_]
            if save:
                for k, name in enumerate(names):
                    pre_ref[t, rows, k, cols] = a[name]
            new_carries.append(new)
        _sync(st, count_ref, b, bars * (t + 1) * st.nh)
        return tuple(new_carries)

    jax.lax.fori_loop(0, st.T, body, tuple(o[1] for o in owned))


def _split_bwd_kernel(st: Static, *refs):
    spec = st.spec
    fields = carry_fields(spec)
    names = spec.gate_names()
    G = len(names)
    rec_names = spec.recurrent_gate_names()
    rec_idx = [names.index(g) for g in rec_names]
    k_rec = len(rec_names)
    P = len(spec.peephole_names())
    cand = has_candidate(spec)
    lstm = spec.family == "lstm"
    it = iter(refs)
    pre_ref = next(it)
    xn_ref = next(it) if cand else None
    mask_ref = next(it)
    prm_refs = dict(zip(param_names(spec), [next(it) for _ in param_names(spec)]))
    c0 = [next(it) for _ in fields]
    seq = [next(it) for _ in fields]
    dseq = [next(it) for _ in fields]
    _count_in = next(it)
    dxp_ref = next(it)
    dq_ref = next(it) if cand else None
    dc0 = [next(it) for _ in fields]
    dpeep_ref = next(it) if spec.peepholes or spec.reset_after else None  # GRU: b_hn's partial sums
    count_ref = next(it)
    b, rows, blocks, chunks = _program(st)
    cho = is_cho(spec)
    bars = barriers_per_step(spec)

    def own(j):  # R_k[J, :] and R_gates[s, d][J, :] by chunks, peepholes of J
        cols = _columns(st, j)
        RT = [_Weights(st, prm_refs["R"], lambda ch, k=k: (k, cols, ch)) for k in range(G)]
        RgT = ([[_Weights(st, prm_refs["R_gates"], lambda ch, s_=s_, d=d: (s_, d, cols, ch)) for d in range(k_rec)]
                for s_ in range(k_rec)] if spec.full_gate_recurrence else None)
        if cand:
            peep = (prm_refs["b_hn"][cols],) if spec.reset_after else ()
        else:
            peep = tuple(prm_refs["peep"][p_, cols] for p_ in range(P))
        return RT, RgT, peep

    owned = [own(j) for j in blocks]

    def load_carry(refs_, idx, cols):
        if not lstm:
            return (refs_[0][idx + (rows, cols)],)
        out = [refs_[0][idx + (rows, cols)], refs_[1][idx + (rows, cols)]]
        if spec.full_gate_recurrence:
            out.append(tuple(refs_[2][idx + (rows, s_, cols)] for s_ in range(k_rec)))
        return tuple(out)

    def body(i, state):
        t = st.T - 1 - i
        m = mask_ref[t, rows][:, None] > 0
        tp = jnp.maximum(t - 1, 0)
        directs, new_state = [], []
        for j, (_, _, peep), (dnext, dpeep) in zip(blocks, owned, state):
            cols = _columns(st, j)
            dcarry = jax.tree.map(jnp.add, dnext, load_carry(dseq, (t,), cols))
            prev = jax.tree.map(lambda s_, z: jnp.where(t > 0, s_, z), load_carry(seq, (tp,), cols),
                                load_carry(c0, (), cols))
            if cand:
                ag = tuple(pre_ref[t, rows, k, cols] for k in range(G - 1))
                q = pre_ref[t, rows, G - 1, cols]
                _, vjp = jax.vjp(lambda g_, xn, q_, h_, e_: cand_out(st, {"b_hn": e_[0] if e_ else None},
                                                                    g_, xn, q_, h_, m),
                                 ag, xn_ref[t, rows, cols], q, prev[0], peep)
                dg, dx_n, dq, dh, de = vjp(dcarry)
                for k, v in enumerate((*dg, dx_n)):
                    if not (cho and k == 0):  # Cho/MGU: r's (f's) gradient comes through s = r * h below
                        dxp_ref[t, rows, k, cols] = v
                dq_ref[t, rows, cols] = dq
                directs.append((dh,) if not cho else (dh, dg[0], ag[0], prev[0]))
                new_state.append(jax.tree.map(jnp.add, dpeep, de))
                continue
            a = {name: pre_ref[t, rows, k, cols] for k, name in enumerate(names)}
            _, vjp = jax.vjp(lambda a_, c_, e_: direct_math(st, {"peep": e_}, a_, c_, m), a, prev, peep)
            da, dprev, de = vjp(dcarry)
            for k, name in enumerate(names):
                dxp_ref[t, rows, k, cols] = da[name]
            directs.append(dprev)
            new_state.append(jax.tree.map(jnp.add, dpeep, de))
        if cho:  # q = s @ R_n with s = r * h: ds needs every block's dq, then r's gradient is published
            _sync(st, count_ref, b, (bars * i + 1) * st.nh)
            for n_, (j, (RT, _, _)) in enumerate(zip(blocks, owned)):
                dh, da_r, a_r, h = directs[n_]
                ds = sum(dot(_shared_load(st, dq_ref, (t, rows, ch)), RT[-1](c), st.precision, DOT_T)
                         for c, ch in enumerate(chunks))
                _, vjp_s = jax.vjp(lambda ar, h_: reset_gate(spec, ar) * h_, a_r, h)
                dar_s, dh_s = vjp_s(ds)
                dxp_ref[t, rows, 0, _columns(st, j)] = da_r + dar_s
                directs[n_] = (dh + dh_s,)
        _sync(st, count_ref, b, bars * (i + 1) * st.nh)
        out = []
        for (RT, RgT, _), dprev, dpeep in zip(owned, directs, new_state):
            dh = dprev[0]
            dg = list(dprev[2]) if spec.full_gate_recurrence else None
            for c, ch in enumerate(chunks):  # one chunk of d_pre live at a time
                for k in range(G - 1 if cho else G):
                    d_c = (_shared_load(st, dq_ref, (t, rows, ch)) if cand and k == G - 1 else
                           _shared_load(st, dxp_ref, (t, rows, k, ch)))
                    dh = dh + dot(d_c, RT[k](c), st.precision, DOT_T)
                    if spec.full_gate_recurrence and k in rec_idx:
                        d = rec_idx.index(k)
                        for s_ in range(k_rec):
                            dg[s_] = dg[s_] + dot(d_c, RgT[s_][d](c), st.precision, DOT_T)
            dnew = (dh,) if not lstm else (dh, dprev[1]) + ((tuple(dg),) if spec.full_gate_recurrence else ())
            out.append((dnew, dpeep))
        return tuple(out)

    def zeros(j):
        cols = _columns(st, j)
        return jax.tree.map(jnp.zeros_like, load_carry(c0, (), cols))

    init = tuple((zeros(j), tuple(jnp.zeros_like(p_) for p_ in own_[2])) for j, own_ in zip(blocks, owned))
    final = jax.lax.fori_loop(0, st.T, body, init)
    for j, (dcarry0, dpeep) in zip(blocks, final):
        cols = _columns(st, j)
        dc0[0][rows, cols] = dcarry0[0]
        if not lstm:
            if spec.reset_after:
                dpeep_ref[b, cols] = dpeep[0]
            continue
        dc0[1][rows, cols] = dcarry0[1]
        if spec.full_gate_recurrence:
            for s_ in range(k_rec):
                dc0[2][rows, s_, cols] = dcarry0[2][s_]
        for p_ in range(P):
            dpeep_ref[b, p_, cols] = dpeep[p_]


def _split_call(kernel, st: Static, ins, out_shapes):
    """The split kernels index whole arrays themselves; the last output is the barrier counter, aliased
    to the last input (zeros).

    Under ``jax.vmap`` (a population of models) the members' launches run one after another
    (``lax.map``) instead of as one launch with a population axis in its grid: the step barrier needs
    every program of a launch resident at once, and the plan made room for one member's programs only
    (K members' would exceed the SMs and spin forever)."""
    nb = ins[-1].shape[0]  # the counter: one per batch tile
    kw = {}
    if not st.interpret:
        from jax.experimental.pallas import triton as plgpu
        kw["compiler_params"] = plgpu.CompilerParams(num_warps=st.num_warps, num_stages=1)
    whole = pl.BlockSpec(memory_space=pl.ANY)

    @jax.custom_batching.custom_vmap
    def launch(*ins):
        return tuple(pl.pallas_call(kernel, grid=(nb, 1 if st.interpret else st.nh),
                                    in_specs=[whole] * len(ins), out_specs=[whole] * len(out_shapes),
                                    out_shape=out_shapes, input_output_aliases={len(ins) - 1: len(out_shapes) - 1},
                                    interpret=st.interpret, **kw)(*ins))

    @launch.def_vmap
    def _members_in_turn(axis_size, in_batched, *ins):
        def member(mapped):
            it = iter(mapped)
            return launch(*[next(it) if b else x for x, b in zip(ins, in_batched)])
        outs = jax.lax.map(member, [x for x, b in zip(ins, in_batched) if b])
        return outs, tuple(True for _ in outs)

    return launch(*ins)


def forward(st: Static, save: bool, prm: tuple, xp4, carry0: tuple, mask):
    T, Bp, G, Hp = xp4.shape
    count = jnp.zeros((Bp // st.bB,), jnp.int32)
    out_shapes = [jax.ShapeDtypeStruct((T, *c.shape), jnp.float32) for c in carry0]
    if save:
        out_shapes.append(jax.ShapeDtypeStruct((T, Bp, G, Hp), jnp.float32))
    if is_cho(st.spec):  # r * h of the current step (one buffer: the step's second barrier guards its reuse)
        out_shapes.append(jax.ShapeDtypeStruct((Bp, Hp), jnp.float32))
    out_shapes.append(jax.ShapeDtypeStruct(count.shape, jnp.int32))
    outs = _split_call(functools.partial(_split_fwd_kernel, st, save), st, [xp4, mask, *prm, *carry0, count],
                       out_shapes)
    nf = len(carry0)
    return tuple(outs[:nf]), (outs[nf] if save else None)


def backward(st: Static, prm: tuple, res, dseq: tuple):
    spec = st.spec
    pre, mask, carry0, seq, xn = res
    T, Bp, G, Hp = pre.shape
    nb = Bp // st.bB
    count = jnp.zeros((nb,), jnp.int32)
    out_shapes = [jax.ShapeDtypeStruct((T, Bp, G, Hp), jnp.float32)]
    if has_candidate(spec):
        out_shapes.append(jax.ShapeDtypeStruct((T, Bp, Hp), jnp.float32))
    out_shapes += [jax.ShapeDtypeStruct(c.shape, jnp.float32) for c in carry0]
    if spec.peepholes:
        out_shapes.append(jax.ShapeDtypeStruct((nb, len(spec.peephole_names()), Hp), jnp.float32))
    if spec.reset_after:
        out_shapes.append(jax.ShapeDtypeStruct((nb, Hp), jnp.float32))
    out_shapes.append(jax.ShapeDtypeStruct(count.shape, jnp.int32))
    xs = [pre] if xn is None else [pre, xn]
    outs = _split_call(functools.partial(_split_bwd_kernel, st), st,
                       [*xs, mask, *prm, *carry0, *seq, *dseq, count], out_shapes)
    return list(outs[:-1])
