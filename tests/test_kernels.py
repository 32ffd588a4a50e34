"""Every kernel of lstm_lab.kernels (impl) x every cell against the float64 NumPy reference (tests/reference.py),
through the layer: outputs, final carries, gradients, per-sequence lengths and the reverse direction; a combination
a kernel does not support is skipped with its own reason. Then what is particular to one kernel's options
(scan_vjp's remat), and the registry itself.

The Pallas kernel runs in interpret mode on a CPU (slow: the shapes are small); tests/test_pallas.py has its
schedules, its lowering to Triton and its options."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import lstm_lab
from lstm_lab import kernels

from conftest import KERNEL_SPECS, carry_to_ref, layer_params, random_carry, randomize
import reference

IMPLS = kernels.names()
F, H, T = 2, 3, 5  # H < 16 and B < 16: the Pallas kernel pads both
LENGTHS = np.array([5, 2, 1])  # one full-length sequence, one of length 1


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    """On a GPU, float32 matmuls default to TF32: pin them to full precision so the float32 tolerances mean the
    same on every backend. No effect on a CPU."""
    with jax.default_matmul_precision("highest"):
        yield


def _skip_unsupported(impl, spec, dtype):
    why = kernels.impl_unsupported(impl, spec, H, dtype=dtype, param_dtype=dtype)
    if why:
        pytest.skip(why)


def _case(impl, name, dtype, *, seed=0):
    """A randomized bidirectional layer, inputs, a random initial carry and output cotangents."""
    spec = KERNEL_SPECS[name]
    _skip_unsupported(impl, spec, dtype)
    layer = randomize(lstm_lab.RNN(F, H, spec, bidirectional=True, impl=impl, param_dtype=dtype, rngs=nnx.Rngs(0)),
                      seed, scale=0.5)
    rng = np.random.default_rng(seed + 1)
    x = jnp.asarray(rng.normal(size=(len(LENGTHS), T, F)), dtype)
    carry = random_carry(layer, (len(LENGTHS),), seed + 2, dtype)
    g = jnp.asarray(rng.normal(size=(len(LENGTHS), T, 2 * H)), dtype)
    return layer, x, carry, g


def _loss(y, final, g):
    return jnp.sum(y * g) + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(final))


def _ref_loss(spec, params, x, carry, g, lengths):
    y, finals, _ = reference.run_layer(spec, params, x, lengths=lengths, initial=carry)
    return np.sum(y * g) + sum(np.sum(np.sin(v)) for layer in finals for d in layer for v in d.values())


def _finite_differences(f, arrays, eps=1e-6):
    """Central differences of the float64 scalar ``f()`` by every element of every array (perturbed in place)."""
    out = []
    for a in arrays:
        grad = np.zeros_like(a)
        for i in np.ndindex(a.shape):
            v = a[i]
            a[i] = v + eps
            up = f()
            a[i] = v - eps
            down = f()
            a[i] = v
            grad[i] = (up - down) / (2 * eps)
        out.append(grad)
    return out


_REF_GRADS: dict = {}


def _reference_gradients(name, layer, x, carry, g):
    """d loss / d (params[layer][direction][name], x, initial[layer][direction][field]) of the reference, by
    finite differences in float64; the same for every kernel (the case is), so computed once per cell."""
    key = (name, np.asarray(x).dtype.name, len(layer.cells))
    if key not in _REF_GRADS:
        spec = KERNEL_SPECS[name]
        params = layer_params(layer)
        x64 = np.asarray(x, np.float64)
        c64 = carry_to_ref(carry, (len(LENGTHS),))
        g64 = np.asarray(g, np.float64)
        leaves = [p[k] for lp in params for p in lp for k in sorted(p)] + [x64] + \
                 [c[k] for lc in c64 for c in lc for k in sorted(c)]
        grads = iter(_finite_differences(lambda: _ref_loss(spec, params, x64, c64, g64, LENGTHS), leaves))
        _REF_GRADS[key] = ([[{k: next(grads) for k in sorted(p)} for p in lp] for lp in params], next(grads),
                           [[{k: next(grads) for k in sorted(c)} for c in lc] for lc in c64])
    return _REF_GRADS[key]


def _assert_close_to(got, want, tol, what):
    """Relative to the whole array (its norm, and its largest entry)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    norm = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
    peak = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
    assert norm < tol and peak < tol, f"{what}: relative error {norm:.2e} (norm), {peak:.2e} (max) >= {tol}"


def _apply(layer, lengths):
    """``(params, x, carry) -> (y, final carry)`` of ``layer``, and its parameters."""
    graphdef, params = nnx.split(layer)
    sl = None if lengths is None else jnp.asarray(lengths)
    return (lambda params, x, carry: nnx.merge(graphdef, params)(x, seq_lengths=sl, initial_carry=carry)), params


def _check_outputs(layer, spec, x, carry, lengths, y, final, rtol, atol):
    """Outputs and final carries against the reference; outputs past each end exactly zero."""
    B = x.shape[0]
    y_ref, fin_ref, _ = reference.run_layer(spec, layer_params(layer), np.asarray(x, np.float64), lengths=lengths,
                                            initial=carry_to_ref(carry, (B,)))
    assert y.dtype == x.dtype and y.shape == (B, T, 2 * H)
    np.testing.assert_allclose(np.asarray(y, np.float64), y_ref, rtol=rtol, atol=atol)
    for li, layer_final in enumerate(final):
        for d, state in enumerate(layer_final):
            assert type(state) is lstm_lab.cells.carry_type(spec)
            for k, v in state._asdict().items():
                np.testing.assert_allclose(np.asarray(v, np.float64), fin_ref[li][d][k], rtol=rtol, atol=atol,
                                           err_msg=f"final carry [{li}][{d}].{k}")
    if lengths is not None:
        past = np.arange(T)[None, :] >= lengths[:, None]
        assert np.all(np.asarray(y)[past] == 0)


# ---------------------------------------------------------------------------
# The battery: every kernel x every cell against the reference
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(KERNEL_SPECS))
@pytest.mark.parametrize("impl", IMPLS)
def test_float32_matches_reference(impl, name):
    """float32, bidirectional, per-sequence lengths (and none), a random initial carry: outputs and final carries
    to rtol 1e-5 / atol 1e-6; every gradient (weights, peepholes, b_hn, inputs, initial carry) of a loss of both
    within 1e-5 (relative) of the float64 reference's, by finite differences; gradients in the parameters' dtype."""
    spec = KERNEL_SPECS[name]
    layer, x, carry, g = _case(impl, name, jnp.float32, seed=sum(map(ord, name)))
    f, params = _apply(layer, None)
    _check_outputs(layer, spec, x, carry, None, *jax.jit(f)(params, x, carry), rtol=1e-5, atol=1e-6)
    f, params = _apply(layer, LENGTHS)

    def loss(params, x, carry):
        y, final = f(params, x, carry)
        return _loss(y, final, g), (y, final)

    (_, (y, final)), (dp, dx, dc) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        params, x, carry)
    _check_outputs(layer, spec, x, carry, LENGTHS, y, final, rtol=1e-5, atol=1e-6)
    want_p, want_x, want_c = _reference_gradients(name, layer, x, carry, g)
    dp = nnx.to_pure_dict(dp)["cells"]
    for li, lp in enumerate(want_p):
        for d, p in enumerate(lp):
            assert sorted(dp[li][d]) == sorted(p)
            for k, want in p.items():
                assert dp[li][d][k].dtype == jnp.float32, k
                _assert_close_to(dp[li][d][k], want, 1e-5, f"d{k}[{li}][{d}]")
    assert dx.dtype == jnp.float32
    _assert_close_to(dx, want_x, 1e-5, "dx")
    got_c = carry_to_ref(dc, (len(LENGTHS),))
    for li, lc in enumerate(want_c):
        for d, c in enumerate(lc):
            for k, want in c.items():
                _assert_close_to(got_c[li][d][k], want, 1e-5, f"dcarry[{li}][{d}].{k}")
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(dc))


@pytest.mark.parametrize("name", list(KERNEL_SPECS))
@pytest.mark.parametrize("impl", IMPLS)
def test_float64_matches_reference_and_numerical_gradients(impl, name):
    """float64, bidirectional, lengths, a random initial carry: outputs and final carries to rtol 1e-12 /
    atol 1e-13; gradients against numerical differentiation (jax.test_util.check_grads), forward and reverse mode
    where the kernel has both (a custom VJP has no forward mode)."""
    spec = KERNEL_SPECS[name]
    layer, x, carry, _ = _case(impl, name, jnp.float64, seed=3)
    f, params = _apply(layer, LENGTHS)
    _check_outputs(layer, spec, x, carry, LENGTHS, *jax.jit(f)(params, x, carry), rtol=1e-12, atol=1e-13)
    modes = ("fwd", "rev") if kernels.get(impl).forward_mode else ("rev",)
    check_grads(jax.jit(f), (params, x, carry), order=1, modes=modes)


# ---------------------------------------------------------------------------
# scan_vjp: remat, and exact agreement with the scan's gradients
# ---------------------------------------------------------------------------
def _grads(impl, name, dtype, seed, *, bidirectional, lengths, B=3, T=7, F=3, H=4, layers=1, remat=False):
    m = lstm_lab.RNN(F, H, name, rngs=nnx.Rngs(0), impl=impl, bidirectional=bidirectional, num_layers=layers,
                     remat=remat, dtype=dtype, param_dtype=dtype)
    randomize(m, seed)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, T, F)), dtype)
    g = jnp.asarray(rng.normal(size=(B, T, H * (2 if bidirectional else 1))), dtype)
    c0 = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), dtype), m.initialize_carry((B,)))
    sl = None if lengths is None else jnp.asarray(lengths)

    def loss(m, x, c0):
        y, c = m(x, seq_lengths=sl, initial_carry=c0)
        return _loss(y, c, g)

    value, grads = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1, 2)))(m, x, c0)
    return value, jax.tree.leaves(grads)


def _check_equals_scan(name, dtype, tol, seed, **kw):
    va, ga = _grads("scan", name, dtype, seed, **{**kw, "remat": False})
    vb, gb = _grads("scan_vjp", name, dtype, seed, **kw)
    assert abs(float(va - vb)) <= tol * abs(float(va))
    assert len(ga) == len(gb)
    for a, b in zip(ga, gb):
        assert a.dtype == b.dtype and a.shape == b.shape
        scale = float(jnp.max(jnp.abs(a)))
        assert float(jnp.max(jnp.abs(a - b))) <= tol * max(scale, 1e-30), (name, a.shape)


@pytest.mark.parametrize("name, remat", [("vanilla", False), ("fgr", True)])
def test_scan_vjp_gradients_equal_plain_scan_float64(name, remat):
    # remat=True recomputes h_prev @ R in the backward instead of saving the pre-activations
    _check_equals_scan(name, jnp.float64, 1e-10, seed=7, bidirectional=False, lengths=None, B=2, T=9, F=5, H=3,
                       layers=2, remat=remat)


def test_scan_vjp_remat_float32():
    _check_equals_scan("cifg", jnp.float32, 1e-5, seed=3, bidirectional=True, lengths=[3, 7, 1], remat=True)


def test_scan_vjp_rejects_other_families():
    with pytest.raises(ValueError, match="scan_vjp.*LSTM family"):
        lstm_lab.RNN(3, 4, "gru", rngs=nnx.Rngs(0), impl="scan_vjp")


# ---------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------
def test_builtin_kernels_and_their_options():
    assert lstm_lab.recurrent.IMPLS == kernels.IMPLS == ("auto", "scan", "scan_vjp", "pallas", "native", "parallel")
    assert kernels.get("scan").options == ("unroll",) and kernels.get("scan").trace is not None
    assert kernels.get("scan_vjp").options == ("unroll", "remat") and not kernels.get("scan_vjp").forward_mode
    assert kernels.get("pallas").trace is None and "block_b" in kernels.get("pallas").options
    assert kernels.get("native").options == () and not kernels.get("native").forward_mode
    with pytest.raises(ValueError, match=r"unknown impl 'cudnn'; expected one of auto, scan, scan_vjp, pallas, native"):
        kernels.get("cudnn")


def test_auto_impl_table():
    from lstm_lab.recurrent import resolve_impl

    lstm, gru = lstm_lab.cells.VARIANTS["vanilla"], lstm_lab.cells.VARIANTS["gru"]
    from lstm_lab.kernels import native

    assert native.available()  # the CPU has a compiler here (tests/test_native.py: when it has none)
    assert resolve_impl("auto", lstm, "cpu") == "native" and resolve_impl("auto", gru, "cpu") == "native"
    # a compute dtype the native kernel does not take: the next entry (the LSTM family), else the scan
    assert resolve_impl("auto", lstm, "cpu", dtype=jnp.bfloat16) == "scan_vjp"
    assert resolve_impl("auto", gru, "cpu", dtype=jnp.bfloat16) == "scan"
    # the GPU (NOTES session 10): scan_vjp for the LSTM family, the scan for the others; TPU: the scan
    assert resolve_impl("auto", lstm, "gpu") == "scan_vjp" and resolve_impl("auto", gru, "gpu") == "scan"
    assert resolve_impl("auto", lstm, "tpu") == "scan" and resolve_impl("scan", lstm, "cpu") == "scan"


@pytest.fixture
def dummy():
    """A kernel registered for one test: the scan, its outputs times the option ``scale``; odd sizes refused."""
    calls = []

    def run(spec, params, xp, carry0, mask=None, *, scale=1.0):
        calls.append(scale)
        ys, cf = kernels.get("scan").run(spec, params, xp, carry0, mask)
        return ys * scale, cf

    def unsupported(spec, hidden_size, **_):
        return f"impl='dummy' needs an even hidden size; got {hidden_size}" if hidden_size % 2 else None

    kernel = kernels.register(kernels.Kernel("dummy", run, unsupported=unsupported))
    yield kernel, calls
    kernels.unregister("dummy")
    assert "dummy" not in kernels.names()


def test_a_registered_kernel_is_what_rnn_runs_by_its_name(dummy):
    kernel, calls = dummy
    assert kernel.options == ("scale",) and kernels.names()[-1] == "dummy" and kernels.get("dummy") is kernel
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 3)), jnp.float32)
    lengths = jnp.array([5, 3])
    plain = lstm_lab.RNN(3, 4, "lstm", impl="scan", bidirectional=True, rngs=nnx.Rngs(0))
    layer = lstm_lab.RNN(3, 4, "lstm", impl="dummy", bidirectional=True, kernel_options={"scale": 2.0},
                         rngs=nnx.Rngs(0))
    y, c = layer(x, seq_lengths=lengths)
    assert calls == [2.0, 2.0]  # both directions
    want_y, want_c = plain(x, seq_lengths=lengths)
    np.testing.assert_allclose(y, 2 * want_y, rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, c, want_c)
    # no gate traces of its own: gate_trace runs the default kernel, the scan
    tr = lstm_lab.gate_trace(layer, x, seq_lengths=lengths)
    np.testing.assert_allclose(tr["y"], want_y[..., :4], rtol=1e-6)
    assert calls == [2.0, 2.0]
    with pytest.raises(ValueError, match=r"^RNN: impl='dummy' needs an even hidden size; got 3 \(use impl='scan' "
                                         r"or 'auto'\)\.$"):
        lstm_lab.RNN(3, 3, "lstm", impl="dummy", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"unknown kernel_options \['scal'\]; expected .*\bscale\b"):
        lstm_lab.RNN(3, 4, "lstm", impl="dummy", kernel_options={"scal": 2.0}, rngs=nnx.Rngs(0))


def test_a_taken_name_is_refused(dummy):
    for name in ("scan", "pallas", "dummy"):
        with pytest.raises(ValueError, match=rf"a kernel named '{name}' is already registered"):
            kernels.register(kernels.Kernel(name, lambda *a: a))
    with pytest.raises(ValueError, match=r"an identifier other than 'auto'; got 'auto'"):
        kernels.Kernel("auto", lambda *a: a)
    with pytest.raises(TypeError, match=r"expected an lstm_lab.kernels.Kernel"):
        kernels.register("dummy2")
    with pytest.raises(ValueError, match=r"'scan' is built in"):
        kernels.unregister("scan")


@pytest.mark.integration  # a fresh interpreter
def test_pallas_is_imported_only_when_its_kernel_runs():
    code = ("import sys, jax.numpy as jnp, lstm_lab, lstm_lab.config\n"
            "from flax import nnx\n"
            "def loaded(): return [m for m in ('jax.experimental.pallas', 'lstm_lab.kernels.pallas.vjp') "
            "if m in sys.modules]\n"
            "for impl in ('auto', 'scan', 'scan_vjp'):\n"
            "    lstm_lab.RNN(2, 3, 'lstm', impl=impl, rngs=nnx.Rngs(0))(jnp.ones((1, 4, 2)))\n"
            "assert lstm_lab.kernels.impl_unsupported('pallas', lstm_lab.VARIANTS['gru'], 4096)\n"
            "layer = lstm_lab.RNN(2, 3, 'lstm', impl='pallas', kernel_options={'interpret': True}, rngs=nnx.Rngs(0))\n"
            "assert not loaded(), loaded()\n"
            "layer(jnp.ones((1, 4, 2)))\n"
            "assert len(loaded()) == 2, loaded()\n")
    subprocess.run([sys.executable, "-c", code], check=True)
