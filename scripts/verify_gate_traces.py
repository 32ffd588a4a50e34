"""Check that every preset's traced gates satisfy its cell equations.

Builds each preset with ``lstm_lab.RNN``, runs ``lstm_lab.gate_trace`` on
random inputs and checks, at every step, with the preset's activations g, h:

* LSTM family: ``c_t = z_t * i_t + c_{t-1} * f_t`` and ``y_t = h(c_t) * o_t``,
  removed gates traced as ones, CIFG's ``f_t = 1 - i_t``, gates in [0, 1];
* GRU: ``h_t = (1 - u_t) * n_t + u_t * h_{t-1}``;  MGU: ``h_t = (1 - f_t) * h_{t-1} + f_t * n_t``;
* every family: the traced output equals the layer's output.

Usage: ``python scripts/verify_gate_traces.py [--tol 1e-5]`` (exit 1 on a violation).
"""

from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp
import numpy as np
from flax import nnx

import lstm_lab
from lstm_lab.cells import ACTIVATIONS


def check_preset(name: str, *, seed: int = 0, batch: int = 3, T: int = 12, F: int = 4, H: int = 6) -> dict[str, float]:
    """Max absolute violation of each equation for one preset (float32 layer)."""
    spec = lstm_lab.VARIANTS[name]
    layer = lstm_lab.RNN(F, H, spec, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for cell in layer.cells[0]:  # random non-zero parameters
        for pname, value in cell.params().items():
            getattr(cell, pname)[...] = jnp.asarray(rng.normal(0, 0.5, value.shape), jnp.float32)
    x = jnp.asarray(rng.normal(0, 1, (batch, T, F)), jnp.float32)
    y, _ = layer(x)
    tr = {k: np.asarray(v, np.float64) for k, v in lstm_lab.gate_trace(layer, x).items()}
    err = {"y == layer output": float(np.abs(tr["y" if spec.family in ("lstm", "slstm") else "h"]
                                              - np.asarray(y)).max())}
    if spec.family == "lstm":
        c_prev = np.concatenate([np.zeros((batch, 1, H)), tr["c"][:, :-1]], axis=1)
        err["c = z*i + c_prev*f"] = float(np.abs(tr["c"] - (tr["z"] * tr["i"] + c_prev * tr["f"])).max())
        h = ACTIVATIONS[spec.output_activation]
        c = tr["c"]
        if spec.layer_norm:  # y = h(LN(c) * gain + bias)
            cell = layer.cells[0][0]
            c = ((c - c.mean(-1, keepdims=True)) / np.sqrt(c.var(-1, keepdims=True) + 1e-5)
                 * np.asarray(cell.ln_c_g[...], np.float64) + np.asarray(cell.ln_c_b[...], np.float64))
        err["y = h(c)*o"] = float(np.abs(tr["y"] - np.asarray(h(jnp.asarray(c))) * tr["o"]).max())
        for gate, flag in (("i", spec.input_gate), ("f", spec.forget_gate), ("o", spec.output_gate)):
            if not flag:
                err[f"{gate} == 1 (removed)"] = float(np.abs(tr[gate] - 1).max())
        if spec.coupled:
            err["f == 1 - i (coupled)"] = float(np.abs(tr["f"] - (1 - tr["i"])).max())
        for gate in ("i", "f", "o"):
            if not (0 <= tr[gate].min() and tr[gate].max() <= 1):
                err[f"{gate} in [0, 1]"] = float("inf")
    elif spec.family == "gru":
        h_prev = np.concatenate([np.zeros((batch, 1, H)), tr["h"][:, :-1]], axis=1)
        err["h = (1-u)*n + u*h_prev"] = float(np.abs(tr["h"] - ((1 - tr["u"]) * tr["n"] + tr["u"] * h_prev)).max())
    elif spec.family == "mgu":
        h_prev = np.concatenate([np.zeros((batch, 1, H)), tr["h"][:, :-1]], axis=1)
        err["h = (1-f)*h_prev + f*n"] = float(np.abs(tr["h"] - ((1 - tr["f"]) * h_prev + tr["f"] * tr["n"])).max())
    elif spec.family == "slstm":
        prev = {k: np.concatenate([np.zeros((batch, 1, H)), tr[k][:, :-1]], axis=1) for k in ("c", "n", "m")}
        err["c = f'*c_prev + i'*z"] = float(np.abs(tr["c"] - (tr["f"] * prev["c"] + tr["i"] * tr["z"])).max())
        err["n = f'*n_prev + i'"] = float(np.abs(tr["n"] - (tr["f"] * prev["n"] + tr["i"])).max())
        err["y = o*c/n"] = float(np.abs(tr["y"] - tr["o"] * tr["c"] / tr["n"]).max())
        # the stabilizer makes the larger of i' and f' exactly 1 after the first step (there n_prev = 0: m = i~)
        err["max(i', f') == 1"] = float(np.abs(np.maximum(tr["i"], tr["f"])[:, 1:] - 1).max())
        err["i' == 1 at the first step"] = float(np.abs(tr["i"][:, 0] - 1).max())
    elif spec.family in ("minlstm", "mingru"):
        h_prev = np.concatenate([np.zeros((batch, 1, H)), tr["h"][:, :-1]], axis=1)
        keep, take = (tr["f"], tr["i"]) if spec.family == "minlstm" else (1 - tr["z"], tr["z"])
        err["h = a*h_prev + (1-a)*n"] = float(np.abs(tr["h"] - (keep * h_prev + take * tr["n"])).max())
        if spec.family == "minlstm":
            err["f' + i' == 1"] = float(np.abs(tr["f"] + tr["i"] - 1).max())
        if not tr["n"].min() > 0:
            err["n = g(.) > 0"] = float("inf")
    return err


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tol", type=float, default=1e-5)
    args = parser.parse_args(argv)
    worst = 0.0
    for name in lstm_lab.VARIANTS:
        err = check_preset(name)
        worst = max(worst, *err.values())
        print(f"{name:9s} " + "  ".join(f"{k}: {v:.1e}" for k, v in err.items()))
    ok = worst <= args.tol
    print(f"worst violation {worst:.2e} ({'OK' if ok else 'FAIL'}, tolerance {args.tol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
