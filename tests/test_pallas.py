"""impl="pallas" (the whole recurrence in one Pallas kernel launch, forward and backward): its schedules and
options compute the same function and the same gradients as the plain scan (every cell against the float64
reference is tests/test_kernels.py). On a CPU the kernel runs in Pallas interpret mode; its lowering to Triton
(what a GPU runs) is checked by exporting for CUDA, which needs no GPU."""

from __future__ import annotations

import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lstm_lab
from lstm_lab import cells
from lstm_lab.kernels import pallas as pallas_kernel
from lstm_lab.kernels.pallas import plan as pallas_plan
from lstm_lab.recurrent import scan_cell, scan_cell_pallas

from conftest import DISTINCT_PRESETS, KERNEL_SPECS


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    """On a GPU, float32 matmuls default to TF32 (scan and kernel alike, but not in the same order): pin
    them to full precision so the 1e-5 comparisons mean the same on every backend. No effect on a CPU."""
    with jax.default_matmul_precision("highest"):
        yield


SPECS = KERNEL_SPECS


def _case(spec, T, B, H, seed, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    G = len(spec.gate_names())
    shapes = cells.param_shapes(spec, 1, H)
    params = {k: jnp.asarray(rng.normal(size=s) / np.sqrt(H if k.startswith("R") else 1), dtype)
              for k, s in shapes.items() if k not in ("W", "b")}
    xp = jnp.asarray(rng.normal(size=(T, B, G * H)), jnp.float32)
    carry0 = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.05, 0.95, size=a.shape), jnp.float32),
                          cells.zero_carry(spec, H, (B,), jnp.float32))
    lengths = jnp.asarray(rng.integers(1, T + 1, size=B), jnp.int32)
    cts = jnp.asarray(rng.normal(size=(T, B, H)), jnp.float32)
    return params, xp, carry0, lengths, cts


def _run(fn, spec, params, xp, carry0, lengths, cts, reverse):
    """Outputs, final carry and the gradients of a loss of both, in one compiled program."""
    def loss(params, xp, carry0):
        ys, cf, _ = fn(spec, params, xp, carry0, lengths=lengths, reverse=reverse)
        value = jnp.sum(ys.astype(jnp.float32) * cts) + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(cf))
        return value, (ys, cf)

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(params, xp, carry0)
    return out, grads


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _assert_close(got, want, tol, what):
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
        assert g.shape == w.shape, f"{what}{jax.tree_util.keystr(path)}: shape {g.shape} != {w.shape}"
        err = _rel(g, w)
        assert err < tol, f"{what}{jax.tree_util.keystr(path)}: relative error {err:.2e} >= {tol}"


def test_kernel_several_programs_and_shapes():
    """B=40 with block_b=16: three programs (the last one padded); H=32 without padding; no lengths."""
    spec = SPECS["lstm"]
    params, xp, carry0, _, cts = _case(spec, T=9, B=40, H=32, seed=7)
    fn = lambda *a, **k: scan_cell_pallas(*a, **k, block_b=16)
    _assert_close(_run(fn, spec, params, xp, carry0, None, cts, False),
                  _run(scan_cell, spec, params, xp, carry0, None, cts, False), 1e-5, "B=40")


def test_layer_bidirectional_bf16():
    """Through the layer: bidirectional, seq_lengths, bfloat16 compute. The forward equals the bf16 scan to
    1e-3; the gradients (bf16 weight gradients) are no further from the float32 scan's than the bf16 scan's
    own are (x 1.25)."""
    def grads(impl, dtype):
        m = lstm_lab.RNN(5, 24, "lstm", bidirectional=True, impl=impl, dtype=dtype, rngs=nnx.Rngs(0))
        x = jax.random.normal(jax.random.PRNGKey(3), (3, 6, 5))
        sl = jnp.array([6, 2, 5])
        g = jax.random.normal(jax.random.PRNGKey(4), (3, 6, 48))

        def loss(m, x):
            y, c = m(x, seq_lengths=sl)
            return jnp.sum(y.astype(jnp.float32) * g) + sum(jnp.sum(jnp.sin(v)) for v in jax.tree.leaves(c)), y

        (_, y), grads = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))(m, x)
        return y, jax.tree.leaves(grads)

    _, g32 = grads("scan", jnp.float32)
    ys, gs = grads("scan", jnp.bfloat16)
    yk, gk = grads("pallas", jnp.bfloat16)
    assert yk.dtype == jnp.bfloat16
    assert _rel(yk, ys) < 1e-3
    for a, b, c in zip(gk, gs, g32):
        assert _rel(a, c) <= 1.25 * _rel(b, c) + 1e-6


@pytest.mark.parametrize("name", DISTINCT_PRESETS + ["gru_reset_after"])
def test_lowers_to_triton(name):
    """Forward and backward lower to Triton kernels for CUDA (no GPU needed to lower): every primitive the
    cell math uses has a Triton lowering, and the forward is one kernel launch, forward+backward two."""
    spec = SPECS[name]
    why = pallas_plan.pallas_unsupported(spec, 40)
    if why:
        pytest.skip(why)
    params, xp, carry0, lengths, _ = _case(spec, T=5, B=20, H=40, seed=1)
    f = lambda p, xp, c0: scan_cell_pallas(spec, p, xp, c0, lengths=lengths, interpret=False)[:2]
    g = jax.grad(lambda *a: sum(jnp.sum(v) for v in jax.tree.leaves(f(*a))), argnums=(0, 1, 2))
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    for fn, launches in ((f, 1), (g, 2)):
        exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(params, xp, carry0)
        assert exported.mlir_module().count("stablehlo.custom_call @__gpu$xla.gpu.triton") == launches


def test_registry_entry_takes_the_kernels_options():
    """The entry (imported without Pallas) names fused_recurrence's keyword options, which the layer checks
    kernel_options against."""
    from lstm_lab.kernels.pallas.vjp import fused_recurrence

    params = inspect.signature(fused_recurrence).parameters.values()
    assert pallas_kernel.OPTIONS == tuple(p.name for p in params if p.kind == p.KEYWORD_ONLY)
    assert lstm_lab.kernels.get("pallas").options == pallas_kernel.OPTIONS


def test_unsupported_is_refused():
    for cell, H, kw, words in (("gru", 4096, {}, "256 column blocks of 16 for hidden size 4096 exceed the 132"),
                               ("lstm", 8, {"dtype": jnp.float64}, "got dtype=float64"),
                               ("lstm", 8, {"kernel_options": {"blockb": 16}}, r"unknown kernel_options \['blockb'\]")):
        with pytest.raises(ValueError, match=words):
            lstm_lab.RNN(3, H, cell, impl="pallas", rngs=nnx.Rngs(0), **kw)
    spec = SPECS["lstm"]
    params, xp, carry0, _, _ = _case(spec, T=2, B=2, H=8, seed=0)
    with pytest.raises(ValueError, match="block_b must be a power of two >= 16; got 24"):
        scan_cell_pallas(spec, params, xp, carry0, block_b=24)


def test_auto_takes_the_kernel_where_the_table_says_and_falls_back(monkeypatch):
    """A backend whose AUTO_IMPL entry is "pallas" runs the kernel; sizes or dtypes it cannot take get the scan."""
    from lstm_lab import kernels

    monkeypatch.setitem(kernels.AUTO_IMPL, (jax.default_backend(), "gru"), "pallas")
    x = jnp.ones((2, 3, 4), jnp.float32)

    def runs_kernel(H, dtype=jnp.float32):
        m = lstm_lab.RNN(4, H, "gru", dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
        return "pallas_call" in str(jax.make_jaxpr(lambda x: m(x.astype(dtype))[0])(x))

    assert runs_kernel(8)
    assert runs_kernel(200)  # 3 x 256 x 256 f32 weights do not fit one program: split in 4 column blocks
    assert not runs_kernel(8, jnp.float64)
    monkeypatch.setattr(pallas_plan, "SM_COUNT", 2)
    assert not runs_kernel(200)  # 4 column blocks would not all be resident on 2 multiprocessors


@pytest.mark.parametrize("name", ["fgr", "gru_reset_after", "gru", "mgu", "rnn"])
def test_hidden_split_across_programs_matches_scan(name):
    """block_h < H: the hidden size split across programs (2 column blocks, 2 contraction chunks, 2 batch
    tiles, reverse with lengths; FGR with peepholes: the h and the gate exchange; the GRU with reset_after:
    b_hn and the candidate's own product; Cho's GRU and the MGU: r * h (f * h) and dq exchanged mid-step;
    the RNN: one gate, no cell state), interpret mode running the blocks in turn where a GPU runs them side by side
    with a barrier."""
    spec = SPECS[name]
    case = _case(spec, T=5, B=20, H=24, seed=11)
    fn = lambda *a, **k: scan_cell_pallas(*a, **k, block_h=16, block_k=16)
    _assert_close(_run(fn, spec, *case, True), _run(scan_cell, spec, *case, True), 1e-5, name)


def test_split_plan_and_streamed_weights():
    """Without block_h the plan splits H only when the whole weights exceed the shared-memory budget, and
    streams the weights when even 16 columns do not fit; streamed weights compute the same function."""
    plan = pallas_plan.launch_plan
    lstm, fgr = SPECS["lstm"], SPECS["fgr"]
    assert plan(lstm, 64, 8, 4, 16, None, 132, None) == (16, 64, False)        # 64 KiB: whole
    assert plan(lstm, 128, 8, 2, 16, None, 132, None) == (16, 128, False)      # bf16: 128 KiB, whole
    assert plan(lstm, 128, 8, 4, 16, None, 132, None) == (16, 64, False)       # f32: 256 KiB -> 2 blocks
    assert plan(lstm, 1024, 256, 2, 16, None, 132, None) == (128, 16, False)   # 64 blocks: 2 batch tiles
    assert plan(lstm, 1024, 64, 4, 16, None, 132, None) == (32, 16, True)      # 256 KiB even at 16 columns
    assert plan(fgr, 64, 8, 4, 16, None, 132, None) == (16, 32, False)         # R_gates count too
    assert plan(SPECS["gru"], 256, 8, 4, 16, None, 132, None) == (16, 64, False)  # 3 gates: 192 KiB at 64
    assert plan(lstm, 1024, 512, 2, 16, 16, 132, None) == (256, 16, False)    # block_b raised to fit
    # Cho's GRU, H=1024 f32, B=256: 192 KiB of weights fit alone, but the 128-row batch tile's staging made the
    # launch ask for 232 KiB of the H200's 227 (a real run); with the tile counted the weights are streamed
    assert plan(SPECS["gru"], 1024, 256, 4, 16, None, 132, None) == (128, 16, True)
    assert plan(SPECS["gru"], 1024, 64, 4, 16, None, 132, None) == (32, 16, False)  # 192 + 8 KiB: fits
    assert "256 column blocks of 16 for hidden size 4096 exceed the 132" in plan(lstm, 4096, 8, 2, 16, None, 132, None)
    spec = SPECS["lstm"]
    case = _case(spec, T=3, B=5, H=24, seed=5)
    fn = lambda *a, **k: scan_cell_pallas(*a, **k, block_h=16, block_k=16, stream_weights=True)
    _assert_close(_run(fn, spec, *case, False), _run(scan_cell, spec, *case, False), 1e-5, "streamed")


@pytest.mark.parametrize("name", ["vanilla", "gru_reset_after", "gru", "mgu"])
def test_hidden_split_lowers_to_triton_with_its_barrier(name):
    spec = SPECS[name]
    why = pallas_plan.pallas_unsupported(spec, 40)
    if why:
        pytest.skip(why)
    params, xp, carry0, lengths, _ = _case(spec, T=5, B=20, H=40, seed=1)
    f = lambda p, xp, c0: scan_cell_pallas(spec, p, xp, c0, lengths=lengths, interpret=False, block_h=16)[:2]
    g = jax.grad(lambda *a: sum(jnp.sum(v) for v in jax.tree.leaves(f(*a))), argnums=(0, 1, 2))
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    text = jax.export.export(jax.jit(g), platforms=["cuda"], disabled_checks=checks)(params, xp, carry0).mlir_module()
    assert text.count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 2
    assert "grid_y = 4" in text  # 64 padded columns / 16 per program
    # the barrier: CTA barriers around an atomic counter and a spin loop
    assert "atomic_rmw" in text and "while" in text and "barrier" in text


def _population(spec, K, T, B, H):
    """K members' cases stacked on a leading axis (a vmapped population)."""
    cases = [_case(spec, T, B, H, seed=20 + s) for s in range(K)]
    return [jax.tree.map(lambda *a: jnp.stack(a), *[c[i] for c in cases]) for i in range(5)]


@pytest.mark.parametrize("block_h", [None, 16])
def test_population_vmap_matches_scan(block_h):
    """jax.vmap over members with their own weights (how populations train): values and gradients equal the
    vmapped scan's, with the whole hidden size in one program (population axis in the grid) and split
    (members launched in turn)."""
    spec = SPECS["lstm"]
    params, xp, carry0, lengths, cts = _population(spec, K=2, T=4, B=3, H=24)

    def member(fn, **kw):
        def loss(params, xp, carry0, lengths, cts):
            ys, cf, _ = fn(spec, params, xp, carry0, lengths=lengths, **kw)
            return jnp.sum(ys * cts) + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(cf))
        return jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=(0, 1, 2))))(params, xp, carry0, lengths, cts)

    _assert_close(member(scan_cell_pallas, block_h=block_h, block_k=16), member(scan_cell), 1e-5,
                  f"population block_h={block_h}")


def test_population_of_split_kernels_launches_members_in_turn():
    """A vmapped split kernel must not put the population axis into its grid: every program of a launch has
    to be resident for the step barrier, and the plan made room for one member's. Members run in a loop."""
    spec = SPECS["lstm"]
    params, xp, carry0, lengths, _ = _population(spec, K=3, T=5, B=20, H=40)
    f = lambda p, xp, c0, l: scan_cell_pallas(spec, p, xp, c0, lengths=l, interpret=False, block_h=16)[:2]
    g = jax.vmap(jax.grad(lambda *a: sum(jnp.sum(v) for v in jax.tree.leaves(f(*a))), argnums=(0, 1, 2)))
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    text = jax.export.export(jax.jit(g), platforms=["cuda"], disabled_checks=checks)(
        params, xp, carry0, lengths).mlir_module()
    launches = text.count("stablehlo.custom_call @__gpu$xla.gpu.triton")
    assert launches == 2
    grids = re.findall(r"grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+)", text)
    assert grids == [("2", "4", "1")] * 2, grids  # 2 batch tiles x 4 column blocks, no population axis
    assert text.count("stablehlo.while") >= 2  # the members' loops around the two launches


@pytest.mark.slow  # interpret-mode kernels compile slowly on a CPU; gpu_check.sh tests runs it compiled by Triton
def test_training_population_with_model_impl_pallas(tmp_path):
    """`model.impl: pallas` reaches the kernel from a config, through a vmapped population: its members end
    with the metrics of the same population on the scan (to 1e-5); a dtype the kernel lacks is refused by
    config field name."""
    from lstm_lab.config import Config, apply_overrides
    from lstm_lab.training import train_population
    from lstm_lab.training import train

    base = {"task.name": "copy", "task.options": {"T": 1}, "model.hidden_size": 12, "model.cell": "rnn",
            "optim.name": "adam", "train.batch_size": 8, "train.steps": 3, "train.eval_every": 3,
            "train.log_every": 3, "train.eval_batch_size": 16}
    runs = {}
    for impl in ("pallas", "scan"):
        cfgs = [apply_overrides(Config(), {**base, "model.impl": impl, "optim.learning_rate": lr, "train.seed": s})
                for lr, s in ((5e-3, 0), (2e-2, 1))]
        runs[impl] = train_population(cfgs, [tmp_path / f"{impl}{i}" for i in range(2)])
    for got, want in zip(runs["pallas"], runs["scan"]):
        assert got["population"] == 2 and got["status"] == want["status"] == "completed"
        for k, v in want["test"].items():
            assert abs(got["test"][k] - v) <= 1e-5 * max(abs(v), 1e-12), (k, got["test"][k], v)
    assert runs["pallas"][0]["test"]["loss"] != runs["pallas"][1]["test"]["loss"]
    with pytest.raises(ValueError, match=r"model.impl='pallas': .*got dtype=float64"):
        train(apply_overrides(Config(), {**base, "model.impl": "pallas", "model.dtype": "float64"}), tmp_path / "m",
              quiet=True)


def test_interpret_mode_off_gpu_is_said_once():
    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU the kernel is compiled")
    pallas_kernel._warn_interpret_once.cache_clear()
    with pytest.warns(UserWarning, match=r"interpret mode on 'cpu' \(no GPU\)"):
        lstm_lab.RNN(3, 8, "lstm", impl="pallas", rngs=nnx.Rngs(0))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lstm_lab.RNN(3, 8, "lstm", impl="pallas", rngs=nnx.Rngs(0))  # once per process and backend
        pallas_kernel._warn_interpret_once.cache_clear()
        lstm_lab.RNN(3, 8, "lstm", impl="pallas", kernel_options={"interpret": True}, rngs=nnx.Rngs(0))
