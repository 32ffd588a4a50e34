"""Tasks of whole sequences of different lengths (tasks.SequenceSet), their losses, the music task on JSB Chorales,
user tasks from the command line."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lstm_lab import tasks
from lstm_lab.config import Config, ModelConfig, apply_overrides
from lstm_lab.models import SequenceModel
from lstm_lab.tasks import losses


# ---------------------------------------------------------------------------
# a dataset of your own, in under 20 lines (the README's example)
# ---------------------------------------------------------------------------
@tasks.register("test_next_sine", replace=True)
def next_sine(n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)

    def one():  # predict x[t + 1] from x[.. t] on a sine of random length and frequency
        x = np.sin(np.arange(rng.integers(5, 30) + 1) * rng.uniform(0.1, 0.5))[:, None]
        return x[:-1], x[1:]

    splits = {s: [one() for _ in range(n)] for s in ("train", "valid", "test")}
    return tasks.SequenceSet(splits, loss="mse", name="test_next_sine", options={"n": n, "seed": seed})


def _sine_cfg(**extra):
    return apply_overrides(Config(), {"task.name": "test_next_sine", "model.hidden_size": 8, "optim.name": "adam",
                                      "optim.learning_rate": 1e-2, "train.batch_size": 8, "train.steps": 20,
                                      "train.eval_every_epochs": 2.0, "train.log_every": 5, **extra})


def test_sequence_set_batches_pad_bucket_and_resume():
    task = next_sine()
    per_epoch = task.epoch_steps(8)
    assert per_epoch == 5
    stream = [b for _, b in zip(range(3 * per_epoch), task.batches("train", batch_size=8, seed=3))]
    for b in stream:
        n, T = b.lengths, b.inputs.shape[1]
        assert T in task.boundaries and T >= n.max()
        real = b.weights.sum(1) > 0  # rows that hold a sequence (a short batch is filled up with weight-0 rows)
        assert np.array_equal(b.weights[real], (np.arange(T)[None] < n[real, None]).astype(np.float32))
        assert (n[~real] == 1).all()
        assert not b.inputs[np.arange(T)[None] >= n[:, None]].any()  # zeros past each end
    # every training sequence once per epoch
    for e in range(3):
        seen = sorted(int(w.sum()) for b in stream[e * per_epoch:(e + 1) * per_epoch] for w in b.weights
                      if w.sum() > 0)
        assert seen == sorted(len(x) for x, _ in task.data["train"])
    # batch k depends only on (seed, k): a stream started at k equals the tail
    again = [b for _, b in zip(range(7), task.batches("train", batch_size=8, seed=3, start_step=8))]
    assert all(np.array_equal(a.inputs, b.inputs) and np.array_equal(a.lengths, b.lengths)
               for a, b in zip(again, stream[8:]))
    other = next(iter(task.batches("train", batch_size=8, seed=4)))
    assert not np.array_equal(other.lengths, stream[0].lengths)
    # evaluation scores every target exactly once
    for split in ("valid", "test"):
        total = sum(float(b.weights.sum()) for b in task.eval_batches(split, 7))
        assert total == sum(len(x) for x, _ in task.data[split])


def test_losses_against_float64_numpy():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3, 5, 4)) * 4
    y = (rng.random((3, 5, 4)) < 0.3).astype(np.float64)
    s = 1 / (1 + np.exp(-z))
    want = -(y * np.log(s) + (1 - y) * np.log(1 - s)).sum(-1)
    np.testing.assert_allclose(losses.bernoulli(jnp.asarray(z, jnp.float32), jnp.asarray(y)), want, rtol=2e-6)
    big = losses.bernoulli(jnp.array([[300.0, -300.0]]), jnp.array([[0.0, 1.0]]))
    assert np.isfinite(big).all() and float(big[0]) == pytest.approx(600.0)  # stable where s(z) rounds to 0 or 1
    cls = rng.integers(0, 4, size=(3, 5))
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    np.testing.assert_allclose(losses.categorical(jnp.asarray(z, jnp.float32), jnp.asarray(cls)),
                               -np.take_along_axis(logp, cls[..., None], -1)[..., 0], rtol=2e-6)
    np.testing.assert_allclose(losses.mse(jnp.asarray(z[..., :1], jnp.float32), jnp.asarray(y[..., 0])),
                               (z[..., 0] - y[..., 0]) ** 2, rtol=2e-6)


@pytest.mark.parametrize("bad,match", [
    ({"train": [], "valid": [(np.ones((2, 1)), np.ones((2, 1)))], "test": [(np.ones((2, 1)), np.ones((2, 1)))]},
     "the train split has no sequences"),
    ({"train": [(np.ones((3, 1)), np.ones((2, 1)))], "valid": [], "test": []}, "train sequence 0 has 3 input steps "
                                                                                "but 2 targets"),
    ({"train": [(np.ones((2, 1)), np.ones((2, 1)))]}, "exactly train, valid and test; got \\['train'\\]"),
    ({"train": [np.ones(3)], "valid": [], "test": []}, "train sequence 0 must be an \\(inputs, targets\\) pair"),
])
def test_sequence_set_bad_input_is_one_line(bad, match):
    with pytest.raises(ValueError, match=match):
        tasks.SequenceSet(bad, loss="mse", name="x")
    with pytest.raises(ValueError, match="loss must be one of categorical, bernoulli, mse; got 'l2'"):
        tasks.SequenceSet(bad, loss="l2", name="x")


def test_a_bidirectional_model_never_reads_padding():
    cfg = ModelConfig(hidden_size=6, bidirectional=True, cell="lstm")
    model = SequenceModel("real", 3, 2, cfg, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(2, 9, 3)).astype(np.float32)
    lengths = np.array([5, 9], np.int32)
    short, _ = model(jnp.asarray(x[:, :9]), lengths=jnp.asarray(lengths))
    padded = np.concatenate([x, np.full((2, 7, 3), 9.0, np.float32)], axis=1)  # garbage past the ends
    long, _ = model(jnp.asarray(padded), lengths=jnp.asarray(lengths))
    np.testing.assert_allclose(np.asarray(long)[0, :5], np.asarray(short)[0, :5], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(long)[1, :9], np.asarray(short)[1, :9], rtol=1e-6, atol=1e-6)
    without, _ = model(jnp.asarray(padded))  # no lengths: the backward direction reads the garbage
    assert not np.allclose(np.asarray(without)[0, :5], np.asarray(short)[0, :5], atol=1e-3)


@pytest.mark.integration  # whole runs and a population
def test_a_user_sequence_task_trains_alone_and_as_a_population(tmp_path):
    from lstm_lab.training import train, train_population

    cfgs = [_sine_cfg(**{"train.seed": s, "optim.learning_rate": lr}) for s, lr in ((0, 1e-2), (1, 3e-3))]
    solo = [train(c, tmp_path / f"s{i}", quiet=True) for i, c in enumerate(cfgs)]
    assert all(s["status"] == "completed" and s["steps"] == 20 for s in solo)
    assert solo[0]["parameters"] == 4 * 8 * (1 + 8 + 1) + 8 + 1  # LSTM-8 on one feature, a linear head
    assert [r["step"] for r in map(json.loads, (tmp_path / "s0" / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "valid"] == [10, 20]  # eval_every_epochs=2: 2 epochs of 5 batches
    # the members' batches differ in length at most steps: padded to one (the RNN reads none of the padding)
    pop = train_population(cfgs, [tmp_path / f"p{i}" for i in range(2)])
    for p, s in zip(pop, solo):
        assert p["best_step"] == s["best_step"]
        for split in ("valid", "test"):
            assert p[split]["loss"] == pytest.approx(s[split]["loss"], rel=1e-5)


def test_eval_every_epochs_needs_a_finite_task(tmp_path):
    from lstm_lab.training import train

    cfg = apply_overrides(Config(), {"task.name": "copy", "task.options": {"T": 3}, "train.eval_every_epochs": 1.0})
    with pytest.raises(ValueError, match="train.eval_every_epochs=1.0 needs a task of a finite set of sequences"):
        train(cfg, tmp_path / "w", quiet=True)
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------------------
# music
# ---------------------------------------------------------------------------
def test_music_on_jsb_chorales(shared_data):
    task = tasks.get("music", path=str(shared_data / "jsb-chorales-quarter.json"))
    assert task.split_sizes() == {"train": 229, "valid": 76, "test": 77}
    # predicted steps (frames minus one per chorale: the first is input only) and the frequency baseline
    steps = {s: sum(len(x) for x, _ in task.data[s]) for s in ("train", "valid", "test")}
    assert steps == {"train": 13578, "valid": 4526, "test": 4648}
    assert task.baseline["nll"] == pytest.approx(10.98, abs=0.01)
    x, y = task.data["train"][0]
    assert x.shape[1] == y.shape[1] == 88 and np.array_equal(x[1:], y[:-1])  # inputs are the targets shifted
    first = tasks.get("music", path=str(shared_data / "jsb-chorales-quarter.json"), score_first=True)
    x1, y1 = first.data["train"][0]
    assert not x1[0].any() and np.array_equal(y1[1:], y) and len(y1) == len(y) + 1


def _music_file(tmp_path, data, gz=False):
    path = tmp_path / ("m.json.gz" if gz else "m.json")
    raw = json.dumps(data).encode()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return str(path)


def test_music_reads_gzip_and_scores_like_numpy(tmp_path):
    piece = [[60, 64], [62], [], [60, 64, 67]]
    path = _music_file(tmp_path, {"train": [piece, piece[:3]], "valid": [piece], "test": [piece]}, gz=True)
    task = tasks.get("music", path=path)
    b = task.eval_batches("valid", 2)[0]
    logits = np.random.default_rng(0).normal(size=(*b.targets.shape,)).astype(np.float32)
    sums = task.metric_sums(jnp.asarray(logits), {k: jnp.asarray(v) for k, v in b.arrays().items()})
    got = task.summarize({k: float(np.sum(v)) for k, v in sums.items()})["nll"]
    s = 1 / (1 + np.exp(-logits[0, :3].astype(np.float64)))
    y = b.targets[0, :3]
    assert got == pytest.approx(-(y * np.log(s) + (1 - y) * np.log(1 - s)).sum(1).mean(), rel=1e-5)


@pytest.mark.parametrize("data,match", [
    (None, "does not exist"),
    ("not json", "is not JSON"),
    ([1, 2], "holds a list; expected an object with the splits train, valid and test"),
    ({"train": [[[60]] * 3], "valid": [[[60]] * 3]}, "has no test split"),
    ({"train": [[[60]] * 3], "valid": [[]], "test": [[[60]] * 3]}, "valid piece 0 is empty"),
    ({"train": [[[60], [60, 200]]], "valid": [[[60]] * 3], "test": [[[60]] * 3]},
     "train piece 0, step 1: pitch 200 is outside the piano's MIDI 21..108"),
    ({"train": [[[60], "C4"]], "valid": [[[60]] * 3], "test": [[[60]] * 3]},
     "train piece 0, step 1: expected a list of MIDI pitches; got 'C4'"),
    ({"train": [], "valid": [[[60]] * 3], "test": [[[60]] * 3]}, "the train split of .* has no pieces"),
])
def test_music_bad_input_is_one_line(tmp_path, data, match):
    if data is None:
        path = str(tmp_path / "missing.json")
    elif isinstance(data, str):
        (tmp_path / "m.json").write_text(data)
        path = str(tmp_path / "m.json")
    else:
        path = _music_file(tmp_path, data)
    with pytest.raises(ValueError, match=f"music: .*{match}") as e:
        tasks.get("music", path=path)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------
# user tasks on the command line
# ---------------------------------------------------------------------------
def test_register_replace():
    def a():
        return None

    def b():
        return None

    tasks.register("test_twice")(a)
    tasks.register("test_twice")(a)  # the same factory again: fine
    with pytest.raises(ValueError, match=r"already registered .*register\('test_twice', replace=True\)"):
        tasks.register("test_twice")(b)
    tasks.register("test_twice", replace=True)(b)


@pytest.mark.integration  # lstm-lab processes
def test_import_makes_a_users_task_known_to_every_command(tmp_path):
    mine = tmp_path / "my_tasks.py"
    mine.write_text("import numpy as np\nfrom lstm_lab import tasks\n\n\n@tasks.register('blips')\ndef blips():\n"
                    "    seqs = [(np.ones((n, 1)), np.zeros((n, 1))) for n in (3, 5, 7)]\n"
                    "    return tasks.SequenceSet({'train': seqs, 'valid': seqs, 'test': seqs}, loss='mse', "
                    "name='blips')\n")
    cli = [sys.executable, "-m", "lstm_lab.cli"]
    r = subprocess.run(cli + ["data", "blips"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "unknown task 'blips'" in r.stderr and "--import" in r.stderr, r.stderr
    r = subprocess.run(cli + ["data", "blips", "--import", str(mine)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and "splits: train 3 | valid 3 | test 3 sequences" in r.stdout, r.stderr
    exp = tmp_path / "exp.py"
    exp.write_text("overrides = {'task.name': 'blips', 'model.hidden_size': 4, 'train.steps': 4, "
                   "'train.eval_every': 2, 'train.batch_size': 2}\n")
    r = subprocess.run(cli + ["train", str(exp), "--workdir", str(tmp_path / "w"), "--quiet", "--import", "my_tasks"],
                       capture_output=True, text=True, cwd=tmp_path, env={**__import__("os").environ,
                                                                          "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0 and json.loads((tmp_path / "w" / "summary.json").read_text())["status"] == "completed", \
        r.stderr
    r = subprocess.run(cli + ["data", "blips", "--import", "no_such_module_here"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
        "lstm-lab data: error: --import 'no_such_module_here': No module named"), r.stderr


def test_weight_noise_perturbs_the_weights_at_each_step_only():
    """model.weight_noise (Graves 2011): the gradient is taken at the weights plus noise drawn from the step's key;
    0 is exactly the noiseless step; biases are left alone."""
    import optax

    from lstm_lab.training.steps import make_steps

    task = next_sine()
    batch = {**next(iter(task.batches("train", batch_size=4, seed=0))).arrays(), "reset": np.bool_(True)}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    out = {}
    for std in (0.0, 0.5):
        model = SequenceModel("real", 1, 1, ModelConfig(hidden_size=5, weight_noise=std), rngs=nnx.Rngs(0))
        params = nnx.split(model, nnx.Param, ...)[1]
        tx = optax.sgd(0.1)
        step, _ = make_steps(model, task, tx, stateful=False)
        new, _, _, loss = step(params, tx.init(params), {}, batch, jax.random.key(1))
        again = step(params, tx.init(params), {}, batch, jax.random.key(1))[3]
        other = step(params, tx.init(params), {}, batch, jax.random.key(2))[3]
        out[std] = (float(loss), float(again), float(other))
        if std == 0.0:
            clean_loss = float(task.loss(model(batch["inputs"], lengths=batch["lengths"])[0], batch))
            assert float(loss) == pytest.approx(clean_loss, rel=1e-6)
    assert out[0.0][0] == out[0.0][2]  # no noise: the key changes nothing (the model has no dropout)
    assert out[0.5][0] == out[0.5][1] != out[0.5][2]  # noise from the step's key: reproducible, and it changes
    assert out[0.5][0] != out[0.0][0]


@pytest.mark.integration  # a fresh interpreter
def test_tasks_of_an_installed_package_load_through_the_entry_point_group(tmp_path):
    """A package registers its tasks under the ``lstm_lab.tasks`` entry-point group: no --import needed."""
    (tmp_path / "blip_pkg.py").write_text(
        "import numpy as np\nfrom lstm_lab import tasks\n\n\n@tasks.register('blips_ep')\ndef blips():\n"
        "    seqs = [(np.ones((n, 1)), np.zeros((n, 1))) for n in (3, 5)]\n"
        "    return tasks.SequenceSet({'train': seqs, 'valid': seqs, 'test': seqs}, loss='mse', name='blips_ep')\n")
    dist = tmp_path / "blip_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: blip-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[lstm_lab.tasks]\nblips = blip_pkg\n")
    r = subprocess.run([sys.executable, "-m", "lstm_lab.cli", "data", "blips_ep"], capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0 and "splits: train 2 | valid 2 | test 2 sequences" in r.stdout, r.stderr
