"""What both schedules of the Pallas kernel share: the static description of a launch, the carry and
parameter layout, and the step math on ``[rows, H]`` tiles (forward, and its ``jax.vjp`` in the backward)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lstm_lab import cells as _cells
from lstm_lab.cells import CellSpec

__all__ = ["Static", "carry_fields", "param_names", "DOT_T", "dot", "direct_math", "cand_out", "reset_gate"]


# ---------------------------------------------------------------------------
# Static description of one kernel instance
# ---------------------------------------------------------------------------
class Static(tuple):
    """Hashable (spec, T, bB, Hp, interpret, num_warps, precision, bH, bK, stream) for custom_vjp's
    nondiff arg.

    ``bH < Hp``: the hidden size is split across ``Hp // bH`` programs per batch tile (the split schedule,
    :mod:`lstm_lab.kernels.pallas.split`); ``bK``: the chunk of the recurrent matmul's contraction they load;
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


def carry_fields(spec: CellSpec) -> tuple[str, ...]:
    """Carry fields the kernel carries: h; c (LSTM); gates (FGR, as [rows, k, H])."""
    if spec.family != "lstm":
        return ("h",)
    return ("h", "c", "gates") if spec.full_gate_recurrence else ("h", "c")



def param_names(spec: CellSpec) -> tuple[str, ...]:
    names = ["R"]
    if spec.full_gate_recurrence:
        names.append("R_gates")
    if spec.peepholes:
        names.append("peep")
    if spec.reset_after:
        names.append("b_hn")
    return tuple(names)



DOT_T = (((1,), (1,)), ((), ()))  # a @ b^T


def dot(a, b, precision, dims=None):
    dims = dims or (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(a.astype(b.dtype), b, dims, precision=precision,
                               preferred_element_type=jnp.float32)



# ---------------------------------------------------------------------------
# The step math on tiles (shared by forward and backward)
# ---------------------------------------------------------------------------
def direct_math(st: Static, prm, a, carry, m):
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


def cand_out(st: Static, prm, gates, x_n, q, h, m):
    """Masked GRU / MGU step from the gates' pre-activations (a tuple), ``x_n`` and the candidate's
    product ``q``: new carry tuple."""
    if st.spec.family == "gru":
        r, u = _cells.gru_gates(*gates)
        _, y = _cells.gru_candidate(st.spec, x_n, q, r, u, h, prm.get("b_hn"))
    else:
        _, y = _cells.mgu_candidate(x_n, q, _cells.mgu_gate(gates[0]), h)
    return (jnp.where(m, y, h),)


def reset_gate(spec: CellSpec, a0):
    """The gate that multiplies h before the candidate's product: Cho's GRU's r, the MGU's f."""
    return _cells.gru_gates(a0, a0)[0] if spec.family == "gru" else _cells.mgu_gate(a0)

