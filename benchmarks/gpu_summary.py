"""The README's GPU tables from the JSON files of ``benchmarks/gpu_check.sh`` / ``layer_speed.py`` runs.

    python benchmarks/gpu_summary.py [benchmarks/results/gpu/*.json]

Ratios are taken only between rows of the same file (one run, one machine): a run's GPU is not the next
run's. Files whose ``machine.torch_device`` is not ``cuda`` give no torch ratios (their torch ran on the CPU).
Prints two markdown tables: ``impl="pallas"`` against torch's cuDNN (LSTM and GRU, float32 and bfloat16), and
the lstm_lab implementations against each other, Flax and ``jax.experimental.rnn``.
"""

from __future__ import annotations

import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def load(paths):
    runs = []
    for path in paths:
        with open(path) as f:
            d = json.load(f)
        runs.append((os.path.basename(path), d["machine"], d["rows"]))
    return runs


def shape_key(r):
    return (r["T"], r["B"], r["H"])


def fmt(ms):
    return "-" if ms is None else f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def vs_cudnn(runs):
    """Per anchor and dtype: pallas lstm/gru and torch's cuDNN LSTM/GRU from the same run (the last run that has
    both wins)."""
    best = {}
    for name, machine, rows in runs:
        if machine.get("torch_device") != "cuda":
            continue
        ms = {(shape_key(r), r["dtype"], r["impl"], r["cell"]): r["ms"] for r in rows}
        for (shape, dtype, impl, cell), v in ms.items():
            if impl != "pallas" or cell not in ("lstm", "gru"):
                continue
            ref = ms.get((shape, dtype, "torch", cell))
            if ref is not None:
                best[(shape, cell, dtype)] = (v, ref, name)
    shapes = sorted({k[0] for k in best}, key=lambda s: (s[0] * s[1] * s[2], s))
    out = ["| T/B/H | LSTM f32: pallas / cuDNN ms (x) | LSTM bf16 | GRU f32 | GRU bf16 | run |",
           "|---|---:|---:|---:|---:|---|"]
    for s in shapes:
        cells, files = [], set()
        for cell in ("lstm", "gru"):
            for dtype in ("float32", "bfloat16"):
                if (s, cell, dtype) in best:
                    v, ref, name = best[(s, cell, dtype)]
                    cells.append(f"{fmt(v)} / {fmt(ref)} ({ref / v:.2f})")
                    files.add(name)
                else:
                    cells.append("-")
        out.append(f"| {s[0]}/{s[1]}/{s[2]} | " + " | ".join(cells) + f" | {', '.join(sorted(files))} |")
    return "\n".join(out)


def impls(runs):
    """LSTM float32 per anchor: every lstm_lab impl, Flax and jax.experimental.rnn from one run each."""
    cols = [("pallas", "lstm"), ("scan_vjp", "lstm"), ("scan", "lstm"), ("flax", "lstm"), ("cudnn", "lstm"),
            ("pallas", "vanilla"), ("pallas", "cifg")]
    out = ["| T/B/H | pallas | scan_vjp | scan | Flax | jax.experimental.rnn | vanilla (pallas) | cifg (pallas) "
           "| run |", "|---|" + "---:|" * len(cols) + "---|"]
    seen = {}
    for name, machine, rows in runs:
        by = {}
        for r in rows:
            if r["dtype"] == "float32":
                by.setdefault(shape_key(r), {})[(r["impl"], r["cell"])] = r["ms"]
        for s, ms in by.items():
            if sum(c in ms for c in cols) > len(seen.get(s, ({}, ""))[0]):
                seen[s] = ({c: ms[c] for c in cols if c in ms}, name)
    for s in sorted(seen, key=lambda s: (s[0] * s[1] * s[2], s)):
        ms, name = seen[s]
        out.append(f"| {s[0]}/{s[1]}/{s[2]} | " + " | ".join(fmt(ms.get(c)) for c in cols) + f" | {name} |")
    return "\n".join(out)


def main(argv):
    paths = argv or sorted(glob.glob(os.path.join(HERE, "results", "gpu", "*.json")))
    if not paths:
        raise SystemExit("no JSON files: pass layer_speed.py --out files, or run benchmarks/gpu_check.sh first")
    runs = load(paths)
    m = runs[0][1]
    print(f"# {m.get('device_kind')}, jax {m.get('jax')}, torch {m.get('torch')}, {m.get('date', '')[:10]}; "
          f"ms per forward+backward, median of {m.get('repeats')}")
    print("\nimpl='pallas' against torch's cuDNN (same run; x = cuDNN ms / pallas ms, > 1 is faster):\n")
    print(vs_cudnn(runs))
    print("\nLSTM float32, ms, every implementation (same run per row):\n")
    print(impls(runs))


if __name__ == "__main__":
    main(sys.argv[1:])
