"""A float64 NumPy transcription of the cell equations of ../shared/ARCHITECTURE.md.

Written from the equations, not from the JAX code: every gate has its own
matrices, the time loop is a Python loop over one sequence at a time, and a
sequence shorter than T is simply run for its own length (no masking), so
the layer's masking and reversal are checked against the plain definition.

Parameters are read by the documented layout (lstm_lab.cells docstring):
``W [in, n*H]``, ``R [H, n*H]``, ``b [n*H]`` in the gate order of
``spec.gate_names()``, peepholes ``p_i, p_f, p_o``, FGR ``R_gates`` and GRU
``b_hn``; sLSTM, minLSTM and minGRU as in the lstm_lab.cells docstring (equations
of Beck et al. 2024 and Feng et al. 2024).
"""

from __future__ import annotations

import numpy as np

ACT = {
    "tanh": np.tanh,
    "identity": lambda a: a,
    "sigmoid": lambda a: 1.0 / (1.0 + np.exp(-a)),
    "relu": lambda a: np.maximum(a, 0.0),
    "softsign": lambda a: a / (1.0 + np.abs(a)),
}


def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def G(a):
    """minLSTM/minGRU candidate (Feng et al. 2024, log-space form): a + 1/2 for a >= 0, else sigmoid(a)."""
    return np.where(a >= 0, a + 0.5, sigmoid(a))


def hidden_size(spec, p):
    return np.asarray(p["W"]).shape[1] // len(spec.gate_names())


def _blocks(p, names, H):
    """Per-gate W_g, R_g (None without R, or a head-blocked R), b_g."""
    out = {}
    for j, g in enumerate(names):
        sl = slice(j * H, (j + 1) * H)
        R = p.get("R")
        out[g] = (p["W"][:, sl], R[:, sl] if R is not None and R.ndim == 2 else None, p["b"][sl])
    return out


def _slstm_rec(spec, R, y_prev, H):
    """Recurrent pre-activations per gate: R [H, 4H], or [k, H/k, 4H/k] (head j: units j*H/k.. of y to the
    same units of each gate, columns i, f, z, o of H/k each)."""
    names = ("i", "f", "z", "o")
    if R.ndim == 2:
        return {g: y_prev @ R[:, j * H:(j + 1) * H] for j, g in enumerate(names)}
    k, dh, _ = R.shape
    out = {g: np.zeros(H) for g in names}
    for head in range(k):
        u = slice(head * dh, (head + 1) * dh)
        for j, g in enumerate(names):
            out[g][u] = y_prev[u] @ R[head][:, j * dh:(j + 1) * dh]
    return out


def run_sequence(spec, p, x, state):
    """Run one sequence ``x [L, F]`` from ``state`` (dict of 1-D arrays).

    Returns outputs ``[L, H]``, the final state dict and per-step traces.
    """
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    H = hidden_size(spec, p)
    names = spec.gate_names()
    blk = _blocks(p, names, H)
    ys, traces = [], []
    st = {k: np.asarray(v, np.float64).copy() for k, v in state.items()}
    for x_t in np.asarray(x, np.float64):
        pre = {g: x_t @ blk[g][0] + blk[g][2] for g in names}
        if spec.family == "lstm":
            y_prev, c_prev = st["h"], st["c"]
            for g in names:
                pre[g] = pre[g] + y_prev @ blk[g][1]
            rec = [g for g in ("i", "f", "o") if g in names]
            if spec.full_gate_recurrence:
                # R_gates rows: previous activation blocks; columns: receiving gate blocks
                for a_idx, a in enumerate(rec):
                    prev_a = st["gates"][a_idx * H:(a_idx + 1) * H]
                    for b_idx, bname in enumerate(rec):
                        Rab = p["R_gates"][a_idx * H:(a_idx + 1) * H, b_idx * H:(b_idx + 1) * H]
                        pre[bname] = pre[bname] + prev_a @ Rab
            z = ACT[spec.input_activation](pre["z"])
            if spec.input_gate:
                i = sigmoid(pre["i"] + (p["p_i"] * c_prev if spec.peepholes else 0.0))
            else:
                i = np.ones(H)
            if spec.coupled:
                f = 1.0 - i
            elif spec.forget_gate:
                f = sigmoid(pre["f"] + (p["p_f"] * c_prev if spec.peepholes else 0.0))
            else:
                f = np.ones(H)
            c = z * i + c_prev * f
            if spec.output_gate:
                o = sigmoid(pre["o"] + (p["p_o"] * c if spec.peepholes else 0.0))
            else:
                o = np.ones(H)
            y = ACT[spec.output_activation](c) * o
            st = {"h": y, "c": c}
            if spec.full_gate_recurrence:
                act = {"i": i, "f": f, "o": o}
                st["gates"] = np.concatenate([act[g] for g in rec])
            traces.append({"i": i, "f": f, "o": o, "z": z, "c": c, "y": y})
        elif spec.family == "gru":
            h = st["h"]
            r = sigmoid(pre["r"] + h @ blk["r"][1])
            u = sigmoid(pre["u"] + h @ blk["u"][1])
            if spec.reset_after:
                n = np.tanh(pre["n"] + r * (h @ blk["n"][1] + p["b_hn"]))
            else:
                n = np.tanh(pre["n"] + (r * h) @ blk["n"][1])
            y = (1.0 - u) * n + u * h
            st = {"h": y}
            traces.append({"r": r, "u": u, "n": n, "h": y})
        elif spec.family == "mgu":
            h = st["h"]
            f = sigmoid(pre["f"] + h @ blk["f"][1])
            n = np.tanh(pre["n"] + (f * h) @ blk["n"][1])
            y = (1.0 - f) * h + f * n
            st = {"h": y}
            traces.append({"f": f, "n": n, "h": y})
        elif spec.family == "slstm":
            y_prev = st["h"]
            rec = _slstm_rec(spec, p["R"], y_prev, H)
            a = {g: pre[g] + rec[g] for g in names}
            log_f = a["f"] if spec.exp_forget else np.log(sigmoid(a["f"]))
            # stabilizer: the first step (n = 0) starts it at i~
            fresh = st["n"] == 0
            m = np.where(fresh, a["i"], np.maximum(log_f + st["m"], a["i"]))
            i = np.exp(a["i"] - m)
            # f' multiplies the zero states of the first step: any finite value gives the same c, n, y; the
            # cell takes 1 there (exp(log f - i~) overflows for i~ << 0)
            with np.errstate(over="ignore"):
                f = np.where(fresh, 1.0, np.exp(log_f + st["m"] - m))
            z = np.tanh(a["z"])
            o = sigmoid(a["o"])
            c = f * st["c"] + i * z
            n = f * st["n"] + i
            y = o * c / n
            st = {"h": y, "c": c, "n": n, "m": m}
            traces.append({"i": i, "f": f, "z": z, "o": o, "c": c, "n": n, "m": m, "y": y})
        elif spec.family == "minlstm":
            f, i = sigmoid(pre["f"]), sigmoid(pre["i"])
            f, i = f / (f + i), i / (f + i)
            n = G(pre["n"])
            y = f * st["h"] + i * n
            st = {"h": y}
            traces.append({"f": f, "i": i, "n": n, "h": y})
        elif spec.family == "mingru":
            z = sigmoid(pre["z"])
            n = G(pre["n"])
            y = (1.0 - z) * st["h"] + z * n
            st = {"h": y}
            traces.append({"z": z, "n": n, "h": y})
        else:
            y = np.tanh(pre["h"] + st["h"] @ blk["h"][1])
            st = {"h": y}
            traces.append({"h": y})
        ys.append(y)
    return np.stack(ys), st, traces


def zero_state(spec, H):
    st = {"h": np.zeros(H)}
    if spec.family == "lstm":
        st["c"] = np.zeros(H)
        if spec.full_gate_recurrence:
            st["gates"] = np.zeros(len([g for g in ("i", "f", "o") if g in spec.gate_names()]) * H)
    if spec.family == "slstm":
        st.update(c=np.zeros(H), n=np.zeros(H), m=np.zeros(H))
    return st


def run_layer(spec, params, x, *, lengths=None, initial=None, want_trace=None):
    """The whole stack, batch-major.

    Args:
      params: ``params[layer][direction]`` dicts of arrays.
      x: ``[B, T, F]`` (one flat batch axis).
      lengths: ``[B]`` or None.
      initial: ``initial[layer][direction]`` dicts of ``[B, size]`` arrays, or None.
      want_trace: ``(layer, direction)`` to also return traces ``{name: [B, T, H]}``.

    Returns:
      ``(y [B, T, D*H], finals[layer][direction] dicts of [B, size], traces or None)``.
    """
    x = np.asarray(x, np.float64)
    B, T, _ = x.shape
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    inp = x
    finals = []
    traces = None
    for li, layer_params in enumerate(params):
        outs, fin = [], []
        for d, p in enumerate(layer_params):
            H = hidden_size(spec, p)
            y = np.zeros((B, T, H))
            fd = {}
            tr_d = None
            if want_trace == (li, d):
                tr_d = {}
            for b in range(B):
                L = int(lengths[b])
                seq = inp[b, :L]
                if d == 1:
                    seq = seq[::-1]
                st0 = zero_state(spec, H) if initial is None else {
                    k: np.asarray(v, np.float64)[b] for k, v in initial[li][d].items()}
                ys, st, trs = run_sequence(spec, p, seq, st0)
                if d == 1:
                    ys = ys[::-1]
                    trs = trs[::-1]
                y[b, :L] = ys
                for k, v in st.items():
                    fd.setdefault(k, []).append(v)
                if tr_d is not None:
                    for k in trs[0]:
                        arr = tr_d.setdefault(k, np.zeros((B, T, H)))
                        arr[b, :L] = np.stack([tr[k] for tr in trs])
            outs.append(y)
            fin.append({k: np.stack(v) for k, v in fd.items()})
            if tr_d is not None:
                traces = tr_d
        inp = np.concatenate(outs, axis=-1)
        finals.append(fin)
    return inp, finals, traces
