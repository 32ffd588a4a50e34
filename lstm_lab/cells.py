"""The variant space as data, and the pure per-step math of every cell family.

A cell variant is a value, not a subclass: :class:`CellSpec` is a frozen
dataclass of flags, every named preset in :data:`VARIANTS` is one instance, and
any other combination of the LSTM-family flags is a valid cell too.

LSTM family (Greff et al. 2017, "LSTM: A Search Space Odyssey"), with ``x_t``
the input, ``y_{t-1}`` the previous output (``h`` in the carry), ``c`` the cell
state, ``g`` the input activation, ``h`` the output activation, ``s`` the
logistic sigmoid and ``p_*`` peephole weight vectors::

    z_t = g(W_z x_t + R_z y_{t-1} + b_z)                    block input
    i_t = s(W_i x_t + R_i y_{t-1} + p_i * c_{t-1} + b_i)    input gate
    f_t = s(W_f x_t + R_f y_{t-1} + p_f * c_{t-1} + b_f)    forget gate
    c_t = z_t * i_t + c_{t-1} * f_t
    o_t = s(W_o x_t + R_o y_{t-1} + p_o * c_t + b_o)        output gate (peeps at c_t)
    y_t = h(c_t) * o_t

Flags remove a gate (it becomes the constant 1), replace ``g`` or ``h`` by the
identity, add peepholes, couple the forget gate to the input gate
(``f_t = 1 - i_t``, CIFG) or add the full gate recurrence (FGR: each gate's
pre-activation also receives the previous step's gate activations through
``R_gates``).

Parameter layout (shared by every implementation; the names are stable):

* ``W`` ``[in, n*H]``, ``R`` ``[H, n*H]``, ``b`` ``[n*H]``: the gates of
  :meth:`CellSpec.gate_names` side by side, in that order. For the LSTM family
  the order is ``i, f, z, o`` (PyTorch's and Flax's ``i, f, g, o``), with the
  gates a variant removes left out. GRU: ``r, u, n`` (PyTorch's ``r, z, n``).
  MGU: ``f, n``. RNN: ``h``.
* ``p_i``, ``p_f``, ``p_o`` ``[H]``: peepholes of the gates that exist.
* ``R_gates`` ``[k*H, k*H]`` (FGR only): previous activations of the ``k``
  computed sigmoid gates (:meth:`CellSpec.recurrent_gate_names`) into the
  pre-activations of the same gates. A removed gate is the constant 1, whose
  contribution would only shift a bias, and CIFG's ``f = 1 - i`` is linear in
  ``i``; neither is fed.
* ``b_hn`` ``[H]`` (GRU with ``reset_after`` only): the recurrent bias of the
  candidate, inside the reset gate, as in cuDNN and PyTorch.
* ``ln_x_g``, ``ln_h_g`` ``[n*H]``, ``ln_c_g``, ``ln_c_b`` ``[H]`` (``layer_norm``
  only): the gains of the normalized ``W x`` and ``R y`` blocks, the gain and
  bias of the normalized ``c`` (:class:`CellSpec`'s regularization fields).

Modern families (their fields ``num_heads`` and ``exp_forget`` belong to ``slstm`` only):

* ``slstm``: xLSTM's sLSTM (Beck et al. 2024), exponential input gate with a
  normalizer state ``n`` and a stabilizer state ``m`` (log-space max trick)::

      z~, i~, f~, o~ = W x_t + R y_{t-1} + b          (R block-diagonal over num_heads)
      log f = log s(f~)   (exp_forget: f~)
      m_t = max(log f + m_{t-1}, i~)                   (i~ where n_{t-1} = 0, the first step; f' = 1 there)
      i' = exp(i~ - m_t),  f' = exp(log f + m_{t-1} - m_t)
      c_t = f' * c_{t-1} + i' * tanh(z~),  n_t = f' * n_{t-1} + i'
      y_t = s(o~) * c_t / n_t

  ``c`` and ``n`` are the paper's states scaled by ``exp(-m_t)``: ``y`` is the
  unstabilized cell's, and nothing overflows however large ``i~`` grows. Only the
  cell; the xLSTM block's convolution, group norm and up-projection are not part of it.
  Gate order ``i, f, z, o``; with ``num_heads = k > 1``, ``R`` is
  ``[k, H/k, 4*H/k]``: head ``j`` maps units ``j*H/k..`` of ``y`` to the same
  units of each gate (gate-major columns ``i, f, z, o`` within the head).
* ``minlstm`` and ``mingru`` (Feng et al. 2024, "Were RNNs All We Needed?"):
  gates and candidate from ``x_t`` only, so there is no ``R``, and the recurrence
  is linear in ``h``, which ``impl="parallel"`` computes with a parallel scan::

      minlstm:  f = s(f~), i = s(i~), f' = f / (f + i), i' = i / (f + i)
                h_t = f' * h_{t-1} + i' * g(n~)
      mingru:   z = s(z~),  h_t = (1 - z) * h_{t-1} + z * g(n~)

  with the paper's normalization of ``f`` and ``i`` (minLSTM: ``f' + i' = 1``, so
  ``h`` does not grow with time) and its log-space candidate ``g(a) = a + 1/2``
  for ``a >= 0``, ``s(a)`` otherwise (positive, so the parallel scan runs in log
  space). Gate order ``f, i, n`` and ``z, n``.

The input projection ``x_t @ W + b`` is not part of the step: the layer
computes it for all time steps in one matmul before the scan, and
:func:`step` receives its result ``xp_t``.

.. warning:: The LSTM carry is ``LSTMState(h, c)``: hidden first, as in
   PyTorch's ``(h_n, c_n)``; Flax's LSTM carry is ``(c, h)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from lstm_lab._hints import did_you_mean

__all__ = [
    "CellSpec",
    "VARIANTS",
    "FAMILIES",
    "ACTIVATIONS",
    "LSTMState",
    "FGRState",
    "HiddenState",
    "SLSTMState",
    "resolve_cell",
    "step",
    "param_shapes",
    "carry_shapes",
    "trace_names",
]

FAMILIES = ("lstm", "gru", "mgu", "rnn", "slstm", "minlstm", "mingru")

#: Families whose gates and candidate see only the input (no ``R``): a recurrence linear in ``h``.
INPUT_ONLY = ("minlstm", "mingru")

#: Activation functions a spec may name for ``g`` (input) and ``h`` (output).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh,
    "identity": lambda a: a,
    "sigmoid": jax.nn.sigmoid,
    "relu": jax.nn.relu,
    "softsign": jax.nn.soft_sign,
}

# Fields that only the LSTM family uses, with their defaults.
_LSTM_FLAGS = {
    "input_gate": True,
    "forget_gate": True,
    "output_gate": True,
    "peepholes": False,
    "coupled": False,
    "full_gate_recurrence": False,
    "input_activation": "tanh",
    "output_activation": "tanh",
}

# Fields that only the sLSTM uses, with their defaults.
_SLSTM_FLAGS = {"num_heads": 1, "exp_forget": False}

# Regularization fields: the rates, and the families each applies to.
_RATES = ("recurrent_dropout", "variational_dropout", "zoneout_c", "zoneout_h", "weight_drop")
_REGULARIZER_FAMILIES = {
    "layer_norm": ("lstm",),
    "recurrent_dropout": ("lstm", "gru"),
    "variational_dropout": ("lstm", "gru", "mgu", "rnn"),
    "zoneout_c": ("lstm",),
    "zoneout_h": ("lstm", "gru", "mgu", "rnn"),
    "weight_drop": ("lstm", "gru", "mgu", "rnn"),
}
#: The regularization fields whose math is inside the step (a kernel must implement them); weight_drop, and
#: variational_dropout's input mask, are applied by the layer around any kernel.
IN_STEP_REGULARIZERS = ("layer_norm", "recurrent_dropout", "variational_dropout", "zoneout_c", "zoneout_h")


@dataclasses.dataclass(frozen=True)
class CellSpec:
    """One recurrent cell variant, as a frozen set of flags.

    Attributes:
      family: ``"lstm"`` (every LSTM-family flag applies), ``"gru"``, ``"mgu"``,
        ``"rnn"`` (tanh RNN), ``"slstm"``, ``"minlstm"`` or ``"mingru"`` (the module docstring).
      input_gate: LSTM: keep ``i_t``; ``False`` makes it the constant 1 (NIG).
      forget_gate: LSTM: keep ``f_t``; ``False`` makes it 1 (NFG).
      output_gate: LSTM: keep ``o_t``; ``False`` makes it 1 (NOG).
      peepholes: LSTM: add ``p_i * c_{t-1}``, ``p_f * c_{t-1}``, ``p_o * c_t``
        to the gates that exist.
      coupled: LSTM: ``f_t = 1 - i_t`` (CIFG); needs ``input_gate`` and
        ``forget_gate``.
      full_gate_recurrence: LSTM: FGR, the previous step's gate activations
        feed every gate through ``R_gates``.
      input_activation: LSTM ``g``, a name in :data:`ACTIVATIONS` (NIAF:
        ``"identity"``).
      output_activation: LSTM ``h`` (NOAF: ``"identity"``).
      reset_after: GRU only: apply the reset gate after the recurrent matmul,
        ``n = tanh(W_n x + b_n + r * (R_n h + b_hn))`` (cuDNN, PyTorch),
        instead of Cho et al.'s ``n = tanh(W_n x + b_n + R_n (r * h))``.
      num_heads: sLSTM only: ``R`` block-diagonal with this many heads (it must divide the hidden size).
      exp_forget: sLSTM only: exponential forget gate ``f = exp(f~)`` instead of ``s(f~)``.

    Regularization inside the recurrence (rates in ``[0, 1)``; 0 is off). Training draws the masks from the
    layer's ``dropout_key`` (``RNN(...)(x, deterministic=False, dropout_key=key)``); evaluation uses none
    (zoneout: its expectation):

      layer_norm: LSTM family: LayerNorm-LSTM (Ba, Kiros, Hinton 2016): ``W x`` and ``R y_{t-1}`` normalized
        per gate block, each with a learned gain (``ln_x_g``, ``ln_h_g`` ``[n*H]``; their biases are ``b``),
        and ``c_t`` before the output activation (``ln_c_g``, ``ln_c_b`` ``[H]``): ``y = o * h(LN(c))``.
        The FGR term ``R_gates`` and the peepholes are added unnormalized.
      recurrent_dropout: LSTM family and GRU: dropout on the block input ``z`` (GRU: the candidate ``n``)
        only, a fresh mask every step (Semeniuta et al. 2016).
      variational_dropout: LSTM family, GRU, MGU, RNN: one mask per sequence on the layer's input ``x`` and
        one on ``y_{t-1}`` where it enters ``R``, the same at every step (Gal & Ghahramani 2016).
      zoneout_c, zoneout_h: LSTM family (``c`` and ``h``); GRU, MGU, RNN (``h`` only): each unit keeps its
        previous value with this probability, a fresh mask every step (Krueger et al. 2016); ``h`` is
        computed from the new ``c`` before ``c`` is zoned out, as in the paper.
      weight_drop: LSTM family, GRU, MGU, RNN: DropConnect on ``R``, one mask per forward pass
        (AWD-LSTM, Merity et al. 2018).

    A contradictory spec raises ``ValueError`` naming both fields::

        >>> CellSpec(coupled=True, input_gate=False)
        Traceback (most recent call last):
        ...
        ValueError: CellSpec: coupled=True (f = 1 - i) derives the forget gate from the input gate, so it needs input_gate=True; got input_gate=False.
    """

    family: str = "lstm"
    input_gate: bool = True
    forget_gate: bool = True
    output_gate: bool = True
    peepholes: bool = False
    coupled: bool = False
    full_gate_recurrence: bool = False
    input_activation: str = "tanh"
    output_activation: str = "tanh"
    reset_after: bool = False
    num_heads: int = 1
    exp_forget: bool = False
    layer_norm: bool = False
    recurrent_dropout: float = 0.0
    variational_dropout: float = 0.0
    zoneout_c: float = 0.0
    zoneout_h: float = 0.0
    weight_drop: float = 0.0

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(
                f"CellSpec: unknown family {self.family!r}; expected one of "
                f"{', '.join(FAMILIES)}.{did_you_mean(str(self.family).lower(), FAMILIES)}")
        for name in ("input_gate", "forget_gate", "output_gate", "peepholes", "coupled",
                     "full_gate_recurrence", "reset_after", "exp_forget", "layer_norm"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"CellSpec: {name} must be a bool; got {value!r}.")
        for name in ("input_activation", "output_activation"):
            value = getattr(self, name)
            if value not in ACTIVATIONS:
                raise ValueError(
                    f"CellSpec: {name}={value!r} is not a known activation; expected one of "
                    f"{', '.join(ACTIVATIONS)}.{did_you_mean(str(value).lower(), ACTIVATIONS)}")
        if self.family != "lstm":
            for name, default in _LSTM_FLAGS.items():
                if getattr(self, name) != default:
                    raise ValueError(
                        f"CellSpec: {name}={getattr(self, name)!r} applies to the LSTM family only; "
                        f"it contradicts family={self.family!r}. Use family='lstm' or leave "
                        f"{name} at its default {default!r}.")
        for name in _RATES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"CellSpec: {name} is a rate in [0, 1); got {value!r}.")
        for name, families in _REGULARIZER_FAMILIES.items():
            if getattr(self, name) and self.family not in families:
                raise ValueError(
                    f"CellSpec: {name}={getattr(self, name)!r} applies to {', '.join(families)}; it contradicts "
                    f"family={self.family!r}.")
        if isinstance(self.num_heads, bool) or not isinstance(self.num_heads, int) or self.num_heads < 1:
            raise ValueError(f"CellSpec: num_heads must be an int >= 1; got {self.num_heads!r}.")
        if self.family != "slstm":
            for name, default in _SLSTM_FLAGS.items():
                if getattr(self, name) != default:
                    raise ValueError(
                        f"CellSpec: {name}={getattr(self, name)!r} applies to the sLSTM only; it contradicts "
                        f"family={self.family!r}. Use family='slstm' or leave {name} at its default {default!r}.")
        if self.reset_after and self.family != "gru":
            raise ValueError(
                f"CellSpec: reset_after=True applies to the GRU only; it contradicts "
                f"family={self.family!r}.")
        if self.coupled and not self.input_gate:
            raise ValueError(
                "CellSpec: coupled=True (f = 1 - i) derives the forget gate from the input gate, "
                "so it needs input_gate=True; got input_gate=False.")
        if self.coupled and not self.forget_gate:
            raise ValueError(
                "CellSpec: coupled=True (f = 1 - i) defines the forget gate, which contradicts "
                "forget_gate=False (f = 1). Drop one of the two.")
        if self.family == "lstm" and not (self.input_gate or self.forget_gate or self.output_gate):
            for name in ("peepholes", "full_gate_recurrence"):
                if getattr(self, name):
                    raise ValueError(
                        f"CellSpec: {name}=True needs at least one gate, but input_gate, "
                        f"forget_gate and output_gate are all False.")

    # -- structure -------------------------------------------------------
    def gate_names(self) -> tuple[str, ...]:
        """The blocks of ``W``, ``R`` and ``b``, in their order.

        >>> VARIANTS["cifg"].gate_names()
        ('i', 'z', 'o')
        """
        if self.family == "lstm":
            names = []
            if self.input_gate:
                names.append("i")
            if self.forget_gate and not self.coupled:
                names.append("f")
            names.append("z")
            if self.output_gate:
                names.append("o")
            return tuple(names)
        return {"gru": ("r", "u", "n"), "mgu": ("f", "n"), "rnn": ("h",), "slstm": ("i", "f", "z", "o"),
                "minlstm": ("f", "i", "n"), "mingru": ("z", "n")}[self.family]

    def regularizers(self) -> dict[str, Any]:
        """The regularization fields that are on, e.g. ``{"zoneout_h": 0.1, "layer_norm": True}``."""
        return {k: getattr(self, k) for k in ("layer_norm", *_RATES) if getattr(self, k)}

    def stochastic(self) -> bool:
        """Whether training draws masks (any rate > 0)."""
        return any(getattr(self, k) for k in _RATES)

    def recurrent_gate_names(self) -> tuple[str, ...]:
        """The sigmoid gates computed from parameters (the ones FGR feeds back)."""
        if self.family != "lstm":
            return ()
        return tuple(g for g in self.gate_names() if g != "z")

    def peephole_names(self) -> tuple[str, ...]:
        if not self.peepholes:
            return ()
        return tuple(f"p_{g}" for g in self.recurrent_gate_names())

    @property
    def name(self) -> str:
        """The preset name of this spec if it is one (the first alias), else a description."""
        for preset, spec in VARIANTS.items():
            if spec == self:
                return preset
        return self.describe()

    def describe(self) -> str:
        """Non-default fields, e.g. ``"lstm(input_gate=False, peepholes=True)"``."""
        fields = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                  if f.name != "family" and getattr(self, f.name) != f.default]
        return f"{self.family}({', '.join(fields)})"

    def flags(self) -> dict[str, Any]:
        """The fields of this spec as a dict (for configs, tables and databases)."""
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "CellSpec":
        """A copy with some fields changed (validated like a new spec)."""
        return dataclasses.replace(self, **changes)

    def num_params(self, in_features: int, hidden_size: int) -> int:
        """Number of parameters of one cell (one layer, one direction)."""
        return sum(math.prod(s) for s in param_shapes(self, in_features, hidden_size).values())


_VANILLA = CellSpec(peepholes=True)

#: The named presets. ``peephole`` is an alias of ``vanilla``; ``np`` equals ``lstm``.
VARIANTS: dict[str, CellSpec] = {
    "lstm": CellSpec(),
    "vanilla": _VANILLA,
    "peephole": _VANILLA,
    "nig": _VANILLA.replace(input_gate=False),
    "nfg": _VANILLA.replace(forget_gate=False),
    "nog": _VANILLA.replace(output_gate=False),
    "niaf": _VANILLA.replace(input_activation="identity"),
    "noaf": _VANILLA.replace(output_activation="identity"),
    "np": CellSpec(),
    "cifg": _VANILLA.replace(coupled=True),
    "fgr": _VANILLA.replace(full_gate_recurrence=True),
    "gru": CellSpec(family="gru"),
    "mgu": CellSpec(family="mgu"),
    "rnn": CellSpec(family="rnn"),
    "ln_lstm": CellSpec(layer_norm=True),
    "slstm": CellSpec(family="slstm"),
    "minlstm": CellSpec(family="minlstm"),
    "mingru": CellSpec(family="mingru"),
}

#: One line per preset, for tables and docs.
DESCRIPTIONS: dict[str, str] = {
    "lstm": "standard LSTM with forget gate, no peepholes (cuDNN, PyTorch, Flax)",
    "vanilla": "Odyssey baseline: lstm + peepholes",
    "peephole": "alias of vanilla",
    "nig": "no input gate (i = 1)",
    "nfg": "no forget gate (f = 1)",
    "nog": "no output gate (o = 1)",
    "niaf": "no input activation (g = identity)",
    "noaf": "no output activation (h = identity)",
    "np": "no peepholes (= lstm)",
    "cifg": "coupled input and forget gate (f = 1 - i)",
    "fgr": "full gate recurrence (gates see previous i, f, o)",
    "gru": "GRU, Cho et al. 2014: n = tanh(W x + R (r*h)) (cuDNN/PyTorch form: CellSpec(family=\"gru\", reset_after=True))",
    "mgu": "minimal gated unit, Zhou et al. 2016",
    "rnn": "tanh RNN",
    "ln_lstm": "LayerNorm-LSTM, Ba et al. 2016: W x, R y per gate block and c normalized",
    "slstm": "xLSTM's sLSTM, Beck et al. 2024: exponential input gate, normalizer and stabilizer states",
    "minlstm": "minLSTM, Feng et al. 2024: gates from x only, f and i normalized; impl='parallel' trains it in parallel",
    "mingru": "minGRU, Feng et al. 2024: gate and candidate from x only; impl='parallel' trains it in parallel",
}


def resolve_cell(cell: "str | CellSpec") -> CellSpec:
    """A :class:`CellSpec` from a preset name (case-insensitive) or a spec.

    >>> resolve_cell("CIFG") == VARIANTS["cifg"]
    True
    """
    if isinstance(cell, CellSpec):
        return cell
    if isinstance(cell, str):
        key = cell.strip().lower()
        if key in VARIANTS:
            return VARIANTS[key]
        raise ValueError(
            f"unknown cell preset {cell!r}; expected one of {', '.join(VARIANTS)} or a "
            f"CellSpec.{did_you_mean(key, VARIANTS)}")
    raise TypeError(f"cell must be a preset name or a CellSpec; got {type(cell).__name__}: {cell!r}")


# ---------------------------------------------------------------------------
# Carries
# ---------------------------------------------------------------------------
class LSTMState(NamedTuple):
    """Carry of an LSTM-family cell: output ``h`` (``y`` in the equations) and cell ``c``.

    Both ``[batch..., H]``. Order ``(h, c)`` as PyTorch's ``(h_n, c_n)``;
    Flax's LSTM carry is ``(c, h)``.
    """

    h: jax.Array
    c: jax.Array


class FGRState(NamedTuple):
    """Carry of an LSTM cell with full gate recurrence.

    ``h``, ``c`` as in :class:`LSTMState`; ``gates`` ``[batch..., k*H]`` holds
    the previous step's activations of :meth:`CellSpec.recurrent_gate_names`
    side by side (zeros before the first step).
    """

    h: jax.Array
    c: jax.Array
    gates: jax.Array


class SLSTMState(NamedTuple):
    """Carry of an sLSTM: output ``h``, cell ``c`` and normalizer ``n`` (both scaled by ``exp(-m)``), stabilizer
    ``m``; each ``[batch..., H]``. All zeros is the fresh state."""

    h: jax.Array
    c: jax.Array
    n: jax.Array
    m: jax.Array


class HiddenState(NamedTuple):
    """Carry of a GRU, MGU, tanh RNN, minLSTM or minGRU: the hidden state ``h`` ``[batch..., H]``."""

    h: jax.Array


def carry_type(spec: CellSpec) -> type:
    if spec.family == "lstm":
        return FGRState if spec.full_gate_recurrence else LSTMState
    if spec.family == "slstm":
        return SLSTMState
    return HiddenState


def carry_shapes(spec: CellSpec, hidden_size: int) -> dict[str, int]:
    """Feature size of each carry field (each field is ``[batch..., size]``)."""
    sizes = {"h": hidden_size}
    if spec.family == "lstm":
        sizes["c"] = hidden_size
        if spec.full_gate_recurrence:
            sizes["gates"] = len(spec.recurrent_gate_names()) * hidden_size
    if spec.family == "slstm":
        sizes.update(c=hidden_size, n=hidden_size, m=hidden_size)
    return sizes


def zero_carry(spec: CellSpec, hidden_size: int, batch_shape, dtype) -> Any:
    """The all-zeros carry for ``batch_shape``."""
    fields = {k: jnp.zeros((*batch_shape, n), dtype) for k, n in carry_shapes(spec, hidden_size).items()}
    return carry_type(spec)(**fields)


def param_shapes(spec: CellSpec, in_features: int, hidden_size: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of one cell.

    >>> param_shapes(VARIANTS["vanilla"], 3, 2)
    {'W': (3, 8), 'R': (2, 8), 'b': (8,), 'p_i': (2,), 'p_f': (2,), 'p_o': (2,)}
    """
    H = hidden_size
    n = len(spec.gate_names())
    shapes = {"W": (in_features, n * H), "R": (H, n * H), "b": (n * H,)}
    if spec.family in INPUT_ONLY:
        del shapes["R"]
    if spec.family == "slstm" and spec.num_heads > 1:
        k = spec.num_heads
        if H % k:
            raise ValueError(f"CellSpec: num_heads={k} must divide the hidden size; got hidden_size={H}.")
        shapes["R"] = (k, H // k, n * H // k)
    for p in spec.peephole_names():
        shapes[p] = (H,)
    if spec.full_gate_recurrence:
        k = len(spec.recurrent_gate_names())
        shapes["R_gates"] = (k * H, k * H)
    if spec.reset_after:
        shapes["b_hn"] = (H,)
    if spec.layer_norm:
        shapes.update(ln_x_g=(n * H,), ln_h_g=(n * H,), ln_c_g=(H,), ln_c_b=(H,))
    return shapes


def trace_names(spec: CellSpec) -> tuple[str, ...]:
    """Keys of the dict that ``step(..., trace=True)`` and ``gate_trace`` return."""
    return {"lstm": ("i", "f", "o", "z", "c", "y"), "gru": ("r", "u", "n", "h"),
            "mgu": ("f", "n", "h"), "rnn": ("h",), "slstm": ("i", "f", "o", "z", "c", "n", "m", "y"),
            "minlstm": ("f", "i", "n", "h"), "mingru": ("z", "n", "h")}[spec.family]


# ---------------------------------------------------------------------------
# The per-step math: the single source of truth
# ---------------------------------------------------------------------------
def _split(a: jax.Array, names: tuple[str, ...]) -> dict[str, jax.Array]:
    H = a.shape[-1] // len(names)
    return {n: a[..., j * H:(j + 1) * H] for j, n in enumerate(names)}


def _mm(h: jax.Array, w: jax.Array, acc_dtype) -> jax.Array:
    """``h @ w`` with ``h`` cast to ``w``'s dtype, accumulated in ``acc_dtype``."""
    return jnp.matmul(h.astype(w.dtype), w, preferred_element_type=acc_dtype)


LN_EPS = 1e-5  # LayerNorm's variance epsilon (PyTorch's default)


def layer_norm(a: jax.Array, blocks: int = 1) -> jax.Array:
    """``a [..., blocks*H]`` normalized to zero mean and unit variance within each block of ``H`` (no gain)."""
    shape = a.shape
    a = a.reshape(*shape[:-1], blocks, shape[-1] // blocks)
    mu = jnp.mean(a, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(a - mu), axis=-1, keepdims=True)
    return ((a - mu) * jax.lax.rsqrt(var + LN_EPS)).reshape(shape)


def input_preactivations(spec: CellSpec, xw: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
    """``W x + b`` from ``xw = x @ W`` for every step at once, with ``layer_norm``'s normalization of the input
    part (the layer calls this before the kernel; ``xp_t`` of :func:`step` is its result)."""
    b = params["b"].astype(xw.dtype)
    if spec.layer_norm:
        return layer_norm(xw, len(spec.gate_names())) * params["ln_x_g"].astype(xw.dtype) + b
    return xw + b


def lstm_pointwise(spec: CellSpec, a: dict[str, jax.Array], c_prev: jax.Array,
                   peep: dict[str, jax.Array], *, ln_c: tuple | None = None, z_mask: jax.Array | None = None):
    """The elementwise part of an LSTM-family step, from the gates' pre-activations.

    ``a``: gate name -> ``W x + R y_prev (+ R_gates gates_prev) + b``, each ``[..., H]``;
    ``peep``: ``p_i``/``p_f``/``p_o`` -> ``[H]`` (empty without peepholes). Returns
    ``(c, y, acts)`` with ``acts`` the activations ``i, f, z, o`` (None for a removed gate).
    :func:`step` and the fused kernels (:mod:`lstm_lab.kernels`) both call this. ``ln_c``: ``(gain, bias)``
    of ``layer_norm``'s normalization of ``c`` before the output activation; ``z_mask``: recurrent dropout's
    (scaled) mask on the block input.
    """
    i = jax.nn.sigmoid(a["i"] + peep["p_i"] * c_prev if "p_i" in peep else a["i"]) if spec.input_gate else None
    if spec.coupled:
        f = 1.0 - i
    elif spec.forget_gate:
        f = jax.nn.sigmoid(a["f"] + peep["p_f"] * c_prev if "p_f" in peep else a["f"])
    else:
        f = None
    z = ACTIVATIONS[spec.input_activation](a["z"])
    zd = z if z_mask is None else z * z_mask
    c = (zd if i is None else zd * i) + (c_prev if f is None else c_prev * f)
    o = jax.nn.sigmoid(a["o"] + peep["p_o"] * c if "p_o" in peep else a["o"]) if spec.output_gate else None
    hc = ACTIVATIONS[spec.output_activation](c if ln_c is None else layer_norm(c) * ln_c[0] + ln_c[1])
    y = hc if o is None else hc * o
    return c, y, {"i": i, "f": f, "z": z, "o": o}


def gru_gates(a_r: jax.Array, a_u: jax.Array):
    """GRU reset and update gates from their pre-activations."""
    return jax.nn.sigmoid(a_r), jax.nn.sigmoid(a_u)


def gru_candidate(spec: CellSpec, x_n, q, r, u, h_prev, b_hn=None):
    """GRU candidate and output. ``q`` is ``R_n h_prev`` (``reset_after``) or ``R_n (r * h_prev)``."""
    if spec.reset_after:
        n = jnp.tanh(x_n + r * (q + b_hn.astype(q.dtype)))
    else:
        n = jnp.tanh(x_n + q)
    return n, (1.0 - u) * n + u * h_prev


def mgu_gate(a_f: jax.Array) -> jax.Array:
    """MGU's forget gate from its pre-activation."""
    return jax.nn.sigmoid(a_f)


def mgu_candidate(x_n, q, f, h_prev):
    """MGU candidate and output. ``q`` is ``R_n (f * h_prev)``."""
    n = jnp.tanh(x_n + q)
    return n, (1.0 - f) * h_prev + f * n


def log_g(a: jax.Array) -> jax.Array:
    """``log g(a)`` for the min* candidate ``g`` (:func:`min_g`), computed without forming ``g``."""
    return jnp.where(a >= 0, jnp.log(jax.nn.relu(a) + 0.5), -jax.nn.softplus(-a))


def min_g(a: jax.Array) -> jax.Array:
    """The minLSTM/minGRU candidate activation of the paper's log-space form: ``a + 1/2`` for ``a >= 0``, else
    ``s(a)``: continuous, increasing and positive."""
    return jnp.where(a >= 0, a + 0.5, jax.nn.sigmoid(a))


def min_coefficients(spec: CellSpec, a: dict[str, jax.Array]):
    """``(log_a, log_b)`` of the min* recurrence ``h_t = a_t * h_{t-1} + b_t`` from the pre-activations ``a``
    (``W x + b`` per gate), computed in log space: minLSTM ``a = f / (f + i)``, ``b = i / (f + i) * g(n~)``;
    minGRU ``a = 1 - z``, ``b = z * g(n~)``."""
    if spec.family == "minlstm":
        d = jax.nn.softplus(-a["f"]) - jax.nn.softplus(-a["i"])  # log i - log f
        log_a, log_i = -jax.nn.softplus(d), -jax.nn.softplus(-d)
    else:
        log_a, log_i = -jax.nn.softplus(a["z"]), -jax.nn.softplus(-a["z"])
    return log_a, log_i + log_g(a["n"])


def slstm_recurrent(spec: CellSpec, h_prev: jax.Array, R: jax.Array, acc_dtype) -> jax.Array:
    """``y_{t-1} @ R`` in the gate layout ``[..., 4H]`` (``R`` block-diagonal over ``num_heads``)."""
    if spec.num_heads == 1:
        return _mm(h_prev, R, acc_dtype)
    k, dh, _ = R.shape
    hh = h_prev.reshape(*h_prev.shape[:-1], k, dh).astype(R.dtype)
    out = jnp.einsum("...kd,kde->...ke", hh, R, preferred_element_type=acc_dtype)  # [..., k, 4*dh]
    out = out.reshape(*h_prev.shape[:-1], k, 4, dh)
    return jnp.swapaxes(out, -3, -2).reshape(*h_prev.shape[:-1], 4 * k * dh)


def slstm_pointwise(spec: CellSpec, a: dict[str, jax.Array], carry: "SLSTMState"):
    """The elementwise part of an sLSTM step from the pre-activations: ``(new_carry, acts)`` with ``acts`` the
    stabilized gates ``i'``, ``f'``, ``z``, ``o`` actually applied."""
    log_f = a["f"] if spec.exp_forget else -jax.nn.softplus(-a["f"])
    fresh = carry.n == 0  # the first step: m starts at i~, and f' (which multiplies zero states) is 1
    lf_m = jnp.where(fresh, a["i"], log_f + carry.m)  # not exp(log f - i~), which overflows for i~ << 0
    m = jnp.maximum(lf_m, a["i"])
    i = jnp.exp(a["i"] - m)
    f = jnp.exp(lf_m - m)
    z = jnp.tanh(a["z"])
    o = jax.nn.sigmoid(a["o"])
    c = f * carry.c + i * z
    n = f * carry.n + i
    y = o * (c / n)
    return SLSTMState(y, c, n, m), {"i": i, "f": f, "z": z, "o": o}


#: Masks of :func:`draw_noise` that change every step (``[T, B, H]``); the others are per sequence.
PER_STEP_NOISE = ("z_mask", "zc_mask", "zh_mask")


def draw_noise(spec: CellSpec, key: jax.Array, T: int, B: int, in_features: int, R_shape, dtype) -> dict:
    """Training's masks for one direction of one layer, from ``key``: ``x_mask`` ``[B, in]`` and ``h_mask``
    ``[B, H]`` (variational dropout, one per sequence), ``z_mask`` ``[T, B, H]`` (recurrent dropout),
    ``zc_mask``/``zh_mask`` ``[T, B, H]`` (zoneout: 1 = keep the previous value), ``R_mask`` (weight drop, one
    per forward pass, the shape of ``R``). Dropout masks are scaled by ``1 / (1 - rate)``; only the masks of the
    rates that are on are drawn."""
    H = R_shape[0] if len(R_shape) == 2 else R_shape[0] * R_shape[1]
    k = dict(zip(("x", "h", "z", "zc", "zh", "R"), jax.random.split(key, 6)))

    def keep(name, rate, shape):  # inverted dropout
        return jax.random.bernoulli(k[name], 1.0 - rate, shape).astype(dtype) / jnp.asarray(1.0 - rate, dtype)

    out = {}
    if spec.variational_dropout:
        out["x_mask"] = keep("x", spec.variational_dropout, (B, in_features))
        out["h_mask"] = keep("h", spec.variational_dropout, (B, H))
    if spec.recurrent_dropout:
        out["z_mask"] = keep("z", spec.recurrent_dropout, (T, B, H))
    if spec.zoneout_c:
        out["zc_mask"] = jax.random.bernoulli(k["zc"], spec.zoneout_c, (T, B, H)).astype(dtype)
    if spec.zoneout_h:
        out["zh_mask"] = jax.random.bernoulli(k["zh"], spec.zoneout_h, (T, B, H)).astype(dtype)
    if spec.weight_drop:
        out["R_mask"] = keep("R", spec.weight_drop, tuple(R_shape))
    return out


def rnn_pointwise(a: jax.Array) -> jax.Array:
    """The tanh RNN's output from its pre-activation ``x W + b + h R``."""
    return jnp.tanh(a)


def _zoneout(rate: float, mask, prev: jax.Array, new: jax.Array) -> jax.Array:
    """Zoneout: each unit keeps ``prev`` where ``mask`` is 1 (training), or ``rate`` of it (evaluation)."""
    if mask is None and not rate:
        return new
    keep = jnp.asarray(rate, new.dtype) if mask is None else mask
    return keep * prev + (1.0 - keep) * new


def step(spec: CellSpec, params: dict[str, jax.Array], carry, xp_t: jax.Array, *, trace: bool = False,
         rec: jax.Array | None = None, noise: dict[str, jax.Array] | None = None):
    """One time step of the cell ``spec``: ``(params, carry, xp_t) -> (carry, y_t[, trace])``.

    Args:
      spec: the variant.
      params: the arrays of :func:`param_shapes` except ``W`` (whose product
        with the input is already in ``xp_t``); ``R`` and ``R_gates`` may be
        in a lower precision than the carry (their products accumulate in the
        carry's dtype).
      carry: :class:`LSTMState` / :class:`FGRState` / :class:`HiddenState`,
        fields ``[batch..., size]`` (:func:`carry_shapes`); its dtype is the
        dtype of the elementwise math.
      xp_t: ``x_t @ W + b``, ``[batch..., n*H]`` in the gate order of
        :meth:`CellSpec.gate_names`.
      trace: also return a dict of the activations named by
        :func:`trace_names` (a removed gate as ones), each ``[batch..., H]``.
      noise: training's masks for this step (:func:`draw_noise`, per-step ones already at ``t``): ``h_mask``
        (variational dropout on ``y_{t-1}`` into ``R``), ``z_mask`` (recurrent dropout), ``zc_mask`` and
        ``zh_mask`` (zoneout, 1 = keep the previous value); None: evaluation (zoneout takes its expectation).

    Returns:
      ``(new_carry, y_t)`` with ``y_t`` ``[batch..., H]`` (``new_carry.h``), or
      ``(new_carry, y_t, trace_dict)`` when ``trace``.
    """
    acc = carry.h.dtype
    xp_t = xp_t.astype(acc)
    h_prev = carry.h
    noise = noise or {}
    h_in = h_prev * noise["h_mask"] if "h_mask" in noise else h_prev  # what R reads
    if spec.family == "lstm":
        names = spec.gate_names()
        # rec: the recurrent product h_prev @ R computed by the caller (LSTM family; the custom VJP)
        r = _mm(h_in, params["R"], acc) if rec is None else rec
        if spec.layer_norm:
            r = layer_norm(r, len(names)) * params["ln_h_g"].astype(acc)
        a = _split(xp_t + r, names)
        gate_rec = spec.recurrent_gate_names()
        if spec.full_gate_recurrence:
            extra = _split(_mm(carry.gates, params["R_gates"], acc), gate_rec)
            a = {k: (v + extra[k] if k in extra else v) for k, v in a.items()}
        peep = {p: params[p].astype(acc) for p in spec.peephole_names()}
        ln_c = (params["ln_c_g"].astype(acc), params["ln_c_b"].astype(acc)) if spec.layer_norm else None
        c, y, acts = lstm_pointwise(spec, a, carry.c, peep, ln_c=ln_c, z_mask=noise.get("z_mask"))
        c = _zoneout(spec.zoneout_c, noise.get("zc_mask"), carry.c, c)
        y = _zoneout(spec.zoneout_h, noise.get("zh_mask"), h_prev, y)
        if spec.full_gate_recurrence:
            new_carry = FGRState(y, c, jnp.concatenate([acts[g] for g in gate_rec], axis=-1))
        else:
            new_carry = LSTMState(y, c)
        one = jnp.ones_like(c)
        tr = ({k: (one if acts[k] is None else acts[k]) for k in ("i", "f", "o", "z")} | {"c": c, "y": y}
              if trace else None)
    elif spec.family == "gru":
        R = params["R"]
        H = h_prev.shape[-1]
        x = _split(xp_t, ("r", "u", "n"))
        if spec.reset_after:
            hr = _split(_mm(h_in, R, acc), ("r", "u", "n"))
        else:
            hr = _split(_mm(h_in, R[:, :2 * H], acc), ("r", "u"))
        r, u = gru_gates(x["r"] + hr["r"], x["u"] + hr["u"])
        q = hr["n"] if spec.reset_after else _mm(r * h_in, R[:, 2 * H:], acc)
        n, y = gru_candidate(spec, x["n"], q, r, u, h_prev, params.get("b_hn"))
        if "z_mask" in noise:  # recurrent dropout on the candidate
            n = n * noise["z_mask"]
            y = (1.0 - u) * n + u * h_prev
        y = _zoneout(spec.zoneout_h, noise.get("zh_mask"), h_prev, y)
        new_carry = HiddenState(y)
        tr = {"r": r, "u": u, "n": n, "h": y} if trace else None
    elif spec.family == "mgu":
        R = params["R"]
        H = h_prev.shape[-1]
        x = _split(xp_t, ("f", "n"))
        f = mgu_gate(x["f"] + _mm(h_in, R[:, :H], acc))
        n, y = mgu_candidate(x["n"], _mm(f * h_in, R[:, H:], acc), f, h_prev)
        y = _zoneout(spec.zoneout_h, noise.get("zh_mask"), h_prev, y)
        new_carry = HiddenState(y)
        tr = {"f": f, "n": n, "h": y} if trace else None
    elif spec.family == "slstm":
        a = _split(xp_t + (slstm_recurrent(spec, h_prev, params["R"], acc) if rec is None else rec),
                   spec.gate_names())
        new_carry, acts = slstm_pointwise(spec, a, carry)
        y = new_carry.h
        tr = (acts | {"c": new_carry.c, "n": new_carry.n, "m": new_carry.m, "y": y}) if trace else None
    elif spec.family in INPUT_ONLY:
        a = _split(xp_t, spec.gate_names())
        log_a, log_b = min_coefficients(spec, a)
        y = jnp.exp(log_a) * h_prev + jnp.exp(log_b)
        new_carry = HiddenState(y)
        if trace:
            gate = jnp.exp(log_a) if spec.family == "minlstm" else jax.nn.sigmoid(a["z"])
            tr = {"n": min_g(a["n"]), "h": y} | (
                {"f": gate, "i": 1.0 - gate} if spec.family == "minlstm" else {"z": gate})
        else:
            tr = None
    else:  # rnn
        y = rnn_pointwise(xp_t + _mm(h_in, params["R"], acc))
        y = _zoneout(spec.zoneout_h, noise.get("zh_mask"), h_prev, y)
        new_carry = HiddenState(y)
        tr = {"h": y} if trace else None
    if trace:
        return new_carry, y, tr
    return new_carry, y
