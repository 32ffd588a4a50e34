"""The launch plan of the Pallas kernel, and what it refuses: importable without Pallas.

:func:`launch_plan` chooses batch rows and hidden columns per program (the whole-H schedule when a
program's weights fit in :data:`SMEM_BUDGET`, else the split one); :func:`pallas_unsupported` says why a
cell, hidden size or dtype cannot run. The registry (:mod:`lstm_lab.kernels`), the config checks and
``benchmarks/triton_resources.py`` use these without importing ``jax.experimental.pallas``.

>>> from lstm_lab.cells import VARIANTS
>>> launch_plan(VARIANTS["lstm"], 64, 8, 4, 16, None, SM_COUNT, None)  # float32, H=64: whole H in one program
(16, 64, False)
>>> pallas_unsupported(VARIANTS["lstm"], 64) is None
True
>>> launch_plan(VARIANTS["gru"], 1024, 256, 4, 16, None, SM_COUNT, None)  # 128-row batch tiles: weights streamed
(128, 16, True)
"""

from __future__ import annotations

import jax.numpy as jnp

from lstm_lab.cells import CellSpec

__all__ = ["SMEM_BUDGET", "SM_COUNT", "DTYPES", "pow2", "weight_bytes", "has_candidate", "is_cho",
           "barriers_per_step", "launch_plan", "unsupported_dtype", "pallas_unsupported"]

# What a program may keep on chip for all T steps: Triton stages the weight tiles of its dots in shared
# memory (H100: at most 227 KiB per block); measured by compiling the kernels' Triton IR for sm_90 (no GPU
# needed; benchmarks/NOTES.md, "Session 4"): whole-H LSTM weights take 68 KiB at H=64 float32 and 136 KiB
# at H=128 bfloat16 (fit), 264 KiB at H=128 float32 (does not).
SMEM_BUDGET = 200 * 1024
# What else a split program stages besides its weights: one operand tile of its bB batch rows by the
# contraction chunk (block_k, 64 by default). Counted only where the batch tile grows past 16 rows to keep every
# program resident: Cho's GRU at T/B/H 128/256/1024 float32 (bB = 128, 192 KiB of weights) asked for 232 KiB of
# the H200's 227 on the GPU (benchmarks/NOTES.md, "Session 10"); with the tile counted its weights are streamed.
STAGE_K = 64
SM_COUNT = 132  # H100; on a GPU the device's own count is used
DTYPES = ("float32", "bfloat16", "float16")


def pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (int(n) - 1).bit_length())


def weight_bytes(spec: CellSpec, Hp: int, bH: int, itemsize: int) -> int:
    """Bytes of weights one program keeps: its bH columns of every gate's R (and of FGR's R_gates)."""
    k = len(spec.recurrent_gate_names()) if spec.full_gate_recurrence else 0
    return (len(spec.gate_names()) + k * k) * Hp * bH * itemsize


def has_candidate(spec: CellSpec) -> bool:
    """GRU and MGU: gate products, then the candidate's own product ``q`` (its gate index is the last)."""
    return spec.family in ("gru", "mgu")


def is_cho(spec: CellSpec) -> bool:
    """Cho et al.'s GRU and the MGU: the candidate's product ``(r * h) @ R_n`` needs the gate ``r`` (the
    MGU's ``f``) first."""
    return has_candidate(spec) and not spec.reset_after


def barriers_per_step(spec: CellSpec) -> int:
    """Step barriers of the split schedule: one (h, backward d_pre, exchanged after the step); Cho's GRU
    two (forward: ``r * h`` in the middle of the step; backward: ``dq`` before ``ds = dq @ R_n^T``)."""
    return 2 if is_cho(spec) else 1


def launch_plan(spec: CellSpec, H: int, B: int, itemsize: int, block_b: int, block_h: int | None, sms: int,
          stream: bool | None):
    """(bB, bH, stream) for a launch, or a reason it cannot run.

    Whole H in one program when its weights fit in :data:`SMEM_BUDGET`; else H split across programs, the widest column block whose weights fit (or 16 columns with the weights
    streamed), and batch tiles large enough that all programs fit on the ``sms`` multiprocessors at once.
    """
    Hp = pow2(H)
    bB = block_b if B > 16 else 16
    if block_h is not None:
        bH = min(block_h, Hp)
    elif weight_bytes(spec, Hp, Hp, itemsize) <= SMEM_BUDGET:
        bH = Hp
    else:
        bH = Hp
        while bH > 16 and weight_bytes(spec, Hp, bH, itemsize) > SMEM_BUDGET:
            bH //= 2
    fits = weight_bytes(spec, Hp, bH, itemsize) <= SMEM_BUDGET
    if bH == Hp:
        if not fits:
            return (f"impl='pallas' runs the {spec.name} "
                    f"with the whole recurrent matrix in one program, and at hidden size {H} (padded {Hp}) its "
                    f"{weight_bytes(spec, Hp, Hp, itemsize) // 1024} KiB exceed the {SMEM_BUDGET // 1024} KiB "
                    f"of shared memory it may take")
        return bB, bH, False
    nh = Hp // bH
    if nh > sms:
        return (f"impl='pallas': {nh} column blocks of {bH} for hidden size {H} exceed the {sms} multiprocessors "
                f"that must hold them all at once (they meet at a barrier every step)")
    while -(-B // bB) * nh > sms:  # every program must be resident at once: fewer, taller batch tiles
        bB *= 2
    if bB > 16 and weight_bytes(spec, Hp, bH, itemsize) + bB * STAGE_K * itemsize > SMEM_BUDGET:
        fits = False  # the taller batch tile's staging leaves the weights no room: stream them
    return bB, bH, (not fits) if stream is None else bool(stream)


def unsupported_dtype(**dtypes) -> str | None:
    """Every cell family runs in the kernel; only the dtypes can be refused."""
    for name, dt in dtypes.items():
        if dt is not None and jnp.dtype(dt).name not in DTYPES:
            return f"impl='pallas' computes in float32, bfloat16 or float16; got {name}={jnp.dtype(dt).name}"
    return None


def pallas_unsupported(spec: CellSpec, hidden_size: int, dtype=None, param_dtype=None,
                       block_h: int | None = None) -> str | None:
    """Why ``impl="pallas"`` cannot run ``spec`` at ``hidden_size``, or None when it can."""
    if spec.family not in ("lstm", "gru", "mgu", "rnn"):
        return (f"impl='pallas' runs the LSTM family, GRU, MGU and RNN; {spec.name!r} is a {spec.family}")
    from lstm_lab.kernels import in_step_unsupported

    why = in_step_unsupported("pallas", spec)
    if why:
        return why
    why = unsupported_dtype(dtype=dtype, param_dtype=param_dtype)
    if why:
        return why
    itemsize = jnp.dtype(dtype if dtype is not None else param_dtype if param_dtype is not None
                         else jnp.float32).itemsize
    # the batch size does not decide whether it can run (batch tiles grow to fit), only the schedule
    plan = launch_plan(spec, hidden_size, 16, itemsize, 16, block_h, SM_COUNT, None)
    return plan if isinstance(plan, str) else None

