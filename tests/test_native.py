"""impl="native" (lstm_lab/kernels/native): what the reference battery of tests/test_kernels.py does not cover.

The battery holds it to the float64 reference for every cell (outputs, carries, gradients, lengths, reverse).
Here: larger and odd shapes against the plain scan on fresh random inputs (batch chunks split across threads,
hidden sizes off the vector width, a batch of one, a single step), populations under jax.vmap, a compute dtype
it does not take, and the build: one warning line and the fallback when there is no compiler, one build for
parallel processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lstm_lab
from lstm_lab import cells, kernels
from lstm_lab.kernels import native
from lstm_lab.recurrent import init_params

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="impl='native' runs on the CPU")

SPECS = {"vanilla": cells.VARIANTS["vanilla"], "cifg": cells.VARIANTS["cifg"], "fgr": cells.VARIANTS["fgr"],
         "nog+relu": cells.CellSpec(output_gate=False, input_activation="relu", peepholes=True),
         "gru": cells.VARIANTS["gru"], "gru_after": cells.CellSpec(family="gru", reset_after=True),
         "mgu": cells.VARIANTS["mgu"], "rnn": cells.VARIANTS["rnn"]}


def _problem(spec, T, B, H, D, seed, members=None):
    """Random recurrent parameters (not W, b), projected inputs, a random carry and lengths (some short)."""
    lead = () if members is None else (members,)
    rng = np.random.default_rng(seed)

    def one(k):
        p = init_params(spec, D, H, jax.random.key(k))
        p = {n: v + 0.1 * jnp.asarray(rng.normal(size=v.shape), jnp.float32) for n, v in p.items() if n not in "Wb"}
        return p

    params = one(seed) if members is None else jax.tree.map(lambda *a: jnp.stack(a), *[one(seed + m)
                                                                                      for m in range(members)])
    xp = jnp.asarray(rng.normal(size=(*lead, T, B, len(spec.gate_names()) * H)), jnp.float32)
    carry = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.5, a.shape), jnp.float32),
                         cells.zero_carry(spec, H, (*lead, B), jnp.float32))
    lengths = rng.integers(1, T + 1, size=(*lead, B))
    lengths[..., 0] = T
    mask = jnp.arange(T)[:, None] < jnp.asarray(lengths)[..., None, :]
    return params, xp, carry, mask


def _loss_and_grads(impl, spec, params, xp, carry, mask):
    run = kernels.get(impl).run
    rng = np.random.default_rng(7)

    def loss(params, xp, carry):
        ys, final = run(spec, params, xp, carry, mask)
        w = jnp.asarray(rng.normal(size=ys.shape), jnp.float32)
        return jnp.sum(ys * w) + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(final)), (ys, final)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(params, xp, carry)


def _close(got, want, tol, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    assert err < tol, f"{what}: relative error {err:.2e} >= {tol}"


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("shape", [(9, 37, 21, 5), (4, 1, 70, 3), (1, 8, 16, 2), (30, 12, 33, 7)],
                         ids=lambda s: "T{}-B{}-H{}-D{}".format(*s))
def test_matches_the_scan(name, shape):
    """Outputs, final carries and every gradient equal the scan's to 1e-5 (relative to the largest entry)."""
    spec = SPECS[name]
    params, xp, carry, mask = _problem(spec, *shape, seed=sum(map(ord, name)) + shape[0])
    (_, (y_n, f_n)), g_n = _loss_and_grads("native", spec, params, xp, carry, mask)
    (_, (y_s, f_s)), g_s = _loss_and_grads("scan", spec, params, xp, carry, mask)
    _close(y_n, y_s, 1e-5, "ys")
    assert np.all(np.asarray(y_n)[~np.asarray(mask)] == 0)  # past each end: zeros
    for i, (a, b) in enumerate(zip(jax.tree.leaves(f_n), jax.tree.leaves(f_s))):
        _close(a, b, 1e-5, f"final carry field {i}")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_n), jax.tree.leaves(g_s)):
        _close(a, b, 1e-5, "d" + jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", ["vanilla", "fgr", "gru", "mgu"])
def test_population_under_vmap(name):
    """A population (jax.vmap over members with their own parameters, inputs, carries and lengths) equals each
    member run alone with the scan, gradients included: the kernel takes the member axis itself."""
    spec = SPECS[name]
    params, xp, carry, mask = _problem(spec, 6, 5, 12, 3, seed=11, members=4)

    def member(impl):
        return jax.vmap(lambda p, x, c, m: _loss_and_grads(impl, spec, p, x, c, m))(params, xp, carry, mask)

    (l_n, (y_n, _)), g_n = member("native")
    (l_s, (y_s, _)), g_s = member("scan")
    _close(l_n, l_s, 1e-5, "loss")
    _close(y_n, y_s, 1e-5, "ys")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_n), jax.tree.leaves(g_s)):
        _close(a, b, 1e-5, "d" + jax.tree_util.keystr(path))


def test_a_model_trains_the_same_with_native_and_scan():
    """Through the layer and nnx: a bidirectional 2-layer LSTM's loss and gradients match the scan's."""
    from flax import nnx

    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 7, 4)), jnp.float32)
    lengths = jnp.array([7, 4, 1])
    out = {}
    for impl in ("native", "scan"):
        layer = lstm_lab.RNN(4, 9, "vanilla", num_layers=2, bidirectional=True, impl=impl, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(layer)
        out[impl] = jax.value_and_grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x, seq_lengths=lengths)[0] ** 2))(
            params)
    _close(out["native"][0], out["scan"][0], 1e-5, "loss")
    for a, b in zip(jax.tree.leaves(out["native"][1]), jax.tree.leaves(out["scan"][1])):
        _close(a, b, 1e-5, "grad")


def test_other_dtypes_are_refused_with_the_reason():
    spec = cells.VARIANTS["lstm"]
    why = kernels.impl_unsupported("native", spec, 8, dtype=jnp.bfloat16)
    assert why == "impl='native' computes in float32; dtype=bfloat16 (use impl='scan' or 'auto')."
    assert kernels.resolve_impl("auto", spec, "cpu", dtype=jnp.bfloat16) == "scan_vjp"
    assert kernels.impl_unsupported("native", spec, 8, backend="gpu").startswith("impl='native' runs on the CPU")


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


@pytest.mark.integration  # fresh interpreters
def test_no_compiler_one_warning_and_the_fallback(tmp_path):
    """No compiler on PATH and an empty cache: one warning line; impl='native' refused with the reason;
    impl='auto' runs scan_vjp (LSTM) and the scan (GRU), and trains."""
    code = """
        import warnings, jax.numpy as jnp, lstm_lab
        from flax import nnx
        from lstm_lab import kernels
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert kernels.resolve_impl("auto", lstm_lab.VARIANTS["lstm"], "cpu") == "scan_vjp"
            assert kernels.resolve_impl("auto", lstm_lab.VARIANTS["gru"], "cpu") == "scan"
            why = kernels.impl_unsupported("native", lstm_lab.VARIANTS["lstm"], 8)
            y, _ = lstm_lab.RNN(2, 3, "lstm", rngs=nnx.Rngs(0))(jnp.ones((1, 4, 2)))
        msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        print(len(msgs)); print(msgs[0]); print(why)
    """
    env = {"PATH": str(tmp_path), "CXX": "", "LSTM_LAB_CACHE": str(tmp_path / "cache")}
    res = _python(code, env)
    assert res.returncode == 0, res.stderr
    count, warning, why = res.stdout.strip().splitlines()[-3:]
    assert count == "1", res.stdout
    assert warning == ("impl='native' is unavailable: RuntimeError: no C++ compiler found (set $CXX, or install "
                       "g++); impl='auto' runs the scan instead.")
    assert why.startswith("impl='native' is unavailable: RuntimeError: no C++ compiler found") and \
        why.endswith("(use impl='scan' or 'auto').")
    assert not (tmp_path / "cache" / "native").exists() or not list((tmp_path / "cache" / "native").glob("*.so"))


@pytest.mark.integration  # fresh interpreters, a real build
def test_parallel_processes_build_once(tmp_path):
    """Three processes start at once on an empty cache: one library is built (under the file lock), every
    process runs the kernel, no temporary file is left."""
    code = """
        import jax.numpy as jnp, numpy as np
        from lstm_lab import cells
        from lstm_lab.kernels import native
        assert native.available()
        spec = cells.VARIANTS["rnn"]
        ys, _ = native.native(spec, {"R": jnp.eye(4)}, jnp.ones((3, 2, 4)), cells.zero_carry(spec, 4, (2,), jnp.float32))
        print(float(ys[-1, 0, 0]))
    """
    env = {"LSTM_LAB_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, **env}) for _ in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    want = np.tanh(1 + np.tanh(1 + np.tanh(1.0)))
    assert all(abs(float(o[0].split()[-1]) - want) < 1e-6 for o in outs)
    assert len(list((tmp_path / "native").glob("*.so"))) == 1
    assert not list((tmp_path / "native").glob("*.tmp"))


@pytest.mark.integration
def test_turned_off_by_the_environment():
    res = _python("""
        from lstm_lab import kernels, VARIANTS
        print(kernels.impl_unsupported("native", VARIANTS["lstm"], 8))
        print(kernels.resolve_impl("auto", VARIANTS["lstm"], "cpu"))
    """, {"LSTM_LAB_NATIVE": "0"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == ["impl='native' is turned off (LSTM_LAB_NATIVE=0) (use impl='scan' or "
                                          "'auto').", "scan_vjp"]
