"""``impl="native"``: the whole recurrence of one layer direction as a C++ kernel behind the XLA FFI (CPU).

The time loop, forward and backward, runs in ``rnn.cc`` (next to this file) as two XLA custom calls inside
``jax.jit``: per step one small GEMM against the recurrent matrix, packed once per call into column panels
(the matrix is constant over the T steps), and the gate math in loops the compiler vectorizes. Every cell:
the LSTM family with every flag (peepholes, CIFG, removed gates, identity or other activations, FGR), the
GRU in both forms, the MGU and the tanh RNN; masking (``seq_lengths``), initial carries; the reverse
direction is the layer's (it flips the inputs). The weight gradients are single large GEMMs over all steps
after the loop (XLA's, as :mod:`~lstm_lab.kernels.scan_vjp` does): ``dR = h_prev^T @ d_pre``.

Parallelism: the batch rows of a sequence batch are independent time loops, so the kernel splits the batch
into chunks (and, under ``jax.vmap`` — a population — the members) and runs them on XLA's intra-op thread
pool; no barrier per step. float32 only (another compute dtype: the reason, and ``impl="auto"`` runs the scan).

Built on first use with the system C++ compiler (``$CXX``, else ``g++``/``c++``) into a per-machine cache
(``$LSTM_LAB_CACHE`` or ``~/.cache/lstm_lab``), keyed by the source, compiler, jax and python versions and
the CPU's features, under a file lock so that parallel processes build it once (a few seconds). No compiler,
a failed build, or a library the running XLA refuses (one tiny call at load): one warning line,
``impl="native"`` is refused with that reason and ``impl="auto"`` runs ``scan_vjp``/``scan``. ``LSTM_LAB_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lstm_lab import cells as _cells
from lstm_lab.cells import CellSpec
from lstm_lab.kernels import Kernel, in_step_unsupported

__all__ = ["native", "available", "build", "KERNEL"]

SOURCE = Path(__file__).with_name("rnn.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-fopenmp-simd",
         "-Wno-unknown-pragmas")
_FAMILY = {"lstm": 0, "gru": 1, "mgu": 2, "rnn": 3}
_ACT = {"tanh": 0, "identity": 1, "sigmoid": 2, "relu": 3, "softsign": 4}
_FWD, _BWD = "lstm_lab_native_forward", "lstm_lab_native_backward"


# ---------------------------------------------------------------------------------------------------------
# Build, load, register
# ---------------------------------------------------------------------------------------------------------
def _compiler() -> str | None:
    for c in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if c and shutil.which(c):
            return c
    return None


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_dir() -> Path:
    root = os.environ.get("LSTM_LAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lstm_lab")
    return Path(root) / "native"


def build() -> Path:
    """Compile ``rnn.cc`` for this machine (or find it built) and return the shared library's path.

    Raises ``RuntimeError`` with the compiler's first error lines when it cannot."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX, or install g++)")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{cxx} --version failed: {e}") from e
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, version.encode(), jax.__version__.encode(), sys.version.encode(),
                                     _cpu_features().encode(), " ".join(FLAGS).encode()])).hexdigest()[:16]
    out = cache_dir() / f"lstm_lab_native-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel workers: one builds, the others wait and find it built
        try:
            if out.exists():
                return out
            fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
            os.close(fd)
            cmd = [cxx, *FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.SubprocessError) as e:
                os.unlink(tmp)
                raise RuntimeError(f"{cxx} failed: {e}") from e
            if res.returncode != 0:
                os.unlink(tmp)
                first = " | ".join(line for line in res.stderr.splitlines() if "error" in line)[:300]
                raise RuntimeError(f"{cxx} exited {res.returncode}: {first or res.stderr[:300]}")
            os.replace(tmp, out)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


@functools.cache
def _load() -> str | None:
    """Build and register the kernel once per process: None when it is ready, else why not (warned once)."""
    if os.environ.get("LSTM_LAB_NATIVE", "1") == "0":
        return "impl='native' is turned off (LSTM_LAB_NATIVE=0)"
    try:
        import ctypes

        lib = ctypes.CDLL(str(build()))
        jax.ffi.register_ffi_target(_FWD, jax.ffi.pycapsule(lib.LstmLabNativeForward), platform="cpu")
        jax.ffi.register_ffi_target(_BWD, jax.ffi.pycapsule(lib.LstmLabNativeBackward), platform="cpu")
        # The library is compiled against this jax's FFI header (its version is in the cache key); whether the
        # running XLA accepts it (the FFI API version) shows when a handler is called: one tiny call here.
        # The first use may be inside a trace (jit, grad, vmap); JAX's trace state is per thread.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(_smoke).result()
    except Exception as e:  # noqa: BLE001 - any failure here means: fall back, and say why
        why = f"impl='native' is unavailable: {type(e).__name__}: {e}".splitlines()[0]
        warnings.warn(f"{why}; impl='auto' runs the scan instead.", RuntimeWarning, stacklevel=3)
        return why
    return None


def available() -> bool:
    """Whether the native kernel built and loaded on this machine (builds it on the first call)."""
    return jax.default_backend() == "cpu" and _load() is None


def _smoke() -> None:
    """One tiny forward and backward call, so that a kernel that cannot run says so at load."""
    spec = _cells.VARIANTS["lstm"]
    rng = np.random.default_rng(0)
    params = {"R": rng.normal(0.0, 0.1, (2, 8)).astype(np.float32)}
    xp = rng.normal(size=(3, 2, 8)).astype(np.float32)
    carry = _cells.LSTMState(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.float32))
    loss, g = jax.jit(jax.value_and_grad(lambda x: _run(spec, params, x, carry)[0].sum()))(xp)  # one compile
    if not (np.isfinite(float(loss)) and np.isfinite(np.asarray(g)).all()):
        raise RuntimeError("the smoke test returned non-finite values")


# ---------------------------------------------------------------------------------------------------------
# The custom calls and their VJP
# ---------------------------------------------------------------------------------------------------------
def _attrs(spec: CellSpec, H: int) -> dict:
    flags = 0
    if spec.family == "lstm":
        flags = (1 * spec.input_gate + 2 * spec.forget_gate + 4 * spec.output_gate + 8 * spec.peepholes
                 + 16 * spec.coupled + 32 * spec.full_gate_recurrence)
    flags += 64 * spec.reset_after
    return {"family": np.int64(_FAMILY[spec.family]), "flags": np.int64(flags),
            "act_g": np.int64(_ACT[spec.input_activation]), "act_h": np.int64(_ACT[spec.output_activation]),
            "hidden": np.int64(H)}


def _sds(shape) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.float32)


def _acts_width(spec: CellSpec, H: int) -> int:
    return {"lstm": 5, "gru": 4, "mgu": 2, "rnn": 1}[spec.family] * H


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _core(spec, H, R, Rg, peep, bhn, xp, h0, c0, g0, mask):
    return _forward(spec, H, R, Rg, peep, bhn, xp, h0, c0, g0, mask)[0]


def _forward(spec, H, R, Rg, peep, bhn, xp, h0, c0, g0, mask):
    T, B, _ = xp.shape
    lstm = spec.family == "lstm"
    G = g0.shape[-1]
    outs = (_sds((T, B, H)), _sds((B, H)), _sds((B, H) if lstm else (1,)), _sds((B, G) if lstm else (1,)),
            _sds((T, B, H)), _sds((T, B, H) if lstm else (1,)),
            _sds((T, B, G) if spec.full_gate_recurrence else (1,)), _sds((T, B, _acts_width(spec, H))))
    call = jax.ffi.ffi_call(_FWD, outs, vmap_method="broadcast_all")
    ys, hT, cT, gT, ph, pc, pg, acts = call(xp, mask, R, Rg, peep, bhn, h0, c0, g0, **_attrs(spec, H))
    return (ys, hT, cT, gT), (ph, pc, pg, acts)


def _core_fwd(spec, H, R, Rg, peep, bhn, xp, h0, c0, g0, mask):
    out, (ph, pc, pg, acts) = _forward(spec, H, R, Rg, peep, bhn, xp, h0, c0, g0, mask)
    return out, (R, Rg, peep, bhn, mask, ph, pc, pg, acts)


def _mm(a, b):
    """Sum over time and batch: ``a [T, B, m]^T @ b [T, B, n] -> [m, n]``, as one matmul of the flattened arrays
    (an einsum here compiled to a transposing copy of both operands first: 1.4 + 2.1 ms at T/B/H 100/32/256)."""
    return jnp.matmul(a.reshape(-1, a.shape[-1]).T, b.reshape(-1, b.shape[-1]))


def _core_bwd(spec, H, res, cts):
    R, Rg, peep, bhn, mask, ph, pc, pg, acts = res
    dys, dhT, dcT, dgT = cts
    T, B, _ = dys.shape
    N = R.shape[-1]
    lstm = spec.family == "lstm"
    c0_shape = (B, H) if lstm else (1,)
    g0_shape = (B, Rg.shape[-1]) if spec.full_gate_recurrence else ((B, 1) if lstm else (1,))
    outs = (_sds((T, B, N)), _sds((B, H)), _sds(c0_shape), _sds(g0_shape), _sds((3, H)))
    call = jax.ffi.ffi_call(_BWD, outs, vmap_method="broadcast_all")
    dxp, dh0, dc0, dg0, dpeep = call(R, Rg, peep, mask, ph, pc, pg, acts, dys, dhT, dcT, dgT, **_attrs(spec, H))
    dRg = jnp.zeros_like(Rg)
    dbhn = jnp.zeros_like(bhn)
    if spec.family in ("lstm", "rnn"):
        dR = _mm(ph, dxp)
        if spec.full_gate_recurrence:
            blocks = _cells._split(dxp, spec.gate_names())
            dRg = _mm(pg, jnp.concatenate([blocks[g] for g in spec.recurrent_gate_names()], axis=-1))
    elif spec.family == "gru":
        r = acts[..., :H]
        dn = dxp[..., 2 * H:]
        if spec.reset_after:
            dR = jnp.concatenate([_mm(ph, dxp[..., :2 * H]), _mm(ph, dn * r)], axis=-1)
            dbhn = jnp.sum(dn * r, axis=(0, 1))
        else:
            dR = jnp.concatenate([_mm(ph, dxp[..., :2 * H]), _mm(r * ph, dn)], axis=-1)
    else:  # mgu
        f = acts[..., :H]
        dR = jnp.concatenate([_mm(ph, dxp[..., :H]), _mm(f * ph, dxp[..., H:])], axis=-1)
    return dR, dRg, dpeep, dbhn, dxp, dh0, dc0, dg0, jnp.zeros_like(mask)


_core.defvjp(_core_fwd, _core_bwd)


def native(spec: CellSpec, params: dict[str, jax.Array], xp: jax.Array, carry0, mask: jax.Array | None = None):
    """Run one direction of one layer over time (arguments as :class:`lstm_lab.kernels.Kernel`'s ``run``):
    ``(ys [T, B, H], final_carry)``."""
    why = _unsupported(spec, carry0.h.shape[-1], dtype=xp.dtype, backend=jax.default_backend())
    if why:
        raise ValueError(f"{why} (use impl='scan').")
    return _run(spec, params, xp, carry0, mask)


def _run(spec, params, xp, carry0, mask=None):
    f32 = jnp.float32
    T, B, _ = xp.shape
    H = carry0.h.shape[-1]
    lstm = spec.family == "lstm"
    zero = jnp.zeros((1,), f32)
    R = params["R"].astype(f32)
    Rg = params["R_gates"].astype(f32) if spec.full_gate_recurrence else zero
    peep = jnp.stack([params[p].astype(f32) if p in params else jnp.zeros((H,), f32) for p in ("p_i", "p_f", "p_o")])
    bhn = params["b_hn"].astype(f32) if spec.reset_after else jnp.zeros((H,), f32)
    m = jnp.ones((T, B), f32) if mask is None else mask.astype(f32)
    h0 = carry0.h.astype(f32)
    c0 = carry0.c.astype(f32) if lstm else zero
    g0 = carry0.gates.astype(f32) if spec.full_gate_recurrence else (jnp.zeros((B, 1), f32) if lstm else zero)
    ys, hT, cT, gT = _core(spec, int(H), R, Rg, peep, bhn, xp.astype(f32), h0, c0, g0, m)
    ctype = _cells.carry_type(spec)
    if spec.full_gate_recurrence:
        final = ctype(hT, cT, gT)
    elif lstm:
        final = ctype(hT, cT)
    else:
        final = ctype(hT)
    return ys.astype(xp.dtype), jax.tree.map(lambda a, b: a.astype(b.dtype), final, carry0)


def _unsupported(spec: CellSpec, hidden_size: int, *, dtype=None, param_dtype=None, backend=None,
                 **_) -> str | None:
    if backend is not None and backend != "cpu":
        return f"impl='native' runs on the CPU; the backend is {backend!r}"
    if spec.family not in _FAMILY:
        return (f"impl='native' runs the LSTM family, GRU, MGU and RNN; {spec.name!r} is a {spec.family}")
    why = in_step_unsupported("native", spec)
    if why:
        return why
    if dtype is not None and jnp.dtype(dtype) != jnp.float32:
        return f"impl='native' computes in float32; dtype={jnp.dtype(dtype).name}"
    return _load()


KERNEL = Kernel("native", native, unsupported=_unsupported, forward_mode=False)
