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
barrier every step ("Hidden size split across programs" below); Cho et al.'s GRU and the MGU also
exchange ``r * h`` / ``f * h`` (backward: ``dq``) in the middle of the step, at a second barrier.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lstm_lab import cells as _cells
from lstm_lab.cells import CellSpec

__all__ = ["fused_recurrence", "pallas_unsupported", "SMEM_BUDGET"]

# What a program may keep on chip for all T steps: Triton stages the weight tiles of its dots in shared
# memory (H100: at most 227 KiB per block); measured by compiling the kernels' Triton IR for sm_90 (no GPU
# needed; benchmarks/NOTES.md, "Session 4"): whole-H LSTM weights take 68 KiB at H=64 float32 and 136 KiB
# at H=128 bfloat16 (fit), 264 KiB at H=128 float32 (does not).
SMEM_BUDGET = 200 * 1024
SM_COUNT = 132  # H100; on a GPU the device's own count is used
_DOT_T = (((1,), (1,)), ((), ()))  # a @ b^T
_DTYPES = ("float32", "bfloat16", "float16")


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (int(n) - 1).bit_length())


def _weight_bytes(spec: CellSpec, Hp: int, bH: int, itemsize: int) -> int:
    """Bytes of weights one program keeps: its bH columns of every gate's R (and of FGR's R_gates)."""
    k = len(spec.recurrent_gate_names()) if spec.full_gate_recurrence else 0
    return (len(spec.gate_names()) + k * k) * Hp * bH * itemsize


def _cand(spec: CellSpec) -> bool:
    """GRU and MGU: gate products, then the candidate's own product ``q`` (its gate index is the last)."""
    return spec.family in ("gru", "mgu")


def _cho(spec: CellSpec) -> bool:
    """Cho et al.'s GRU and the MGU: the candidate's product ``(r * h) @ R_n`` needs the gate ``r`` (the
    MGU's ``f``) first."""
    return _cand(spec) and not spec.reset_after


def _barriers_per_step(spec: CellSpec) -> int:
    """Step barriers of the split schedule: one (h, backward d_pre, exchanged after the step); Cho's GRU
    two (forward: ``r * h`` in the middle of the step; backward: ``dq`` before ``ds = dq @ R_n^T``)."""
    return 2 if _cho(spec) else 1


def _plan(spec: CellSpec, H: int, B: int, itemsize: int, block_b: int, block_h: int | None, sms: int,
          stream: bool | None):
    """(bB, bH, stream) for a launch, or a reason it cannot run.

    Whole H in one program when its weights fit in :data:`SMEM_BUDGET`; else H split across programs, the widest column block whose weights fit (or 16 columns with the weights
    streamed), and batch tiles large enough that all programs fit on the ``sms`` multiprocessors at once.
    """
    Hp = _pow2(H)
    bB = block_b if B > 16 else 16
    if block_h is not None:
        bH = min(block_h, Hp)
    elif _weight_bytes(spec, Hp, Hp, itemsize) <= SMEM_BUDGET:
        bH = Hp
    else:
        bH = Hp
        while bH > 16 and _weight_bytes(spec, Hp, bH, itemsize) > SMEM_BUDGET:
            bH //= 2
    fits = _weight_bytes(spec, Hp, bH, itemsize) <= SMEM_BUDGET
    if bH == Hp:
        if not fits:
            return (f"impl='pallas' runs the {spec.name} "
                    f"with the whole recurrent matrix in one program, and at hidden size {H} (padded {Hp}) its "
                    f"{_weight_bytes(spec, Hp, Hp, itemsize) // 1024} KiB exceed the {SMEM_BUDGET // 1024} KiB "
                    f"of shared memory it may take")
        return bB, bH, False
    nh = Hp // bH
    if nh > sms:
        return (f"impl='pallas': {nh} column blocks of {bH} for hidden size {H} exceed the {sms} multiprocessors "
                f"that must hold them all at once (they meet at a barrier every step)")
    while -(-B // bB) * nh > sms:  # every program must be resident at once: fewer, taller batch tiles
        bB *= 2
    return bB, bH, (not fits) if stream is None else bool(stream)


def _unsupported_dtype(**dtypes) -> str | None:
    """Every cell family runs in the kernel; only the dtypes can be refused."""
    for name, dt in dtypes.items():
        if dt is not None and jnp.dtype(dt).name not in _DTYPES:
            return f"impl='pallas' computes in float32, bfloat16 or float16; got {name}={jnp.dtype(dt).name}"
    return None


def pallas_unsupported(spec: CellSpec, hidden_size: int, dtype=None, param_dtype=None,
                       block_h: int | None = None) -> str | None:
    """Why ``impl="pallas"`` cannot run ``spec`` at ``hidden_size``, or None when it can."""
    why = _unsupported_dtype(dtype=dtype, param_dtype=param_dtype)
    if why:
        return why
    itemsize = jnp.dtype(dtype if dtype is not None else param_dtype if param_dtype is not None
                         else jnp.float32).itemsize
    # the batch size does not decide whether it can run (batch tiles grow to fit), only the schedule
    plan = _plan(spec, hidden_size, 16, itemsize, 16, block_h, SM_COUNT, None)
    return plan if isinstance(plan, str) else None


# ---------------------------------------------------------------------------
# Static description of one kernel instance
# ---------------------------------------------------------------------------
class _Static(tuple):
    """Hashable (spec, T, bB, Hp, interpret, num_warps, precision, bH, bK, stream) for custom_vjp's
    nondiff arg.

    ``bH < Hp``: the hidden size is split across ``Hp // bH`` programs per batch tile (see "Hidden size
    split across programs" below); ``bK``: the chunk of the recurrent matmul's contraction they load;
    ``stream``: they load their weights at each use instead of once.
    """

    spec = property(lambda s: s[0])
    T = property(lambda s: s[1])
    bB = property(lambda s: s[2])
    Hp = property(lambda s: s[3])
    interpret = property(lambda s: s[4])
    num_warps = property(lambda s: s[5])
    precision = property(lambda s: s[6])
    bH = property(lambda s: s[7])
    bK = property(lambda s: s[8])
    stream = property(lambda s: s[9])
    nh = property(lambda s: s[3] // s[7])


def _fields(spec: CellSpec) -> tuple[str, ...]:
    """Carry fields the kernel carries: h; c (LSTM); gates (FGR, as [rows, k, H])."""
    if spec.family != "lstm":
        return ("h",)
    return ("h", "c", "gates") if spec.full_gate_recurrence else ("h", "c")


def _param_names(spec: CellSpec) -> tuple[str, ...]:
    names = ["R"]
    if spec.full_gate_recurrence:
        names.append("R_gates")
    if spec.peepholes:
        names.append("peep")
    if spec.reset_after:
        names.append("b_hn")
    return tuple(names)


def _load_params(spec: CellSpec, refs) -> dict:
    """The parameters, loaded once per program as per-gate tiles (Triton cannot slice values)."""
    prm = dict(zip(_param_names(spec), refs))
    out = {"R": tuple(prm["R"][j] for j in range(prm["R"].shape[0]))}
    if "R_gates" in prm:
        k = prm["R_gates"].shape[0]
        out["R_gates"] = tuple(tuple(prm["R_gates"][s, d] for d in range(k)) for s in range(k))
    if "peep" in prm:
        out["peep"] = tuple(prm["peep"][j] for j in range(prm["peep"].shape[0]))
    if "b_hn" in prm:
        out["b_hn"] = prm["b_hn"][...]
    return out


def _dot(a, b, precision, dims=None):
    dims = dims or (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(a.astype(b.dtype), b, dims, precision=precision,
                               preferred_element_type=jnp.float32)


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


def _call(kernel, st: _Static, ins, in_specs, out_shapes, out_specs, Bp):
    kw = {}
    if not st.interpret:
        from jax.experimental.pallas import triton as plgpu
        kw["compiler_params"] = plgpu.CompilerParams(num_warps=st.num_warps, num_stages=1)
    return pl.pallas_call(kernel, grid=(Bp // st.bB,), in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shapes, interpret=st.interpret, **kw)(*ins)


# ---------------------------------------------------------------------------
# The step math on tiles (shared by forward and backward)
# ---------------------------------------------------------------------------
def _recurrent(st: _Static, prm, h, gates):
    """Per gate k: the recurrent part of the pre-activation (LSTM: h @ R_k + FGR; RNN: h @ R; GRU, MGU:
    the gates before the candidate only)."""
    spec = st.spec
    names = spec.gate_names()
    R = prm["R"]
    if _cand(spec):
        return {k: _dot(h, R[j], st.precision) for j, k in enumerate(names[:-1])}
    rec = {k: _dot(h, R[j], st.precision) for j, k in enumerate(names)}
    if spec.full_gate_recurrence:
        Rg = prm["R_gates"]
        src = spec.recurrent_gate_names()
        for kd, dst in enumerate(src):
            for ks in range(len(src)):
                rec[dst] = rec[dst] + _dot(gates[ks], Rg[ks][kd], st.precision)
    return rec


def _direct_math(st: _Static, prm, a, carry, m):
    """Masked step of a cell whose pre-activations are all ``xp + h @ R_k`` (LSTM family, tanh RNN): new
    carry tuple."""
    spec = st.spec
    if spec.family == "rnn":
        return (jnp.where(m, _cells.rnn_pointwise(a[spec.gate_names()[0]]), carry[0]),)
    peep = {}
    if spec.peepholes:
        peep = {p: prm["peep"][j] for j, p in enumerate(spec.peephole_names())}
    c, y, acts = _cells.lstm_pointwise(spec, a, carry[1], peep)
    new = [y, c]
    if spec.full_gate_recurrence:
        new.append(tuple(acts[g] for g in spec.recurrent_gate_names()))
    return tuple(jax.tree.map(lambda n, o: jnp.where(m, n, o), tuple(new), tuple(carry)))


def _cand_out(st: _Static, prm, gates, x_n, q, h, m):
    """Masked GRU / MGU step from the gates' pre-activations (a tuple), ``x_n`` and the candidate's
    product ``q``: new carry tuple."""
    if st.spec.family == "gru":
        r, u = _cells.gru_gates(*gates)
        _, y = _cells.gru_candidate(st.spec, x_n, q, r, u, h, prm.get("b_hn"))
    else:
        _, y = _cells.mgu_candidate(x_n, q, _cells.mgu_gate(gates[0]), h)
    return (jnp.where(m, y, h),)


def _reset(spec: CellSpec, a0):
    """The gate that multiplies h before the candidate's product: Cho's GRU's r, the MGU's f."""
    return _cells.gru_gates(a0, a0)[0] if spec.family == "gru" else _cells.mgu_gate(a0)


# ---------------------------------------------------------------------------
# Forward kernel
# ---------------------------------------------------------------------------
def _fwd_kernel(st: _Static, save: bool, *refs):
    spec = st.spec
    fields = _fields(spec)
    pnames = _param_names(spec)
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
        if not _cand(spec):
            a = {k: xp_ref[t, :, j, :] + rec[k] for j, k in enumerate(spec.gate_names())}
            new = _direct_math(st, prm, a, carry, m)
            pres = [a[k] for k in spec.gate_names()]
        else:
            ag = tuple(xp_ref[t, :, j, :] + rec[k] for j, k in enumerate(spec.gate_names()[:-1]))
            q = _dot(h if spec.reset_after else _reset(spec, ag[0]) * h, prm["R"][G - 1], st.precision)
            new = _cand_out(st, prm, ag, xp_ref[t, :, G - 1, :], q, h, m)
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


def _forward(st: _Static, save: bool, prm: tuple, xp4, carry0: tuple, mask):
    spec = st.spec
    T, Bp, G, Hp = xp4.shape
    fields = _fields(spec)
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
def _bwd_kernel(st: _Static, *refs):
    spec = st.spec
    fields = _fields(spec)
    pnames = _param_names(spec)
    names = spec.gate_names()
    G = len(names)
    k_rec = len(spec.recurrent_gate_names())
    it = iter(refs)
    pre_ref = next(it)
    xn_ref = next(it) if _cand(spec) else None  # GRU/MGU: x_n is not in pre (gates, q)
    mask_ref = next(it)
    prm = _load_params(spec, [next(it) for _ in pnames])
    c0 = [next(it) for _ in fields]
    seq = [next(it) for _ in fields]
    dseq = [next(it) for _ in fields]
    dxp_ref = next(it)
    dq_ref = next(it) if _cand(spec) else None
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
        if not _cand(spec):
            a = {k: pre_ref[t, :, j, :] for j, k in enumerate(names)}
            _, vjp = jax.vjp(lambda a_, c_, e_: _direct_math(st, {**prm, **e_}, a_, c_, m), a, prev, ew)
            da, dprev, de = vjp(dcarry)
            dxs = [da[k] for k in names]
            dh = dprev[0]
            for j in range(G):
                dh = dh + _dot(dxs[j], R[j], st.precision, _DOT_T)
            dprev = list(dprev)
            if spec.full_gate_recurrence:
                Rg = prm["R_gates"]
                dg = list(dprev[2])
                for ks in range(k_rec):
                    for kd, dst in enumerate(spec.recurrent_gate_names()):
                        dg[ks] = dg[ks] + _dot(da[dst], Rg[ks][kd], st.precision, _DOT_T)
                dprev[2] = tuple(dg)
            dprev[0] = dh
        else:
            h = prev[0]
            ag = tuple(pre_ref[t, :, j, :] for j in range(G - 1))
            q = pre_ref[t, :, G - 1, :]
            _, vjp = jax.vjp(lambda g_, xn, q_, h_, e_: _cand_out(st, {**prm, **e_}, g_, xn, q_, h_, m),
                             ag, xn_ref[t], q, h, ew)
            dg, dx_n, dq, dh, de = vjp(dcarry)
            dg = list(dg)
            if spec.reset_after:
                dh = dh + _dot(dq, R[G - 1], st.precision, _DOT_T)
            else:  # q = (r * h) @ R_n: through s = r * h back to a_r and h
                ds = _dot(dq, R[G - 1], st.precision, _DOT_T)
                _, vjp_s = jax.vjp(lambda a0, h_: _reset(spec, a0) * h_, ag[0], h)
                da0_s, dh_s = vjp_s(ds)
                dg[0], dh = dg[0] + da0_s, dh + dh_s
            for j in range(G - 1):
                dh = dh + _dot(dg[j], R[j], st.precision, _DOT_T)
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


def _backward(st: _Static, prm: tuple, res, dseq: tuple):
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
    if _cand(spec):
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



# ---------------------------------------------------------------------------
# Hidden size split across programs (large H)
# ---------------------------------------------------------------------------
# grid (batch tiles, Hp // bH): program (b, j) owns rows b*bB.. and hidden columns J = j*bH.. of every
# gate, and keeps only its columns of R (forward: R_k[:, J]; backward: R_k[J, :]), so the weights are
# spread over the programs (cuDNN's persistent kernels do the same). Per step the programs of a batch
# tile exchange what the matmul needs through global memory — forward h_t (and FGR's gates_t), backward
# d_pre_t — and meet at a barrier (an atomic counter per batch tile and a spin loop; the programs must
# all be resident at once: at most one per SM). Cho's GRU meets twice per step: forward after publishing
# r_t * h_{t-1} (its candidate's product needs all of it), backward after publishing dq_t (ds = dq @ R_n^T
# needs all of it, then r's gradient joins d_pre). In interpret mode programs run one after another, so
# there the kernel runs every column block of a phase in turn inside one program instead of the
# barrier: the same code computes each block, only the schedule differs.
def _columns(st: _Static, j):
    return pl.ds(j * st.bH, st.bH)


def _chunks(st: _Static):
    return [pl.ds(c * st.bK, st.bK) for c in range(st.Hp // st.bK)]


def _shared_load(st: _Static, ref, idx):
    """Load what other programs wrote during this launch: volatile on a GPU (L1 is not coherent across SMs;
    a ".cg" cache modifier would do, but jax 0.10's Triton lowering cannot look it up)."""
    if st.interpret:
        return ref[idx]
    from jax.experimental.pallas import triton as plgpu
    return plgpu.load(ref.at[idx], volatile=True)


def _sync(st: _Static, count_ref, b, target):
    """The step barrier on a GPU; nothing in interpret mode (there one program runs every block of a
    phase before the next phase)."""
    if not st.interpret:
        _barrier(st, count_ref, b, target)


def _barrier(st: _Static, count_ref, b, target):
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

    def __init__(self, st: _Static, ref, index):
        self.ref, self.index, self.chunks = ref, index, _chunks(st)  # index(chunk) -> the tile's ref index
        self.tiles = None if st.stream else [ref[index(ch)] for ch in self.chunks]

    def __call__(self, c):
        return self.ref[self.index(self.chunks[c])] if self.tiles is None else self.tiles[c]


def _split_fwd_kernel(st: _Static, save: bool, *refs):
    spec = st.spec
    fields = _fields(spec)
    names = spec.gate_names()
    G = len(names)
    rec_names = spec.recurrent_gate_names()
    k_rec = len(rec_names)
    it = iter(refs)
    xp_ref, mask_ref = next(it), next(it)
    prm_refs = dict(zip(_param_names(spec), [next(it) for _ in _param_names(spec)]))
    c0 = [next(it) for _ in fields]
    _count_in = next(it)
    seq = [next(it) for _ in fields]
    pre_ref = next(it) if save else None
    s_ref = next(it) if _cho(spec) else None  # Cho's GRU: r * h of this step, [Bp, Hp]
    count_ref = next(it)
    b = pl.program_id(0)
    rows = pl.ds(b * st.bB, st.bB)
    blocks = range(st.nh) if st.interpret else [pl.program_id(1)]
    chunks = _chunks(st)
    bars = _barriers_per_step(spec)

    def own(j):  # the weights (R_k[:, J], R_gates[s, d][:, J]) and the initial carry of column block j
        cols = _columns(st, j)
        R = [_Weights(st, prm_refs["R"], lambda ch, k=k: (k, ch, cols)) for k in range(G)]
        Rg = ([[_Weights(st, prm_refs["R_gates"], lambda ch, s_=s_, d=d: (s_, d, ch, cols)) for d in range(k_rec)]
               for s_ in range(k_rec)] if spec.full_gate_recurrence else None)
        peep = tuple(prm_refs["peep"][p_, cols] for p_ in range(len(spec.peephole_names()))) if spec.peepholes else ()
        if _cand(spec):  # GRU with reset_after: the "peephole" slot carries b_hn
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
            if _cand(spec):  # the last product is q = h @ R_n (or (r*h) @ R_n), without x_n
                x_n, a[-1] = a[-1], jnp.zeros_like(a[-1])
            for c, ch in enumerate(chunks):  # one chunk of h (and of FGR's gates) live at a time
                h_c = prev_chunk(t, seq[0], c0[0], ch)
                for k in range(G - 1 if _cho(spec) else G):
                    a[k] = a[k] + _dot(h_c, R[k](c), st.precision)
                if spec.full_gate_recurrence:
                    for s_ in range(k_rec):
                        g_c = prev_chunk(t, seq[2], c0[2], ch, s_)
                        for d, dst in enumerate(rec_names):
                            kd = names.index(dst)
                            a[kd] = a[kd] + _dot(g_c, Rg[s_][d](c), st.precision)
            if _cho(spec):  # publish this block's r * h: every block's q needs all of it
                s_ref[rows, cols] = _reset(spec, a[0]) * carry[0]
            pres.append((a, x_n))
        if _cho(spec):
            _sync(st, count_ref, b, (bars * t + 1) * st.nh)
            for ((R, _, _), _), (a, _) in zip(owned, pres):
                for c, ch in enumerate(chunks):
                    a[-1] = a[-1] + _dot(_shared_load(st, s_ref, (rows, ch)), R[-1](c), st.precision)
        new_carries = []
        for j, ((R, Rg, peep), _), carry, (a, x_n) in zip(blocks, owned, carries, pres):
            cols = _columns(st, j)
            if _cand(spec):
                new = _cand_out(st, {"b_hn": peep}, tuple(a[:-1]), x_n, a[-1], carry[0], m)
                seq[0][t, rows, cols] = new[0]
                if save:
                    for k in range(G):
                        pre_ref[t, rows, k, cols] = a[k]
                new_carries.append(new)
                continue
            a = dict(zip(names, a))
            new = _direct_math(st, {"peep": peep}, a, carry, m)
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


def _split_bwd_kernel(st: _Static, *refs):
    spec = st.spec
    fields = _fields(spec)
    names = spec.gate_names()
    G = len(names)
    rec_names = spec.recurrent_gate_names()
    rec_idx = [names.index(g) for g in rec_names]
    k_rec = len(rec_names)
    P = len(spec.peephole_names())
    cand = _cand(spec)
    lstm = spec.family == "lstm"
    it = iter(refs)
    pre_ref = next(it)
    xn_ref = next(it) if cand else None
    mask_ref = next(it)
    prm_refs = dict(zip(_param_names(spec), [next(it) for _ in _param_names(spec)]))
    c0 = [next(it) for _ in fields]
    seq = [next(it) for _ in fields]
    dseq = [next(it) for _ in fields]
    _count_in = next(it)
    dxp_ref = next(it)
    dq_ref = next(it) if cand else None
    dc0 = [next(it) for _ in fields]
    dpeep_ref = next(it) if spec.peepholes or spec.reset_after else None  # GRU: b_hn's partial sums
    count_ref = next(it)
    b = pl.program_id(0)
    rows = pl.ds(b * st.bB, st.bB)
    blocks = range(st.nh) if st.interpret else [pl.program_id(1)]
    chunks = _chunks(st)
    cho = _cho(spec)
    bars = _barriers_per_step(spec)

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
                _, vjp = jax.vjp(lambda g_, xn, q_, h_, e_: _cand_out(st, {"b_hn": e_[0] if e_ else None},
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
            _, vjp = jax.vjp(lambda a_, c_, e_: _direct_math(st, {"peep": e_}, a_, c_, m), a, prev, peep)
            da, dprev, de = vjp(dcarry)
            for k, name in enumerate(names):
                dxp_ref[t, rows, k, cols] = da[name]
            directs.append(dprev)
            new_state.append(jax.tree.map(jnp.add, dpeep, de))
        if cho:  # q = s @ R_n with s = r * h: ds needs every block's dq, then r's gradient is published
            _sync(st, count_ref, b, (bars * i + 1) * st.nh)
            for n_, (j, (RT, _, _)) in enumerate(zip(blocks, owned)):
                dh, da_r, a_r, h = directs[n_]
                ds = sum(_dot(_shared_load(st, dq_ref, (t, rows, ch)), RT[-1](c), st.precision, _DOT_T)
                         for c, ch in enumerate(chunks))
                _, vjp_s = jax.vjp(lambda ar, h_: _reset(spec, ar) * h_, a_r, h)
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
                    dh = dh + _dot(d_c, RT[k](c), st.precision, _DOT_T)
                    if spec.full_gate_recurrence and k in rec_idx:
                        d = rec_idx.index(k)
                        for s_ in range(k_rec):
                            dg[s_] = dg[s_] + _dot(d_c, RgT[s_][d](c), st.precision, _DOT_T)
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


def _split_call(kernel, st: _Static, ins, out_shapes):
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


def _split_forward(st: _Static, save: bool, prm: tuple, xp4, carry0: tuple, mask):
    T, Bp, G, Hp = xp4.shape
    count = jnp.zeros((Bp // st.bB,), jnp.int32)
    out_shapes = [jax.ShapeDtypeStruct((T, *c.shape), jnp.float32) for c in carry0]
    if save:
        out_shapes.append(jax.ShapeDtypeStruct((T, Bp, G, Hp), jnp.float32))
    if _cho(st.spec):  # r * h of the current step (one buffer: the step's second barrier guards its reuse)
        out_shapes.append(jax.ShapeDtypeStruct((Bp, Hp), jnp.float32))
    out_shapes.append(jax.ShapeDtypeStruct(count.shape, jnp.int32))
    outs = _split_call(functools.partial(_split_fwd_kernel, st, save), st, [xp4, mask, *prm, *carry0, count],
                       out_shapes)
    nf = len(carry0)
    return tuple(outs[:nf]), (outs[nf] if save else None)


def _split_backward(st: _Static, prm: tuple, res, dseq: tuple):
    spec = st.spec
    pre, mask, carry0, seq, xn = res
    T, Bp, G, Hp = pre.shape
    nb = Bp // st.bB
    count = jnp.zeros((nb,), jnp.int32)
    out_shapes = [jax.ShapeDtypeStruct((T, Bp, G, Hp), jnp.float32)]
    if _cand(spec):
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

# ---------------------------------------------------------------------------
# custom VJP over the padded layout
# ---------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(st, prm, xp4, carry0, mask):
    return (_split_forward if st.nh > 1 else _forward)(st, False, prm, xp4, carry0, mask)[0]


def _core_fwd(st, prm, xp4, carry0, mask):
    seq, pre = (_split_forward if st.nh > 1 else _forward)(st, True, prm, xp4, carry0, mask)
    xn = xp4[:, :, -1, :] if _cand(st.spec) else None
    return seq, (prm, pre, mask, carry0, seq, xn)


def _core_bwd(st, res, dseq):
    spec = st.spec
    prm, pre, mask, carry0, seq, xn = res
    outs = list((_split_backward if st.nh > 1 else _backward)(st, prm, (pre, mask, carry0, seq, xn), tuple(dseq)))
    dxp = outs.pop(0)
    dq = outs.pop(0) if _cand(spec) else None
    nf = len(_fields(spec))
    dcarry0 = tuple(o.astype(c.dtype) for o, c in zip(outs[:nf], carry0))
    outs = outs[nf:]
    T, Bp, G, Hp = pre.shape
    # h_prev for every step: the initial carry, then the carries of steps 0..T-2
    hprev = jnp.concatenate([carry0[0][None].astype(jnp.float32), seq[0][:-1]], 0).reshape(T * Bp, Hp)
    R = prm[0]
    d_rec = dxp.reshape(T * Bp, G, Hp)
    if _cand(spec):  # the candidate's weights get q's gradient (its x_n part is not in R)
        d_rec = d_rec.at[:, G - 1, :].set(dq.reshape(T * Bp, Hp))
    lhs = {j: hprev for j in range(G)}
    if _cho(spec):  # ... and multiply r * h_prev (the MGU: f * h_prev)
        lhs[G - 1] = _reset(spec, pre[:, :, 0, :].reshape(T * Bp, Hp)) * hprev
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
        :data:`SMEM_BUDGET`, else the widest column block whose weights fit.
      block_k: with a split hidden size, the contraction chunk of the recurrent matmuls.
      stream_weights: with a split hidden size, load the weights at each use (through L2) instead of
        once per launch; None: when they do not fit in :data:`SMEM_BUDGET`.
      num_warps: Triton warps per program (default 8: compiled for sm_90, 4 warps spill registers at
        H=128 and in the split kernel, 8 do not or less; benchmarks/NOTES.md).
      interpret: run in Pallas interpret mode (default: unless the backend is GPU).
      precision: of the kernel's matmuls (``jax.lax.Precision``; None: the backend's default,
        which on GPU lets float32 use TF32).

    Returns:
      ``(ys [T, B, H], final_carry)``; ``ys`` is zero where ``mask`` is False.
    """
    why = _unsupported_dtype(dtype=params["R"].dtype)
    if why:
        raise ValueError(why + ".")
    for name, v in (("block_b", block_b), ("block_h", block_h), ("block_k", block_k)):
        if v is not None and (not isinstance(v, int) or v < 16 or v & (v - 1)):
            raise ValueError(f"fused_recurrence: {name} must be a power of two >= 16; got {v!r}.")
    T, B, GH = xp.shape
    names = spec.gate_names()
    G = len(names)
    H = GH // G
    Hp = _pow2(H)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    sms = (None if interpret else getattr(jax.devices()[0], "core_count", None)) or SM_COUNT
    plan = _plan(spec, H, B, jnp.dtype(params["R"].dtype).itemsize, block_b, block_h, sms, stream_weights)
    if isinstance(plan, str):
        raise ValueError(plan + ".")
    bB, bH, stream = plan
    Bp = -(-B // bB) * bB
    num_warps = 8 if num_warps is None else num_warps  # fewer registers and spills than 4 at every anchor
    st = _Static((spec, T, bB, Hp, bool(interpret), int(num_warps), precision, bH, min(block_k, Hp), stream))
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
