"""The recurrent layer: hoisted input projection, then a kernel (:mod:`lstm_lab.kernels`) over time.

:class:`RNN` stacks layers of one cell variant (any :class:`~lstm_lab.CellSpec`),
optionally bidirectional, with masking by ``seq_lengths``, carries in and out
for truncated BPTT, and :func:`gate_trace` to read every gate over time.

The loop one direction of one layer runs, with ``[T, B, ...]`` shapes::

    xp = x @ W + b                          # [T, B, n*H], one matmul for all steps
    carry = initial_carry                   # fields [B, H]
    for t in range(T):                      # jax.lax.scan; only this is sequential
        new, y[t] = step(spec, params, carry, xp[t])
        carry = where(t < seq_lengths, new, carry)    # frozen past each end
        y[t] = where(t < seq_lengths, y[t], 0)
    return y, carry                         # carry: each sequence's own last step

The reverse direction runs the same loop over each sequence's own valid steps
reversed (``x[len-1], ..., x[0]``), and its outputs are put back in the
original time order. The loop itself is a kernel of :mod:`lstm_lab.kernels`
(``impl``): ``jax.lax.scan`` of the step, the same with a custom VJP, or one
fused Pallas kernel; :func:`run_direction` runs one.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lstm_lab import cells as _cells
from lstm_lab import kernels
from lstm_lab.cells import CellSpec, resolve_cell
from lstm_lab.kernels import AUTO_IMPL, IMPLS, impl_unsupported, resolve_impl  # noqa: F401  (re-exported)

__all__ = ["RNN", "RecurrentCell", "gate_trace", "run_direction", "scan_cell", "scan_cell_vjp", "scan_cell_pallas",
           "IMPLS", "AUTO_IMPL", "impl_unsupported", "chrono_unsupported", "resolve_impl", "init_params",
           "debug_checks"]

_List = getattr(nnx, "List", list)


def _acc_dtype(compute_dtype) -> jnp.dtype:
    """Elementwise/carry dtype: float32 for low-precision compute, else the compute dtype."""
    return jnp.promote_types(compute_dtype, jnp.float32)


# ---------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------
def init_params(spec: CellSpec, in_features: int, hidden_size: int, key: jax.Array, *,
                param_dtype=jnp.float32, forget_bias: float = 1.0,
                chrono_init: float | None = None) -> dict[str, jax.Array]:
    """Initial parameters of one cell, by the names of :func:`~lstm_lab.cells.param_shapes`.

    ``W``: LeCun normal (fan-in ``in_features``); ``R``: orthogonal per gate
    block; ``b``: zeros plus the retention bias below; peepholes: uniform in
    ``±1/sqrt(H)``; ``R_gates``: LeCun normal; ``b_hn``: zeros.

    ``forget_bias`` is added to the pre-activation of the gate that keeps the
    state: the LSTM, sLSTM and minLSTM forget gate (CIFG: subtracted from the input gate, since
    ``f = 1 - i``), the GRU update gate ``u``, and subtracted from the MGU gate
    ``f`` and the minGRU gate ``z`` (whose ``1 - f``, ``1 - z`` keep the state).
    ``chrono_init=T_max`` (Tallec & Ollivier 2018) replaces it: retention bias
    ``log(U[1, T_max - 1])``, and the LSTM (sLSTM, minLSTM) input gate bias its
    negative. minLSTM and minGRU have no ``R``; ``layer_norm``'s gains start at
    1 and the ``c`` norm's bias at 0.
    """
    H = hidden_size
    names = spec.gate_names()
    shapes = _cells.param_shapes(spec, in_features, H)
    k_w, k_r, k_p, k_g, k_c = jax.random.split(key, 5)
    params = {"W": jax.nn.initializers.lecun_normal()(k_w, shapes["W"], param_dtype)}
    if "R" in shapes and len(shapes["R"]) == 3:  # sLSTM heads: orthogonal per head and gate block
        k, dh, _ = shapes["R"]
        params["R"] = jnp.stack([
            jnp.concatenate([jax.nn.initializers.orthogonal()(kk, (dh, dh), param_dtype)
                             for kk in jax.random.split(kh, len(names))], axis=1)
            for kh in jax.random.split(k_r, k)])
    elif "R" in shapes:
        params["R"] = jnp.concatenate(
            [jax.nn.initializers.orthogonal()(k, (H, H), param_dtype)
             for k in jax.random.split(k_r, len(names))], axis=1)
    b = np.zeros((len(names), H), np.float64)
    idx = {g: j for j, g in enumerate(names)}
    if chrono_init is not None:
        retain = np.log(np.asarray(jax.random.uniform(k_c, (H,), jnp.float32, 1.0, chrono_init - 1.0)))
    else:
        retain = np.full((H,), float(forget_bias))
    if spec.family == "lstm":
        if spec.coupled:
            b[idx["i"]] = -retain
        else:
            if "f" in idx:
                b[idx["f"]] = retain
            if chrono_init is not None and "i" in idx:
                b[idx["i"]] = -retain
    elif spec.family == "gru":
        b[idx["u"]] = retain
    elif spec.family == "mgu":
        b[idx["f"]] = -retain
    elif spec.family in ("slstm", "minlstm"):
        b[idx["f"]] = retain
        if chrono_init is not None:
            b[idx["i"]] = -retain
    elif spec.family == "mingru":
        b[idx["z"]] = -retain
    params["b"] = jnp.asarray(b.reshape(-1), param_dtype)
    bound = 1.0 / math.sqrt(H)
    for j, p in enumerate(spec.peephole_names()):
        params[p] = jax.random.uniform(jax.random.fold_in(k_p, j), (H,), param_dtype, -bound, bound)
    if spec.full_gate_recurrence:
        params["R_gates"] = jax.nn.initializers.lecun_normal()(k_g, shapes["R_gates"], param_dtype)
    if spec.reset_after:
        params["b_hn"] = jnp.zeros((H,), param_dtype)
    if spec.layer_norm:  # gains 1, the c-norm's bias 0: LN starts as a plain normalization
        params.update({k: jnp.ones(shapes[k], param_dtype) for k in ("ln_x_g", "ln_h_g", "ln_c_g")})
        params["ln_c_b"] = jnp.zeros(shapes["ln_c_b"], param_dtype)
    assert {k: v.shape for k, v in params.items()} == shapes
    return params


# ---------------------------------------------------------------------------
# One direction of one layer, through a kernel (lstm_lab.kernels)
# ---------------------------------------------------------------------------
LAYER_OPTIONS = ("unroll", "remat")  # kernel options that are RNN arguments of their own


def _is_float_dtype(dt) -> bool:
    try:
        return jnp.issubdtype(jnp.dtype(dt), jnp.floating)
    except TypeError:
        return False


def chrono_unsupported(spec: CellSpec, chrono_init: float | None) -> str | None:
    """Why ``chrono_init`` cannot initialise this cell, or None (None means off)."""
    if chrono_init is None:
        return None
    if spec.family == "rnn":
        return "chrono_init needs a gated cell; cell 'rnn' has no gate."
    if not float(chrono_init) > 2.0:
        return f"chrono_init is T_max, the longest dependency, and must be > 2; got {chrono_init!r}."
    return None


def project(h: jax.Array, W: jax.Array, b: jax.Array, acc_dtype) -> jax.Array:
    """The input projection of all time steps at once: ``h [T, B, F] @ W + b`` accumulated in ``acc_dtype``."""
    return jnp.matmul(h, W, preferred_element_type=acc_dtype) + b


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _project_vjp(h, W, b, acc_dtype):
    """:func:`project` with its backward written as two plain matmuls over the flattened time and batch axes.

    What autodiff derives for ``dW`` compiled (XLA:CPU, jax 0.10) to a transposing copy of the whole ``[T, B, n*H]``
    gradient before the matmul: projection and backward 63 ms against 28 ms this way at T/B 100/32, 256 -> 1024
    (benchmarks/NOTES.md). A custom VJP has no forward mode, so the layer uses it only with kernels that have none
    either (``scan_vjp``, ``native``, ``pallas``)."""
    return project(h, W, b, acc_dtype)


def _project_fwd(h, W, b, acc_dtype):
    return project(h, W, b, acc_dtype), (h, W)


def _project_bwd(acc_dtype, res, dxp):
    h, W = res
    dh = jnp.matmul(dxp.astype(W.dtype), W.T, preferred_element_type=acc_dtype).astype(h.dtype)
    dW = jnp.matmul(h.reshape(-1, h.shape[-1]).T, dxp.reshape(-1, dxp.shape[-1]).astype(h.dtype),
                    preferred_element_type=acc_dtype).astype(W.dtype)
    return dh, dW, jnp.sum(dxp, axis=tuple(range(dxp.ndim - 1)))


_project_vjp.defvjp(_project_fwd, _project_bwd)


def _flip(a: jax.Array, lengths: jax.Array | None) -> jax.Array:
    """Reverse ``a`` ``[T, B, ...]`` in time, each sequence within its own length."""
    if lengths is None:
        return a[::-1]
    T = a.shape[0]
    t = jnp.arange(T)[:, None]
    idx = jnp.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)
    idx = idx.reshape(idx.shape + (1,) * (a.ndim - 2))
    return jnp.take_along_axis(a, idx, axis=0)


def run_direction(impl: "str | kernels.Kernel", spec: CellSpec, params: dict[str, jax.Array], xp: jax.Array,
                  carry0, *, lengths: jax.Array | None = None, reverse: bool = False, trace: bool = False,
                  noise: dict[str, jax.Array] | None = None, **options):
    """Run one direction of one layer over time with the kernel ``impl`` (a registered name or a
    :class:`~lstm_lab.kernels.Kernel`).

    Args:
      spec: the variant.
      params: the cell's parameters (``W`` is not used: its product is in ``xp``).
      xp: ``[T, B, n*H]`` projected inputs ``x @ W + b``.
      carry0: the initial carry, fields ``[B, size]``; its dtype is the dtype
        of the elementwise math.
      lengths: ``[B]`` int valid lengths in ``1..T``, or None (all ``T``).
      reverse: run each sequence's valid steps backwards; outputs are
        returned in the original time order.
      trace: also return the gate activations, each ``[T, B, H]`` (a kernel with a ``trace``).
      noise: training's in-step masks (:func:`lstm_lab.cells.draw_noise`: ``h_mask``, ``z_mask``, ``zc_mask``,
        ``zh_mask``; the per-step ones ``[T, B, H]`` in the original time order: the mask of time ``t`` goes
        with the step that reads ``x_t`` in either direction), for a kernel that takes in-step
        regularization (``scan``, ``scan_vjp``); None: evaluation.
      options: the kernel's (``unroll``; ``remat`` for ``scan_vjp``; the Pallas kernel's ``block_b``, ...).

    Returns:
      ``(ys [T, B, H], final_carry, traces or None)``; ``ys`` is zero past each
      sequence's end, as are the traces.
    """
    kernel = kernels.get(impl) if isinstance(impl, str) else impl
    if noise:
        noise = {k: (_flip(v, lengths) if reverse and k in _cells.PER_STEP_NOISE else v) for k, v in noise.items()}
        options = {**options, "noise": noise}
    if reverse:
        xp = _flip(xp, lengths)
    mask = None if lengths is None else jnp.arange(xp.shape[0])[:, None] < lengths[None, :]
    if trace:
        if kernel.trace is None:
            raise ValueError(f"impl={kernel.name!r} returns no gate traces (impl={kernels.DEFAULT!r} does).")
        ys, cf, tr = kernel.trace(spec, params, xp, carry0, mask, **options)
    else:
        (ys, cf), tr = kernel.run(spec, params, xp, carry0, mask, **options), None
    if reverse:
        ys = _flip(ys, lengths)
        tr = None if tr is None else {k: _flip(v, lengths) for k, v in tr.items()}
    return ys, cf, tr


# run_direction with one kernel each (the names these had before lstm_lab.kernels)
scan_cell = functools.partial(run_direction, "scan")
scan_cell_vjp = functools.partial(run_direction, "scan_vjp")
scan_cell_pallas = functools.partial(run_direction, "pallas")


# ---------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------
class RecurrentCell(nnx.Module):
    """The parameters of one cell (one layer, one direction) of :class:`RNN`.

    Attributes are :class:`flax.nnx.Param` named as in
    :func:`~lstm_lab.cells.param_shapes` (``W``, ``R``, ``b``, ``p_i``, ...).
    ``cell(carry, x_t) -> (carry, y_t)`` runs one step on a raw input
    ``x_t`` ``[batch..., in_features]`` (the Flax cell convention); the layer
    instead projects all steps at once and calls :func:`lstm_lab.cells.step`.
    """

    def __init__(self, spec: CellSpec, in_features: int, hidden_size: int, *, param_dtype=jnp.float32,
                 forget_bias: float = 1.0, chrono_init: float | None = None, rngs: nnx.Rngs):
        self.spec = spec
        self.in_features = in_features
        self.hidden_size = hidden_size
        values = init_params(spec, in_features, hidden_size, rngs.params(), param_dtype=param_dtype,
                             forget_bias=forget_bias, chrono_init=chrono_init)
        self._param_names = tuple(values)
        for name, value in values.items():
            setattr(self, name, nnx.Param(value))

    def params(self) -> dict[str, jax.Array]:
        """The parameter arrays by name."""
        return {name: getattr(self, name)[...] for name in self._param_names}

    def initialize_carry(self, batch_shape: Sequence[int] = (), dtype=jnp.float32):
        return _cells.zero_carry(self.spec, self.hidden_size, tuple(batch_shape), dtype)

    def __call__(self, carry, x_t):
        p = self.params()
        xp = jnp.matmul(x_t.astype(p["W"].dtype), p["W"]) + p["b"]
        return _cells.step(self.spec, p, carry, xp)


DEBUG_CHECKS_ENV = "LSTM_LAB_DEBUG_CHECKS"
_DEBUG_CHECKS: list[bool] = []


def debug_checks(on: bool | None = None) -> bool:
    """Run-time checks of values that are traced under ``jax.jit`` (today: ``seq_lengths`` in ``1..T``).

    Outside ``jit`` the layer checks ``seq_lengths`` on the host before the scan. Inside ``jit`` the
    values are tracers, so a length of 0 or > T would silently mask wrongly; with debug checks on
    (``debug_checks(True)``, or the environment variable ``LSTM_LAB_DEBUG_CHECKS=1`` at import) a
    host callback checks them on every call and the call fails with the same message. It costs a
    device-to-host copy per call: for debugging. Returns the current setting.
    """
    if on is not None:
        _DEBUG_CHECKS[:] = [bool(on)]
    if not _DEBUG_CHECKS:
        import os

        _DEBUG_CHECKS.append(os.environ.get(DEBUG_CHECKS_ENV, "") not in ("", "0", "false", "False"))
    return _DEBUG_CHECKS[0]


def _lengths_in_range(values, T: int) -> None:
    values = np.asarray(values)
    bad = np.argwhere((values < 1) | (values > T))
    if bad.size:
        at = tuple(int(i) for i in bad[0])
        raise ValueError(f"RNN: seq_lengths must be in 1..T = 1..{T}; got {int(values[at])} at "
                         f"index {at} ({bad.shape[0]} value(s) out of range).")


class RNN(nnx.Module):
    """A stack of recurrent layers of one cell variant, scanned over time.

    Args:
      in_features: feature size ``F`` of the input.
      hidden_size: ``H``, units per layer and direction.
      cell: a preset name of :data:`lstm_lab.VARIANTS` (``"lstm"``,
        ``"vanilla"``, ``"cifg"``, ``"gru"``, ...) or a :class:`CellSpec`.
      num_layers: stacked layers; layer ``l > 0`` reads layer ``l - 1``'s
        outputs (both directions concatenated).
      bidirectional: add a reverse direction per layer; outputs ``2*H``.
      dropout: dropout rate on the outputs of every layer but the last, when
        called with ``deterministic=False`` (as ``torch.nn.LSTM``).
      time_major: ``x`` is ``[time, batch..., F]`` instead of ``[batch..., time, F]``.
      dtype: compute dtype of the matmuls (e.g. ``jnp.bfloat16``); None takes
        the promotion of ``x`` and ``param_dtype``. The elementwise math and
        the carry run in float32 when ``dtype`` is a lower precision.
      param_dtype: dtype of the parameters.
      forget_bias: added to the retention gate's bias (see :func:`init_params`).
      chrono_init: ``T_max`` for chrono initialisation (Tallec & Ollivier 2018),
        or None.
      unroll: scan unroll factor.
      impl: a kernel of :mod:`lstm_lab.kernels`: ``"auto"`` (see
        :func:`~lstm_lab.kernels.resolve_impl`), ``"scan"`` (``lax.scan`` of the
        step, autodiff backward), ``"scan_vjp"`` (LSTM family: the same forward
        with a custom backward that keeps the weight gradients out of the loop),
        ``"pallas"`` (every cell: the whole loop in one Pallas kernel launch,
        forward and backward; Triton on GPU, interpret mode elsewhere; see
        :mod:`lstm_lab.kernels.pallas`), ``"native"`` (CPU, float32: the loop in
        C++ behind the XLA FFI, :mod:`lstm_lab.kernels.native`), or one added by
        :func:`lstm_lab.kernels.register`.
      remat: with ``scan_vjp``, save only the step inputs and recompute the
        recurrent product in the backward (less memory for long sequences).
      kernel_options: options of the kernel beyond ``unroll`` and ``remat``; with
        ``pallas``: ``block_b`` (batch rows per program, a power
        of two >= 16), ``block_h`` (split the hidden size across programs, for large
        H), ``block_k``, ``stream_weights``, ``num_warps``, ``interpret``,
        ``precision`` (see :func:`lstm_lab.kernels.pallas.vjp.fused_recurrence`).
        A kernel takes the ones it names (:attr:`lstm_lab.kernels.Kernel.options`).
      rngs: :class:`flax.nnx.Rngs` with a ``params`` stream (and ``dropout``
        when ``dropout > 0``).

    Call: ``y, carry = layer(x, seq_lengths=None, initial_carry=None, deterministic=True)``

      * ``x``: ``[batch..., T, F]`` floating point, one or more batch axes.
      * ``seq_lengths``: int ``[batch...]`` in ``1..T``. Past each sequence's
        end the carry is frozen and the outputs are zero. Checked before the
        scan when the values are concrete; under ``jax.jit`` they are tracers
        and are checked only with :func:`debug_checks` on.
      * ``initial_carry``: as returned, or None for zeros.
      * ``y``: ``[batch..., T, H]`` (``2*H`` bidirectional), in ``dtype``.
      * ``carry``: a tuple over layers of tuples over directions (forward,
        then reverse) of the cell's state: ``carry[layer][direction]`` is an
        :class:`~lstm_lab.cells.LSTMState` ``(h, c)`` (FGR:
        :class:`~lstm_lab.cells.FGRState` ``(h, c, gates)``; GRU, MGU, RNN:
        :class:`~lstm_lab.cells.HiddenState` ``(h,)``), each field
        ``[batch..., size]`` at each sequence's own last step (the reverse
        direction's last step is time 0). Kept in float32 for bf16 compute.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> import lstm_lab
        >>> layer = lstm_lab.RNN(3, 8, "cifg", num_layers=2, rngs=nnx.Rngs(0))
        >>> x = jnp.ones((4, 10, 3))
        >>> y, carry = layer(x, seq_lengths=jnp.array([10, 7, 3, 1]))
        >>> y.shape, carry[1][0].h.shape, carry[1][0].c.shape
        ((4, 10, 8), (4, 8), (4, 8))

    .. warning:: Gate order inside ``W``/``R``/``b`` is ``i, f, z, o`` (as
       PyTorch's ``i, f, g, o``) and there is one bias (PyTorch has two, use
       :func:`lstm_lab.interop.from_torch`); the carry is ``(h, c)`` where
       Flax's is ``(c, h)``.
    """

    def __init__(self, in_features: int, hidden_size: int, cell: "str | CellSpec" = "lstm", *,
                 num_layers: int = 1, bidirectional: bool = False, dropout: float = 0.0,
                 time_major: bool = False, dtype=None, param_dtype=jnp.float32,
                 forget_bias: float = 1.0, chrono_init: float | None = None, unroll: int = 1,
                 impl: str = "auto", remat: bool = False, kernel_options: dict | None = None,
                 rngs: nnx.Rngs):
        spec = resolve_cell(cell)
        for name, value in (("in_features", in_features), ("hidden_size", hidden_size),
                            ("num_layers", num_layers), ("unroll", unroll)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RNN: {name} must be a positive int; got {value!r}.")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"RNN: dropout must be in [0, 1); got {dropout!r}.")
        why = chrono_unsupported(spec, chrono_init)
        if why:
            raise ValueError(f"RNN: {why}")
        for name, dt in (("dtype", dtype), ("param_dtype", param_dtype)):
            if dt is not None and not _is_float_dtype(dt):
                raise TypeError(f"RNN: {name} must be a floating-point dtype (jnp.float32, jnp.bfloat16, "
                                f"jnp.float64){' or None' if name == 'dtype' else ''}; got {dt!r}.")
        why = impl_unsupported(impl, spec, int(hidden_size), dtype=dtype, param_dtype=param_dtype,
                               kernel_options=kernel_options)
        if why:
            raise ValueError(f"RNN: {why}")
        if impl != "auto":
            kernels.get(impl).on_build(jax.default_backend(), dict(kernel_options or {}))
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"RNN: rngs must be an nnx.Rngs, e.g. nnx.Rngs(0); got {rngs!r}.")
        self.spec = spec
        self.in_features = int(in_features)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.bidirectional = bool(bidirectional)
        self.num_directions = 2 if bidirectional else 1
        self.dropout_rate = float(dropout)
        self.time_major = bool(time_major)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.unroll = int(unroll)
        self.impl = impl
        self.remat = bool(remat)
        self.kernel_options = dict(kernel_options or {})
        if self.kernel_options:  # what some kernel takes, less the layer's own arguments
            known = kernels.kernel_option_names(exclude=LAYER_OPTIONS)
            bad = sorted(set(self.kernel_options) - set(known))
            if bad:
                raise ValueError(f"RNN: unknown kernel_options {bad}; expected {', '.join(known)}.")
        layers = []
        for layer in range(self.num_layers):
            d_in = self.in_features if layer == 0 else self.num_directions * self.hidden_size
            layers.append(_List([
                RecurrentCell(spec, d_in, self.hidden_size, param_dtype=param_dtype, forget_bias=forget_bias,
                              chrono_init=chrono_init, rngs=rngs)
                for _ in range(self.num_directions)]))
        self.cells = _List(layers)
        self.dropout = nnx.Dropout(self.dropout_rate, rngs=rngs) if self.dropout_rate > 0 else None

    # -- carries ---------------------------------------------------------
    def initialize_carry(self, batch_shape: Sequence[int], dtype=None):
        """The zero carry for inputs with batch axes ``batch_shape`` (see the class docstring)."""
        dtype = dtype or _acc_dtype(self.dtype or self.param_dtype)
        return tuple(tuple(_cells.zero_carry(self.spec, self.hidden_size, tuple(batch_shape), dtype)
                           for _ in range(self.num_directions)) for _ in range(self.num_layers))

    def _carry_doc(self, batch_shape) -> str:
        ctype = _cells.carry_type(self.spec)
        fields = ", ".join(f"{k} {(*batch_shape, n)}"
                           for k, n in _cells.carry_shapes(self.spec, self.hidden_size).items())
        return (f"a tuple of num_layers={self.num_layers} tuples of num_directions={self.num_directions} "
                f"{ctype.__name__}({fields})")

    # -- input checks (before anything is traced) -------------------------
    def _check_x(self, x):
        if not hasattr(x, "dtype") or not hasattr(x, "shape"):
            x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(
                f"RNN: x must be a floating-point array; got dtype {x.dtype}. Cast it "
                f"(x.astype(jnp.float32)); token ids need an embedding first.")
        layout = "[time, batch..., features]" if self.time_major else "[batch..., time, features]"
        if x.ndim < 3:
            raise ValueError(
                f"RNN: x must have shape {layout} with at least one batch axis; got shape {tuple(x.shape)} "
                f"(rank {x.ndim}). Add a batch axis, e.g. x[None].")
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"RNN: x must have {self.in_features} features (in_features) on its last axis; "
                f"got shape {tuple(x.shape)}.")
        if self.time_major:
            T, batch_shape = x.shape[0], tuple(x.shape[1:-1])
        else:
            T, batch_shape = x.shape[-2], tuple(x.shape[:-2])
        if T < 1 or 0 in batch_shape:
            raise ValueError(f"RNN: x has an empty time or batch axis: shape {tuple(x.shape)} {layout}.")
        return x, batch_shape, T

    def _check_lengths(self, seq_lengths, batch_shape, T):
        if seq_lengths is None:
            return None
        if not hasattr(seq_lengths, "dtype"):
            seq_lengths = jnp.asarray(seq_lengths)
        if tuple(seq_lengths.shape) != batch_shape:
            raise ValueError(f"RNN: seq_lengths must have shape (batch...) = {batch_shape}; "
                             f"got {tuple(seq_lengths.shape)}.")
        if not jnp.issubdtype(seq_lengths.dtype, jnp.integer):
            raise TypeError(f"RNN: seq_lengths must be integers; got dtype {seq_lengths.dtype}.")
        try:
            values = np.asarray(seq_lengths)
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            values = None  # under jit the values are not known here: checked at run time in debug mode only
        if values is not None:
            _lengths_in_range(values, T)
        elif debug_checks():
            jax.debug.callback(functools.partial(_lengths_in_range, T=T), seq_lengths)
        return seq_lengths

    def _check_carry(self, initial_carry, batch_shape):
        if initial_carry is None:
            return None
        expected = self.initialize_carry(batch_shape)
        if jax.tree.structure(initial_carry) != jax.tree.structure(expected):
            raise ValueError(f"RNN: initial_carry must be {self._carry_doc(batch_shape)}, as returned by "
                             f"layer(...) or layer.initialize_carry; got {_describe_tree(initial_carry)}.")
        for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(initial_carry)[0],
                                     jax.tree.leaves(expected)):
            if tuple(jnp.shape(got)) != want.shape:
                raise ValueError(f"RNN: initial_carry{jax.tree_util.keystr(path)} must have shape "
                                 f"{want.shape}; got {tuple(jnp.shape(got))}. Expected "
                                 f"{self._carry_doc(batch_shape)}.")
        return initial_carry

    # -- forward -----------------------------------------------------------
    def _forward(self, x, batch_shape, T, lengths, initial_carry, deterministic, trace_at=None, dropout_key=None):
        cd = jnp.dtype(self.dtype) if self.dtype is not None else jnp.result_type(x.dtype, self.param_dtype)
        acc = _acc_dtype(cd)
        B = math.prod(batch_shape)
        F = x.shape[-1]
        h = x.reshape(T, B, F) if self.time_major else jnp.swapaxes(x.reshape(B, T, F), 0, 1)
        h = h.astype(cd)
        flat_len = None if lengths is None else lengths.reshape(B).astype(jnp.int32)
        finals = []
        options = {"unroll": self.unroll, "remat": self.remat, **self.kernel_options}
        training_noise = not deterministic and self.spec.stochastic()
        if training_noise and dropout_key is None:
            raise ValueError(f"RNN: deterministic=False with the cell's regularization "
                             f"({', '.join(f'{k}={v}' for k, v in self.spec.regularizers().items())}) needs "
                             f"dropout_key=<a jax.random key> for its masks.")
        for li, layer_cells in enumerate(self.cells):
            outs, layer_final = [], []
            for d, cell in enumerate(layer_cells):
                p = cell.params()
                p = {k: v.astype(cd if k in ("W", "R", "R_gates") else acc) for k, v in p.items()}
                kernel = kernels.resolve(self.impl, self.spec, hidden_size=self.hidden_size, dtype=cd,
                                         trace=trace_at == (li, d))
                noise, h_in = None, h
                if training_noise:
                    noise = self.noise(dropout_key, li, d, T, B, acc)
                    if "x_mask" in noise:
                        h_in = h * noise.pop("x_mask")[None].astype(cd)
                    if "R_mask" in noise:
                        p["R"] = p["R"] * noise.pop("R_mask").astype(cd)
                proj = project if kernel.forward_mode else _project_vjp
                if self.spec.layer_norm:
                    xp = _cells.input_preactivations(self.spec, proj(h_in, p["W"], jnp.zeros_like(p["b"]), acc), p)
                else:
                    xp = proj(h_in, p["W"], p["b"], acc)
                if initial_carry is None:
                    c0 = _cells.zero_carry(self.spec, self.hidden_size, (B,), acc)
                else:
                    c0 = jax.tree.map(lambda a: jnp.asarray(a).reshape(B, a.shape[-1]).astype(acc),
                                      initial_carry[li][d])
                want_trace = trace_at == (li, d)
                ys, cf, tr = run_direction(kernel, self.spec, p, xp, c0, lengths=flat_len, reverse=d == 1,
                                           trace=want_trace, noise=noise, **kernel.options_from(options))
                if want_trace:
                    return {k: self._unflatten(v, batch_shape, T) for k, v in tr.items()}
                outs.append(ys.astype(cd))
                layer_final.append(jax.tree.map(lambda a: a.reshape(*batch_shape, a.shape[-1]), cf))
            h = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)
            if self.dropout is not None and li < self.num_layers - 1 and not deterministic:
                key = None if dropout_key is None else jax.random.fold_in(dropout_key, li)
                h = self.dropout(h, deterministic=False, rngs=key)
            finals.append(tuple(layer_final))
        return self._unflatten(h, batch_shape, T), tuple(finals)

    def noise(self, dropout_key: jax.Array, layer: int, direction: int, T: int, B: int, dtype=jnp.float32) -> dict:
        """The training masks of the cell's regularization that ``layer(x, deterministic=False,
        dropout_key=dropout_key)`` draws for ``layer``/``direction`` (:func:`lstm_lab.cells.draw_noise`), for a
        flat batch of ``B`` sequences of ``T`` steps: for tests and for looking at them."""
        key = jax.random.fold_in(jax.random.fold_in(dropout_key, 0x5EED), 2 * layer + direction)
        cell = self.cells[layer][direction]
        return _cells.draw_noise(self.spec, key, T, B, cell.W.shape[0], cell.R.shape, dtype)

    def _unflatten(self, a, batch_shape, T):
        """``[T, B, K]`` -> the layer's layout with the batch axes restored."""
        K = a.shape[-1]
        if self.time_major:
            return a.reshape(T, *batch_shape, K)
        return jnp.swapaxes(a, 0, 1).reshape(*batch_shape, T, K)

    def __call__(self, x, seq_lengths=None, initial_carry=None, deterministic: bool = True, *,
                 dropout_key: jax.Array | None = None):
        """See the class docstring. ``dropout_key``: a PRNG key for the dropout between layers
        (``deterministic=False``); without one, the layer's own ``dropout`` rng stream is used."""
        x, batch_shape, T = self._check_x(x)
        lengths = self._check_lengths(seq_lengths, batch_shape, T)
        initial_carry = self._check_carry(initial_carry, batch_shape)
        return self._forward(x, batch_shape, T, lengths, initial_carry, deterministic, dropout_key=dropout_key)


def _describe_tree(tree) -> str:
    try:
        return str(jax.tree.map(lambda a: tuple(jnp.shape(a)), tree))
    except Exception:  # noqa: BLE001 - only for the message
        return repr(type(tree))


def gate_trace(layer: RNN, x, *, layer_index: int = 0, direction: int = 0, **call_kwargs) -> dict[str, jax.Array]:
    """Every gate of one layer and direction of ``layer`` over time.

    Runs ``layer`` on ``x`` (``call_kwargs`` as for ``layer(x, ...)``:
    ``seq_lengths``, ``initial_carry``, ``deterministic``, ``dropout_key``: with
    ``deterministic=False`` and a key, the activations of training with the cell's
    regularization masks) and returns the
    activations of layer ``layer_index``, direction ``direction`` (0 forward,
    1 reverse), each ``[batch..., T, H]`` (``[T, batch..., H]`` for a
    time-major layer) in float32 (float64 for float64 compute):

    * LSTM family: ``i, f, o`` (gates), ``z`` (block input after ``g``),
      ``c`` (cell state), ``y`` (output). A gate the variant removes is ones;
      CIFG's ``f`` is ``1 - i``.
    * GRU: ``r, u, n, h``; MGU: ``f, n, h``; RNN: ``h``.
    * sLSTM: ``i, f`` (the stabilized gates applied), ``o``, ``z``, ``c``, ``n``, ``m``, ``y``;
      minLSTM: ``f, i`` (normalized), ``n`` (``g`` of the candidate), ``h``; minGRU: ``z, n, h``.

    Past each sequence's end (``seq_lengths``) every trace is zero.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import lstm_lab
    >>> layer = lstm_lab.RNN(2, 4, "nig", rngs=nnx.Rngs(0))
    >>> tr = lstm_lab.gate_trace(layer, jnp.ones((1, 5, 2)))
    >>> sorted(tr), tr["i"].shape, bool((tr["i"] == 1).all())
    (['c', 'f', 'i', 'o', 'y', 'z'], (1, 5, 4), True)
    """
    if not isinstance(layer, RNN):
        raise TypeError(f"gate_trace: layer must be an lstm_lab.RNN; got {type(layer).__name__}.")
    if not 0 <= layer_index < layer.num_layers:
        raise ValueError(f"gate_trace: layer_index must be in 0..{layer.num_layers - 1}; got {layer_index}.")
    if not 0 <= direction < layer.num_directions:
        raise ValueError(f"gate_trace: direction must be in 0..{layer.num_directions - 1} "
                         f"(bidirectional={layer.bidirectional}); got {direction}.")
    unknown = set(call_kwargs) - {"seq_lengths", "initial_carry", "deterministic", "dropout_key"}
    if unknown:
        raise TypeError(f"gate_trace: unknown keyword(s) {sorted(unknown)}; expected seq_lengths, "
                        f"initial_carry, deterministic, dropout_key.")
    x, batch_shape, T = layer._check_x(x)
    lengths = layer._check_lengths(call_kwargs.get("seq_lengths"), batch_shape, T)
    carry = layer._check_carry(call_kwargs.get("initial_carry"), batch_shape)
    return layer._forward(x, batch_shape, T, lengths, carry, call_kwargs.get("deterministic", True),
                          trace_at=(layer_index, direction), dropout_key=call_kwargs.get("dropout_key"))
