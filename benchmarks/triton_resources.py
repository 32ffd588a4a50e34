"""What Triton makes of the ``impl="pallas"`` kernels for an H100, without a GPU.

    pip install --no-deps --target /tmp/triton triton==3.6.0        # the version on the GPU machines
    python benchmarks/triton_resources.py --triton /tmp/triton [--shapes 1000x1x128,128x64x1024]
           [--cells lstm,fgr,gru] [--dtypes float32,bfloat16] [--num-warps 8] [--out results.json]

For each (shape, cell, dtype) the forward and backward kernels are lowered by Pallas to Triton IR (as
``jax.jit(jax.grad(...))`` on a GPU would), then compiled by the ``triton`` package for ``sm_90``
(``GPUTarget("cuda", 90, 32)``) and the PTX assembled with its ``ptxas -v``. Printed per kernel: the
schedule (batch rows and hidden columns per program, programs, streamed weights), the shared memory the
launch needs (an H100 block can have at most 227 KiB), registers per thread and spill bytes. Nothing runs
and no GPU is needed; the numbers are those of the pip ``triton`` (the version on the GPU machines), whose
passes may differ a little from the Triton inside jaxlib that a real run uses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

SHAPES = "128x16x256,128x64x512,128x64x1024,128x256x1024,512x32x256,1000x1x128"

_COMPILE = r"""
import json, os, subprocess, sys
sys.path.insert(0, sys.argv[1])
import triton
from triton.backends.compiler import GPUTarget
path, warps = sys.argv[2], int(sys.argv[3])
try:
    k = triton.compile(path, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1})
except Exception as e:  # noqa: BLE001
    print(json.dumps({"error": f"{type(e).__name__}: {str(e)[:300]}"})); sys.exit(0)
with open(path + ".ptx", "w") as f:
    f.write(k.asm["ptx"])
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
r = subprocess.run([ptxas, "-arch=sm_90a", "-v", path + ".ptx", "-o", os.devnull], capture_output=True, text=True)
info = {"shared": k.metadata.shared}
for line in r.stderr.splitlines():
    if "Used" in line and "registers" in line:
        info["registers"] = int(line.split("Used")[1].split("registers")[0])
    if "spill stores" in line:
        info["spill_stores"] = int(line.split("bytes spill stores")[0].split(",")[-1])
        info["spill_loads"] = int(line.split("bytes spill loads")[0].split(",")[-1])
print(json.dumps(info))
"""


def triton_ir(cell, T, B, H, dtype_name, opts):
    """The Triton IR (text) of the forward and backward kernels of ``impl="pallas"`` for one layer."""
    import jax
    import jax.numpy as jnp
    from jax._src.pallas.triton import lowering

    from lstm_lab import cells
    from lstm_lab.kernels.pallas import plan as pallas_plan
    from lstm_lab.recurrent import init_params, run_direction

    captured = []
    original = lowering.lower_jaxpr_to_triton_module

    def capture(*a, **k):
        result = original(*a, **k)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    spec = cells.resolve_cell(cell)
    dtype = jnp.dtype(dtype_name)
    params = {k: v.astype(dtype if k in ("R", "R_gates") else jnp.float32)
              for k, v in init_params(spec, 4, H, jax.random.key(0)).items() if k not in ("W", "b")}
    xp = jnp.zeros((T, B, len(spec.gate_names()) * H), jnp.float32)
    carry0 = cells.zero_carry(spec, H, (B,), jnp.float32)

    def f(p, xp, c0):
        return run_direction("pallas", spec, p, xp, c0, interpret=False, **opts)[:2]

    g = jax.grad(lambda *a: sum(jnp.sum(v) for v in jax.tree.leaves(f(*a))), argnums=(0, 1, 2))
    lowering.lower_jaxpr_to_triton_module = capture
    try:
        jax.export.export(jax.jit(g), platforms=["cuda"],
                          disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
            params, xp, carry0)
    finally:
        lowering.lower_jaxpr_to_triton_module = original
    plan = pallas_plan.launch_plan(spec, H, B, dtype.itemsize, opts.get("block_b", 16), opts.get("block_h"),
                                   pallas_plan.SM_COUNT, opts.get("stream_weights"))
    return captured, plan


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--triton", required=True, help="a directory holding the triton package (pip --target)")
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated TxBxH (default: the GPU anchors)")
    ap.add_argument("--cells", default="lstm,fgr,gru")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--num-warps", type=int, default=8)
    ap.add_argument("--block-b", type=int, default=16)
    ap.add_argument("--block-h", type=int)
    ap.add_argument("--out", help="write the rows as JSON")
    args = ap.parse_args(argv)
    if not os.path.isdir(os.path.join(args.triton, "triton")):
        raise SystemExit(f"--triton {args.triton}: no triton package there; pip install --no-deps --target "
                         f"{args.triton} triton==3.6.0")
    from lstm_lab.kernels.pallas.plan import pow2

    opts = {"block_b": args.block_b, "num_warps": args.num_warps}
    if args.block_h:
        opts["block_h"] = args.block_h
    rows = []
    print(f"{'T':>5} {'B':>4} {'H':>5} {'cell':<5} {'dtype':<9} {'rows':>4} {'cols':>4} {'progs':>5} {'stream':<6} "
          f"{'kernel':<4} {'smem KiB':>8} {'regs':>4} {'spill B':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            T, B, H = (int(v) for v in shape.split("x"))
            for cell in args.cells.split(","):
                for dtype in args.dtypes.split(","):
                    try:
                        irs, plan = triton_ir(cell, T, B, H, dtype, opts)
                    except ValueError as e:
                        print(f"{T:>5} {B:>4} {H:>5} {cell:<5} {dtype:<9} not taken: {e}")
                        continue
                    bB, bH, stream = plan
                    programs = -(-B // bB) * (pow2(H) // bH)
                    for name, ir in zip(("fwd", "bwd"), irs):
                        path = os.path.join(tmp, f"{cell}_{dtype}_{shape}_{name}.ttir")
                        with open(path, "w") as f:
                            f.write(ir)
                        out = subprocess.run([sys.executable, "-c", _COMPILE, args.triton, path, str(args.num_warps)],
                                             capture_output=True, text=True)
                        info = json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else \
                            {"error": out.stderr[-300:]}
                        row = {"T": T, "B": B, "H": H, "cell": cell, "dtype": dtype, "kernel": name,
                               "block_b": bB, "block_h": bH, "programs": programs, "stream": stream,
                               "num_warps": args.num_warps, **info}
                        rows.append(row)
                        if args.out:  # after every kernel: a cut-off run keeps what it measured
                            with open(args.out, "w") as f:
                                json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=1)
                        if "error" in info:
                            print(f"{T:>5} {B:>4} {H:>5} {cell:<5} {dtype:<9} {name}: {info['error']}")
                            continue
                        spill = info.get("spill_stores", 0) + info.get("spill_loads", 0)
                        print(f"{T:>5} {B:>4} {H:>5} {cell:<5} {dtype:<9} {bB:>4} {bH:>4} {programs:>5} "
                              f"{str(stream):<6} {name:<4} {info['shared'] / 1024:>8.0f} {info.get('registers', 0):>4} "
                              f"{spill:>8}", flush=True)


if __name__ == "__main__":
    main()
