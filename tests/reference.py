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


def LN(v, gain, bias=0.0):
    """Layer normalization of one vector (population variance, eps 1e-5), then gain and bias."""
    return (v - v.mean()) / np.sqrt(v.var() + 1e-5) * gain + bias


def run_sequence(spec, p, x, state, noise=None):
    """Run one sequence ``x [L, F]`` from ``state`` (dict of 1-D arrays).

    ``noise``: training's masks for this sequence (the regularization fields of the spec), as drawn by the
    layer: ``x_mask [F]``, ``h_mask [H]`` (variational dropout, scaled), ``z_mask [L, H]`` (recurrent dropout,
    scaled), ``zc_mask``/``zh_mask [L, H]`` (zoneout: 1 keeps the previous value), ``R_mask`` (weight drop,
    scaled), the per-step ones in this sequence's step order; None: evaluation (dropout off, zoneout's
    expectation).

    Returns outputs ``[L, H]``, the final state dict and per-step traces.
    """
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    noise = {k: np.asarray(v, np.float64) for k, v in (noise or {}).items()}
    if "R_mask" in noise:
        p["R"] = p["R"] * noise["R_mask"]
    H = hidden_size(spec, p)
    names = spec.gate_names()
    blk = _blocks(p, names, H)
    ys, traces = [], []
    st = {k: np.asarray(v, np.float64).copy() for k, v in state.items()}

    def zone(rate, key, t, prev, new):
        d = noise[key][t] if key in noise else rate  # training: the mask; evaluation: the expectation
        return d * prev + (1.0 - d) * new

    for t, x_t in enumerate(np.asarray(x, np.float64)):
        if "x_mask" in noise:
            x_t = x_t * noise["x_mask"]
        if spec.layer_norm:
            pre = {g: LN(x_t @ blk[g][0], p["ln_x_g"][j * H:(j + 1) * H]) + blk[g][2] for j, g in enumerate(names)}
        else:
            pre = {g: x_t @ blk[g][0] + blk[g][2] for g in names}
        y_in = st["h"] * noise["h_mask"] if "h_mask" in noise else st["h"]  # what R reads
        if spec.family == "lstm":
            y_prev, c_prev = st["h"], st["c"]
            for j, g in enumerate(names):
                rec = y_in @ blk[g][1]
                pre[g] = pre[g] + (LN(rec, p["ln_h_g"][j * H:(j + 1) * H]) if spec.layer_norm else rec)
            rec = [g for g in ("i", "f", "o") if g in names]
            if spec.full_gate_recurrence:
                # R_gates rows: previous activation blocks; columns: receiving gate blocks
                for a_idx, a in enumerate(rec):
                    prev_a = st["gates"][a_idx * H:(a_idx + 1) * H]
                    for b_idx, bname in enumerate(rec):
                        Rab = p["R_gates"][a_idx * H:(a_idx + 1) * H, b_idx * H:(b_idx + 1) * H]
                        pre[bname] = pre[bname] + prev_a @ Rab
            z = ACT[spec.input_activation](pre["z"])
            if "z_mask" in noise:  # recurrent dropout on the block input
                z = z * noise["z_mask"][t]
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
            y = ACT[spec.output_activation](LN(c, p["ln_c_g"], p["ln_c_b"]) if spec.layer_norm else c) * o
            c = zone(spec.zoneout_c, "zc_mask", t, c_prev, c)
            y = zone(spec.zoneout_h, "zh_mask", t, y_prev, y)
            st = {"h": y, "c": c}
            if spec.full_gate_recurrence:
                act = {"i": i, "f": f, "o": o}
                st["gates"] = np.concatenate([act[g] for g in rec])
            traces.append({"i": i, "f": f, "o": o, "z": z, "c": c, "y": y})
        elif spec.family == "gru":
            h = st["h"]
            r = sigmoid(pre["r"] + y_in @ blk["r"][1])
            u = sigmoid(pre["u"] + y_in @ blk["u"][1])
            if spec.reset_after:
                n = np.tanh(pre["n"] + r * (y_in @ blk["n"][1] + p["b_hn"]))
            else:
                n = np.tanh(pre["n"] + (r * y_in) @ blk["n"][1])
            if "z_mask" in noise:  # recurrent dropout on the candidate
                n = n * noise["z_mask"][t]
            y = zone(spec.zoneout_h, "zh_mask", t, h, (1.0 - u) * n + u * h)
            st = {"h": y}
            traces.append({"r": r, "u": u, "n": n, "h": y})
        elif spec.family == "mgu":
            h = st["h"]
            f = sigmoid(pre["f"] + y_in @ blk["f"][1])
            n = np.tanh(pre["n"] + (f * y_in) @ blk["n"][1])
            y = zone(spec.zoneout_h, "zh_mask", t, h, (1.0 - f) * h + f * n)
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
            y = zone(spec.zoneout_h, "zh_mask", t, st["h"], np.tanh(pre["h"] + y_in @ blk["h"][1]))
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


def run_layer(spec, params, x, *, lengths=None, initial=None, want_trace=None, noise=None):
    """The whole stack, batch-major.

    Args:
      params: ``params[layer][direction]`` dicts of arrays.
      x: ``[B, T, F]`` (one flat batch axis).
      lengths: ``[B]`` or None.
      initial: ``initial[layer][direction]`` dicts of ``[B, size]`` arrays, or None.
      want_trace: ``(layer, direction)`` to also return traces ``{name: [B, T, H]}``.
      noise: ``noise[layer][direction]`` dicts of training masks (see :func:`run_sequence`) with a batch axis:
        ``x_mask [B, F]``, ``h_mask [B, H]``, per-step ``[T, B, H]`` in the original time order (the mask of time
        ``t`` goes with the step that reads ``x_t``, in either direction), ``R_mask``; None: evaluation.

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
                nz = None
                if noise is not None:
                    nz = {}
                    for k, v in noise[li][d].items():
                        v = np.asarray(v, np.float64)
                        if k in ("z_mask", "zc_mask", "zh_mask"):
                            v = v[:L, b][::-1] if d == 1 else v[:L, b]
                        elif k != "R_mask":
                            v = v[b]
                        nz[k] = v
                ys, st, trs = run_sequence(spec, p, seq, st0, nz)
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
