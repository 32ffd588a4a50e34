"""Forward + backward time of one recurrent layer: lstm_lab (every impl, every preset) vs
``torch.nn.LSTM``/``torch.nn.GRU``, Flax's ``nnx.OptimizedLSTMCell`` and, on GPU, cuDNN through
``jax.experimental.rnn``.

    python benchmarks/layer_speed.py --quick                      # smoke test, ~1 min on 2 CPU cores
    python benchmarks/layer_speed.py [--cells lstm,gru,...] [--dtypes float32,bfloat16]
                                     [--shapes 100x32x128,1000x1x64] [--impls scan,...]
                                     [--repeats 20] [--unroll 1] [--skip torch,flax,cudnn]
                                     [--matmul-precision default|highest]
                                     [--block-b 16 --block-h N --block-k 64 --num-warps N]
                                     [--out results.json] [--markdown]

    # on a GPU, the fused kernel against cuDNN (float32 matmuls in TF32 unless --matmul-precision highest)
    python benchmarks/layer_speed.py --impls scan,scan_vjp,pallas --dtypes float32,bfloat16 --markdown

One step is what training needs: ``loss = sum(ys * g)`` for a fixed random ``g``, gradients
w.r.t. every parameter AND the input ``x``; one layer, input size = hidden size, input projection
included, batch-major ``x [B, T, H]``. JAX sides run ``jax.jit(jax.value_and_grad(loss, (0, 1)))``
on ``nnx.split`` parameters; torch runs forward + ``.backward()`` with
``torch.set_num_threads(os.cpu_count())`` (``--torch-threads``). Each time is the median of ``--repeats`` runs after
compilation + 2 warm-up runs, each run synchronised (``jax.block_until_ready``). Within one
(shape, dtype) the candidates take turns, so that drifting load from other processes falls on all of
them alike: each turn is one untimed run, then ``--block`` (2) timed ones (the untimed run absorbs
what the previous candidate leaves behind, e.g. torch's spin-waiting OpenMP threads).

Output, one line per measurement: ``T B H dtype impl cell ms ratio vs_lstm`` where

* ``ratio`` = reference ms / ms, the reference being torch LSTM for LSTM-family cells, torch
  GRU for ``gru`` and torch's tanh RNN for ``rnn`` (same shape and dtype; > 1 is faster than torch;
  blank for ``mgu``, which torch has no counterpart for);
* ``vs_lstm`` = ms / the ``lstm`` cell's ms with the same impl, shape and dtype (the "within 1.15x
  of lstm" target). ``lstm`` is always measured for this, whatever ``--cells`` says.

bfloat16 means bf16 matmuls with float32 parameters and carry for lstm_lab (its ``dtype=``), and
a ``.to(torch.bfloat16)`` model and input for torch. Flax is measured in float32 only.

Shared machines: torch's OpenMP threads meet at a barrier several times per time step; when another
process holds one of the cores, a torch step with ``os.cpu_count()`` threads can be 10-100x slower
(seen: 4.1 s instead of 24-40 ms on 2 cores). The load average is printed and recorded; on a busy
machine compare with ``--torch-threads 1``. XLA's CPU thread pool degrades far more gracefully.

bfloat16 on CPU: on a CPU without native bf16 (AVX2 only) torch's bf16 LSTM/GRU step is 20-65x
slower than its float32 one (19 s at T=200 B=16 H=512 on 2 cores), so the default run (both dtypes)
spends most of its time there; ``--dtypes float32`` or ``--skip torch`` for bf16 on such a CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback

import numpy as np

CPU_ANCHORS = [(100, 32, 128), (100, 32, 256), (200, 16, 512), (1000, 1, 64)]
GPU_ANCHORS = [(128, 16, 256), (128, 64, 512), (128, 64, 1024), (128, 256, 1024), (512, 32, 256),
               (1000, 1, 128)]
REFERENCE_IMPLS = ("torch", "flax", "cudnn")


def log(msg: str = "") -> None:
    print(msg, flush=True)


def note(msg: str) -> None:
    log(f"# note: {msg}")


def parse_shapes(text: str):
    shapes = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            T, B, H = (int(v) for v in part.split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: expected TxBxH items such as 100x32x128; got {part!r}")
        shapes.append((T, B, H))
    return shapes


def csv(text: str | None):
    return [s.strip() for s in text.split(",") if s.strip()] if text else []


WARMUP = 2  # untimed runs after the first (compiling) call


def data(T: int, B: int, H: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, H), dtype=np.float32)
    g = rng.standard_normal((B, T, H), dtype=np.float32)
    return x, g


# ---------------------------------------------------------------------------
# JAX sides
# ---------------------------------------------------------------------------
def _jax_step(module, x_np, g_np, dtype, call):
    """A synchronised jitted value_and_grad step over (params, x) of an nnx module."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    x = jnp.asarray(x_np, dtype)
    g = jnp.asarray(g_np, jnp.float32)

    def loss(params, x):
        m = nnx.merge(graphdef, params, rest)
        ys = call(m, x)
        return jnp.sum(ys.astype(jnp.float32) * g)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return lambda: jax.block_until_ready(step(params, x))


def lstm_lab_step(cell, impl, T, B, H, dtype_name, unroll, kernel_options=None):
    import jax.numpy as jnp
    from flax import nnx

    import lstm_lab

    dtype = jnp.dtype(dtype_name)
    layer = lstm_lab.RNN(H, H, cell, rngs=nnx.Rngs(0), dtype=dtype, impl=impl, unroll=unroll,
                         kernel_options=kernel_options if impl == "pallas" else None)
    x, g = data(T, B, H)
    return _jax_step(layer, x, g, dtype, lambda m, x: m(x)[0])


def flax_step(T, B, H, dtype_name, unroll):
    import jax.numpy as jnp
    from flax import nnx

    x, g = data(T, B, H)
    if hasattr(nnx, "OptimizedLSTMCell") and hasattr(nnx, "RNN"):
        # rngs=False and an explicit zero carry: the default carry init draws from an Rngs stream,
        # which can't be mutated inside jax.jit(jax.grad(...)) of a merged module.
        rnn = nnx.RNN(nnx.OptimizedLSTMCell(H, H, rngs=nnx.Rngs(0)), unroll=unroll, rngs=False)
        zeros = jnp.zeros((B, H), jnp.float32)
        return _jax_step(rnn, x, g, jnp.dtype(dtype_name), lambda m, x: m(x, initial_carry=(zeros, zeros)))
    # Older/newer Flax without the nnx names: linen.
    import jax
    import flax.linen as nn

    rnn = nn.RNN(nn.OptimizedLSTMCell(H), unroll=unroll)
    xj, gj = jnp.asarray(x), jnp.asarray(g)
    params = rnn.init(jax.random.key(0), xj)

    def loss(params, x):
        return jnp.sum(rnn.apply(params, x) * gj)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return lambda: jax.block_until_ready(step(params, xj))


def cudnn_step(T, B, H, dtype_name):
    """cuDNN LSTM through ``jax.experimental.rnn`` (GPU only)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import rnn

    dtype = jnp.dtype(dtype_name)
    x_np, g_np = data(T, B, H)
    weights = rnn.init_lstm_weight(jax.random.key(0), H, H, 1, False).astype(dtype)
    x = jnp.asarray(x_np, dtype)
    g = jnp.asarray(g_np, jnp.float32)
    h0 = jnp.zeros((1, B, H), dtype)
    c0 = jnp.zeros((1, B, H), dtype)
    lengths = jnp.full((B,), T, jnp.int32)

    def loss(w, x):
        ys, _, _ = rnn.lstm(x, h0, c0, w, lengths, input_size=H, hidden_size=H, num_layers=1,
                            dropout=0.0, bidirectional=False)
        return jnp.sum(ys.astype(jnp.float32) * g)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return lambda: jax.block_until_ready(step(weights, x))


# ---------------------------------------------------------------------------
# torch
# ---------------------------------------------------------------------------
def torch_device():
    """'cuda' when jax runs on a GPU and torch sees one (cuDNN), else 'cpu' (oneDNN): torch is measured on the
    device lstm_lab runs on."""
    import jax
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def torch_step(cell, T, B, H, dtype_name):
    import torch

    dev = torch_device()
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell]  # nn.RNN: tanh
    model = cls(H, H, num_layers=1, batch_first=True).to(device=dev, dtype=tdtype)
    x_np, g_np = data(T, B, H)
    x = torch.from_numpy(x_np).to(device=dev, dtype=tdtype).requires_grad_(True)
    g = torch.from_numpy(g_np).to(device=dev, dtype=tdtype)
    params = list(model.parameters())

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        ys, _ = model(x)
        loss = (ys.float() * g.float()).sum()
        loss.backward()
        return loss.item()  # synchronises the GPU (the CPU is synchronous anyway)

    return step


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------
def reference_cell(cell: str):
    """The torch module an lstm_lab cell is compared with, or None."""
    import lstm_lab

    fam = lstm_lab.VARIANTS[cell].family
    return {"lstm": "lstm", "gru": "gru", "rnn": "rnn"}.get(fam)


def machine_facts(args) -> dict:
    import flax
    import jax

    facts = {
        "backend": jax.default_backend(),
        "device_kind": str(jax.devices()[0].device_kind),
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "repeats": args.repeats,
        "block": args.block,
        "unroll": args.unroll,
        "matmul_precision": args.matmul_precision,
        "pallas_block_b": args.block_b,
        "pallas_num_warps": args.num_warps,
        "pallas_block_h": args.block_h,
        "pallas_block_k": args.block_k,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and "cpu_model" not in facts:
                    facts["cpu_model"] = line.split(":", 1)[1].strip()
                if line.startswith("flags") and "cpu_simd_flags" not in facts:  # what the native kernel compiles for
                    facts["cpu_simd_flags"] = " ".join(sorted(f for f in line.split(":", 1)[1].split()
                                                              if f.startswith(("avx", "fma", "sse4", "amx"))))
    except OSError:
        pass
    try:
        facts["loadavg_start"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        import torch

        facts["torch"] = torch.__version__
        facts["torch_device"] = torch_device()
        facts["torch_threads"] = args.torch_threads
    except ImportError:
        facts["torch"] = None
    return facts


def fmt(v, spec):
    if v is None:
        width = "".join(ch for ch in spec if ch.isdigit() or ch == ".").split(".")[0]
        return format("-", f">{width or 1}")
    return format(v, spec)


def ms_str(ms: float) -> str:
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def suggest_auto(rows, backend: str) -> tuple[dict, list[str]]:
    """What ``lstm_lab.kernels.AUTO_IMPL`` should say for ``backend`` from this run's rows, with the evidence.

    Per cell family, over every (shape, dtype, cell) group in which all of the family's measured lstm_lab
    impls ran: the impl fastest in the most groups (ties: the larger geometric-mean speed-up over
    ``scan``). Returns ``({(backend, family): impl}, lines)``; a line names the groups the choice loses.
    """
    import lstm_lab

    table, lines = {}, []
    ours = [r for r in rows if r["impl"] not in REFERENCE_IMPLS]
    for family in dict.fromkeys(lstm_lab.VARIANTS[r["cell"]].family for r in ours):
        fam = [r for r in ours if lstm_lab.VARIANTS[r["cell"]].family == family]
        impls = list(dict.fromkeys(r["impl"] for r in fam))
        groups = {}
        for r in fam:
            groups.setdefault((r["T"], r["B"], r["H"], r["dtype"], r["cell"]), {})[r["impl"]] = r["ms"]
        full = {g: v for g, v in groups.items() if len(v) == len(impls)}
        if not full or "scan" not in impls:
            continue
        wins = {i: [g for g, v in full.items() if min(v, key=v.get) == i] for i in impls}
        gmean = {i: float(np.exp(np.mean([np.log(v["scan"] / v[i]) for v in full.values()]))) for i in impls}
        best = max(impls, key=lambda i: (len(wins[i]), gmean[i]))
        table[(backend, family)] = best
        lost = [g for g in full if g not in wins[best]]
        lines.append(f"AUTO_IMPL[({backend!r}, {family!r})] = {best!r}  # fastest in {len(wins[best])}/{len(full)} "
                     f"(shape, dtype, cell) groups, {gmean[best]:.2f}x scan (geometric mean)"
                     + (f"; slower at {', '.join(f'{T}/{B}/{H} {d} {c}' for T, B, H, d, c in lost)}" if lost else ""))
    return table, lines


def markdown(rows, shapes, dtype) -> str:
    rows = [r for r in rows if r["dtype"] == dtype]
    if not rows:
        return ""
    multi_impl = len({r["impl"] for r in rows if r["impl"] not in REFERENCE_IMPLS}) > 1
    labels = []
    for r in rows:
        if r["impl"] == "torch":
            lab = f"torch.nn.{ {'lstm': 'LSTM', 'gru': 'GRU', 'rnn': 'RNN'}[r['cell']] }"
        elif r["impl"] == "flax":
            lab = "flax OptimizedLSTMCell"
        elif r["impl"] == "cudnn":
            lab = "cuDNN (jax.experimental.rnn)"
        else:
            lab = f"{r['cell']} ({r['impl']})" if multi_impl else r["cell"]
        r["_label"] = lab
        if lab not in labels:
            labels.append(lab)
    # lstm_lab first (in the order measured), references last.
    ref_labels = [l for l in labels if any(r["_label"] == l and r["impl"] in REFERENCE_IMPLS for r in rows)]
    labels = [l for l in labels if l not in ref_labels] + ref_labels
    cell = {(r["_label"], (r["T"], r["B"], r["H"])): r for r in rows}
    head = "| cell | " + " | ".join(f"T={T} B={B} H={H}" for T, B, H in shapes) + " |"
    out = [f"**{dtype}**, ms per forward+backward (ratio vs torch, > 1 = faster)", "", head,
           "|---|" + "---:|" * len(shapes)]
    for lab in labels:
        vals = []
        for s in shapes:
            r = cell.get((lab, s))
            if r is None:
                vals.append("-")
            elif r["ratio_vs_torch"] is None or r["impl"] == "torch":
                vals.append(ms_str(r["ms"]))
            else:
                vals.append(f"{ms_str(r['ms'])} ({r['ratio_vs_torch']:.2f})")
        out.append(f"| {lab} | " + " | ".join(vals) + " |")
    for r in rows:
        r.pop("_label", None)
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", help="comma-separated TxBxH (default: the anchors of the backend)")
    ap.add_argument("--cells", help="comma-separated lstm_lab presets (default: all)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--impls", help="comma-separated lstm_lab impls (default: every kernel of lstm_lab.kernels; "
                                    "pallas only on GPU, elsewhere it runs in interpret mode)")
    ap.add_argument("--matmul-precision", choices=("default", "highest"), default="default",
                    help="jax_default_matmul_precision for every lstm_lab and Flax row: on GPU 'default' lets "
                         "float32 matmuls use TF32 (scan and the pallas kernel alike), 'highest' does not")
    ap.add_argument("--block-b", type=int, default=16, help="pallas: batch rows per program")
    ap.add_argument("--block-h", type=int, help="pallas: hidden columns per program (split H across programs)")
    ap.add_argument("--block-k", type=int, default=64, help="pallas with --block-h: contraction chunk")
    ap.add_argument("--num-warps", type=int, help="pallas: Triton warps per program (default: the kernel's, 8)")
    ap.add_argument("--repeats", type=int, default=20, help="timed runs; the median is reported")
    ap.add_argument("--block", type=int, default=2,
                    help="timed runs per visit of a candidate, after one untimed run (candidates take turns)")
    ap.add_argument("--unroll", type=int, default=1, help="scan unroll (lstm_lab and flax)")
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1,
                    help="torch.set_num_threads (default os.cpu_count(); see the note on shared machines)")
    ap.add_argument("--skip", default="", help="comma-separated references to leave out: torch,flax,cudnn")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: first CPU anchor, cells lstm,gru,cifg, float32, repeats 5")
    ap.add_argument("--out", help="write {machine, rows} as JSON (rewritten after every (shape, dtype) group)")
    ap.add_argument("--deadline", type=float, default=0.0,
                    help="seconds: start no new (shape, dtype) group after this long (0: no limit); the groups "
                         "left out are noted and listed in the JSON")
    ap.add_argument("--markdown", action="store_true", help="also print Markdown tables (one per dtype)")
    args = ap.parse_args(argv)

    import jax

    import lstm_lab
    from lstm_lab import kernels

    backend = jax.default_backend()
    if args.quick:
        args.shapes = args.shapes or "x".join(map(str, CPU_ANCHORS[0]))
        args.cells = args.cells or "lstm,gru,cifg"
        args.dtypes = "float32"
        args.repeats = 5
    shapes = parse_shapes(args.shapes) if args.shapes else (GPU_ANCHORS if backend == "gpu" else CPU_ANCHORS)
    cells = csv(args.cells) or list(lstm_lab.VARIANTS)
    unknown = [c for c in cells if c not in lstm_lab.VARIANTS]
    if unknown:
        raise SystemExit(f"--cells: unknown preset(s) {unknown}; expected from {', '.join(lstm_lab.VARIANTS)}")
    if "lstm" not in cells:
        cells = ["lstm"] + cells  # the vs_lstm reference
    else:
        cells = ["lstm"] + [c for c in cells if c != "lstm"]
    dtypes = csv(args.dtypes)
    for d in dtypes:
        if d not in ("float32", "bfloat16"):
            raise SystemExit(f"--dtypes: expected float32 and/or bfloat16; got {d!r}")
    all_impls = list(kernels.names())
    impls = csv(args.impls) or [i for i in all_impls if backend == "gpu" or i != "pallas"]
    if args.matmul_precision != "default":
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    kernel_options = {"block_b": args.block_b}
    if args.block_h:
        kernel_options.update(block_h=args.block_h, block_k=args.block_k)
    if args.num_warps:
        kernel_options["num_warps"] = args.num_warps
    bad = [i for i in impls if i not in all_impls]
    if bad:
        raise SystemExit(f"--impls: unknown {bad}; lstm_lab.kernels.names() = {kernels.names()}")
    skip = set(csv(args.skip))

    have_torch = "torch" not in skip
    if have_torch:
        try:
            import torch

            torch.set_num_threads(args.torch_threads)
        except ImportError:
            have_torch = False
            note("torch is not installed: torch rows and ratios skipped")
    have_cudnn = "cudnn" not in skip and backend == "gpu"
    if "cudnn" not in skip and backend != "gpu":
        note(f"jax.experimental.rnn (cuDNN) skipped: backend is {backend!r}, not 'gpu'")
    have_flax = "flax" not in skip

    facts = machine_facts(args)
    log(f"# {facts['backend']} ({facts['device_kind']}{', ' + facts['cpu_model'] if 'cpu_model' in facts else ''}; {facts.get('cpu_simd_flags', '')}), "
        f"{facts['cpu_count']} cpus; jax {facts['jax']}, flax {facts['flax']}, torch {facts['torch']} "
        f"on {facts.get('torch_device')}; "
        f"impls {impls}; repeats {args.repeats}, unroll {args.unroll}; matmul precision {args.matmul_precision}"
        + (f"; pallas {kernel_options}" if "pallas" in impls else ""))
    if "loadavg_start" in facts:
        log(f"# load average at start: {' '.join(f'{v:.2f}' for v in facts['loadavg_start'])}")
        if have_torch and facts.get("torch_device") == "cpu" and args.torch_threads > 1 \
                and facts["loadavg_start"][0] > 0.5:
            note(f"the machine is busy (load {facts['loadavg_start'][0]:.2f}): torch's OpenMP threads wait on "
                 f"each other every step, and with another process on a core a torch step can be 10-100x "
                 f"slower; compare with --torch-threads 1")
    header = f"{'T':>5} {'B':>4} {'H':>5} {'dtype':<9} {'impl':<8} {'cell':<9} {'ms':>10} {'ratio':>7} {'vs_lstm':>8}"
    log(header)

    rows = []
    t_start = time.perf_counter()

    def prepare(make, impl, cell, T, B, H, dtype):
        """Build one step, compile it and run the warm-up; None (with a note) if it can't run."""
        try:
            fn = make()
            fn()  # compilation (or oneDNN primitive creation for torch)
            for _ in range(WARMUP):
                fn()
            return fn
        except Exception as e:  # noqa: BLE001 - a benchmark row that can't run is reported, not fatal
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            note(f"{impl} {cell} {dtype} T={T} B={B} H={H} skipped: {type(e).__name__}: {msg[:200]}")
            if os.environ.get("LAYER_SPEED_DEBUG"):
                traceback.print_exc()
            return None

    def write_json():
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            tmp = args.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"machine": facts, "rows": rows}, f, indent=2)
            os.replace(tmp, args.out)

    for (T, B, H) in shapes:
        for dtype in dtypes:
            if args.deadline and time.perf_counter() - t_start > args.deadline:
                note(f"T={T} B={B} H={H} {dtype} skipped: past --deadline {args.deadline:g} s")
                facts.setdefault("skipped_by_deadline", []).append([T, B, H, dtype])
                continue
            # (impl, cell, make, torch reference key, is the torch reference, is the vs_lstm reference)
            todo = []
            if have_torch:
                for tcell in ("lstm", "gru", "rnn"):
                    if any(reference_cell(c) == tcell for c in cells):
                        todo.append(("torch", tcell, lambda tcell=tcell: torch_step(tcell, T, B, H, dtype),
                                     tcell, True, tcell == "lstm"))
            for impl in impls:
                for cell in cells:
                    todo.append((impl, cell,
                                 lambda cell=cell, impl=impl: lstm_lab_step(cell, impl, T, B, H, dtype, args.unroll,
                                                                               kernel_options),
                                 reference_cell(cell), False, cell == "lstm"))
            if have_flax and dtype == "float32":
                todo.append(("flax", "lstm", lambda: flax_step(T, B, H, dtype, args.unroll), "lstm", False, True))
            if have_cudnn:
                todo.append(("cudnn", "lstm", lambda: cudnn_step(T, B, H, dtype), "lstm", False, True))
            ready = []
            for impl, cell, make, ref, is_ref, is_lstm in todo:
                fn = prepare(make, impl, cell, T, B, H, dtype)
                if fn is not None:
                    ready.append((impl, cell, fn, ref, is_ref, is_lstm))
            # Timed runs interleaved (one of each per round), so that load from other processes,
            # which drifts over seconds, falls on every candidate of the group alike.
            times = [[] for _ in ready]
            # Each visit starts with one untimed run: torch's OpenMP threads spin-wait for a while after a step and
            # slowed whichever candidate ran next by up to 1.4x (2 cores); the untimed run absorbs that, for every
            # candidate alike (a pause instead let torch's threads fall asleep, and waking them cost torch 40%).
            per_visit = max(1, args.block)
            for _ in range(-(-args.repeats // per_visit)):
                for k, (_, _, fn, *_rest) in enumerate(ready):
                    fn()
                    for _ in range(per_visit):
                        t0 = time.perf_counter()
                        fn()
                        times[k].append(time.perf_counter() - t0)
            med = {(impl, cell): 1e3 * statistics.median(times[k]) for k, (impl, cell, *_r) in enumerate(ready)}
            for impl, cell, _, ref, is_ref, is_lstm in ready:
                ms = med[(impl, cell)]
                ref_ms = med.get(("torch", ref)) if ref else None
                lstm_ms = med.get((impl, "lstm"))
                ratio = 1.0 if is_ref else ref_ms / ms if ref_ms is not None else None
                vs = 1.0 if is_lstm else ms / lstm_ms if lstm_ms is not None else None
                rows.append({"impl": impl, "cell": cell, "dtype": dtype, "T": T, "B": B, "H": H,
                             "ms": round(ms, 4), "ratio_vs_torch": None if ratio is None else round(ratio, 4),
                             "vs_lstm": None if vs is None else round(vs, 4)})
                log(f"{T:>5} {B:>4} {H:>5} {dtype:<9} {impl:<8} {cell:<9} {ms:>10.2f} {fmt(ratio, '>7.2f')} "
                    f"{fmt(vs, '>8.2f')}")
            write_json()  # after every group: a run stopped from outside keeps what it measured
    if have_flax and "bfloat16" in dtypes:
        note("flax OptimizedLSTMCell measured in float32 only")

    elapsed = time.perf_counter() - t_start
    try:
        facts["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    facts["elapsed_s"] = round(elapsed, 1)
    log(f"# {len(rows)} rows in {elapsed:.0f} s"
        + (f"; load average at end: {' '.join(f'{v:.2f}' for v in facts['loadavg_end'])}"
           if "loadavg_end" in facts else ""))

    if args.markdown:
        for dtype in dtypes:
            table = markdown(rows, shapes, dtype)
            if table:
                log()
                log(table)
    _, auto_lines = suggest_auto(rows, backend)
    if auto_lines:
        log()
        log("# impl='auto' from this run (lstm_lab.kernels.AUTO_IMPL; 'scan' is the default, needs no entry):")
        for line in auto_lines:
            log(line)
    if args.out:
        write_json()
        log(f"# wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
