"""The training runner: config, optimizers, model, fit loop, checkpoints, resume, records, faults."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lstm_lab import config as cfglib
from lstm_lab import tasks
from lstm_lab.config import Config, ModelConfig, OptimConfig, apply_overrides, load_config
from lstm_lab.models import SequenceModel
from lstm_lab.training import RunConflictError, build_optimizer, sample, train

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question"]
    text = "\n".join(" ".join(rng.choice(words, 7)) for _ in range(300))
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(text)
    return path


def tiny_lm(corpus, **extra) -> Config:
    return apply_overrides(Config(), {
        "task.name": "char_lm", "task.options": {"path": str(corpus), "seq_len": 8},
        "model.hidden_size": 16, "model.embed_dim": 8, "model.dropout": 0.1, "model.input_noise": 0.05,
        "train.batch_size": 4, "train.steps": 30, "train.eval_every": 10, "train.log_every": 5,
        "train.eval_batch_size": 16, "optim.learning_rate": 3e-3, **extra})


def tiny_copy(**extra) -> Config:
    return apply_overrides(Config(), {"task.name": "copy", "task.options": {"T": 3, "eval_size": 32},
                                      "model.hidden_size": 8, "train.batch_size": 8, "train.steps": 20,
                                      "train.eval_every": 10, "train.log_every": 5, **extra})


# ---------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------
def test_config_overrides_types_and_did_you_mean(tmp_path):
    cfg = apply_overrides(Config(), {"model.hidden_size": 64, "optim.learning_rate": 1, "task.options.T": 7,
                                     "model.bidirectional": "true"})
    assert cfg.model.hidden_size == 64 and cfg.optim.learning_rate == 1.0 and isinstance(cfg.optim.learning_rate, float)
    assert cfg.task.options == {"T": 7} and cfg.model.bidirectional is True
    with pytest.raises(KeyError, match=r"unknown key 'optim.learnig_rate'.*Did you mean 'optim.learning_rate'"):
        apply_overrides(Config(), {"optim.learnig_rate": 1e-3})
    with pytest.raises(TypeError, match=r"model.hidden_size must be int; got 'big'"):
        apply_overrides(Config(), {"model.hidden_size": "big"})
    with pytest.raises(TypeError, match=r"train.steps must be int; got 1.5"):
        apply_overrides(Config(), {"train.steps": 1.5})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.py")
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ValueError, match="must define a dict named 'overrides'"):
        load_config(bad)
    assert cfglib.from_dict(cfglib.to_dict(cfg)) == cfg
    assert apply_overrides(Config(), cfglib.to_overrides(cfg)) == cfg


_FILES = sorted((REPO / "experiments").glob("*.py"))
_STUDIES = [p for p in _FILES if "study = Study(" in p.read_text()]


@pytest.mark.parametrize("path", [p for p in _FILES if p not in _STUDIES], ids=lambda p: p.name)
def test_experiment_files_load(path):
    cfg = load_config(path, {"train.steps": 5})
    assert cfg.train.steps == 5 and cfg.task.name in tasks.names()  # a registered task (a typo would fail)


@pytest.mark.parametrize("path", _STUDIES, ids=lambda p: p.name)
def test_study_files_load(path):
    from lstm_lab.sweep import load_study

    study = load_study(path)
    plan = study.plan()
    assert len(plan) >= len(study.variants) and study.baseline in study.variant_names
    cfg = study.config_for(plan[-1]["variant"], study.hyper_from_params(plan[-1]["params"]), plan[-1]["seed"])
    assert cfg.task.name in tasks.names()


def test_optimizers_and_schedules():
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.full(3, 10.0)}
    for name in ("sgd", "adam", "adamw", "rmsprop"):
        for schedule in ("constant", "cosine", "plateau"):
            tx = build_optimizer(OptimConfig(name=name, schedule=schedule, warmup_steps=2), 10)
            updates, _ = tx.update(grads, tx.init(params), params)
            assert np.isfinite(np.asarray(updates["w"])).all()
    tx = build_optimizer(OptimConfig(name="sgd", learning_rate=0.1, momentum=0.0, clip_norm=1.0), 10)
    updates, _ = tx.update(grads, tx.init(params), params)  # clipped to norm 1, then scaled by 0.1
    np.testing.assert_allclose(np.linalg.norm(np.asarray(updates["w"])), 0.1, rtol=1e-5)
    with pytest.raises(ValueError, match=r"optim.name='adan' is not one of .*Did you mean 'adam'"):
        build_optimizer(OptimConfig(name="adan"), 10)
    with pytest.raises(ValueError, match=r"optim.schedule='cosin'"):
        build_optimizer(OptimConfig(schedule="cosin"), 10)


def test_model_noise_dropout_and_tying():
    cfg = ModelConfig(hidden_size=8, input_noise=0.5, output_dropout=0.3)
    model = SequenceModel("real", 2, 1, cfg, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 5, 2))
    a, _ = model(x)
    b, _ = model(x)
    np.testing.assert_array_equal(a, b)  # evaluation: deterministic
    c, _ = model(x, key=jax.random.key(1), train=True)
    d, _ = model(x, key=jax.random.key(1), train=True)
    e, _ = model(x, key=jax.random.key(2), train=True)
    np.testing.assert_array_equal(c, d)
    assert not np.allclose(c, a) and not np.allclose(c, e)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        model(x, train=True)
    tied = SequenceModel("tokens", 11, 11, ModelConfig(hidden_size=8, tie_weights=True), rngs=nnx.Rngs(0))
    out, _ = tied(jnp.zeros((2, 3), jnp.int32))
    assert out.shape == (2, 3, 11) and tied.head is None
    with pytest.raises(ValueError, match=r"tie_weights needs embed_dim == the RNN output size: embed_dim=4"):
        SequenceModel("tokens", 11, 11, ModelConfig(hidden_size=8, embed_dim=4, tie_weights=True), rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------
# the fit loop
# ---------------------------------------------------------------------------
@pytest.mark.integration  # end to end: whole runs or sweeps
def test_train_records_and_finished_run(tmp_path):
    wd = tmp_path / "run"
    s = train(tiny_copy(), wd, quiet=True)
    assert s["status"] == "completed" and s["steps"] == 20 and s["best_step"] in (10, 20)
    assert set(s["valid"]) >= {"loss", "accuracy_last10"} and s["test"]["loss"] > 0
    assert s["baseline"]["loss"] == pytest.approx(10 * np.log(8) / 23)
    on_disk = json.loads((wd / "summary.json").read_text())
    assert on_disk["valid"] == s["valid"]
    rec = json.loads((wd / "config.json").read_text())
    assert rec["seed"] == 0 and rec["cell_name"] == "lstm" and rec["lstm_lab_version"] and "git_commit" in rec
    kinds = [json.loads(line)["kind"] for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("valid") == 2 and kinds.count("train") == 4 and kinds[-1] == "test"
    assert list(wd.glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (wd / "checkpoints" / "last").iterdir()) == ["10", "20"]
    again = train(tiny_copy(), wd, quiet=True)  # finished: returns the record, trains nothing
    assert again == on_disk


@pytest.mark.integration  # end to end: whole runs or sweeps
def test_time_limit_stops_early_with_an_evaluated_checkpoint(tmp_path):
    s = train(tiny_copy(**{"train.steps": 10_000, "train.eval_every": 5000, "train.max_minutes": 1e-9}),
              tmp_path / "run", quiet=True)
    assert s["status"] == "stopped_early" and "time limit" in s["reason"]
    assert s["steps"] == 1 and s["best_step"] == 1 and s["test"]["loss"] > 0
    done = train(tiny_copy(**{"train.max_minutes": 60.0}), tmp_path / "full", quiet=True)
    assert done["status"] == "completed" and done["reason"] is None


@pytest.mark.integration  # end to end: whole runs or sweeps
def test_early_stopping_and_plateau_decay(tmp_path):
    """With a learning rate too small to move the loss, validation never improves after the first evaluation."""
    s = train(tiny_copy(**{"optim.learning_rate": 1e-30, "train.steps": 100, "train.early_stop_patience": 2,
                           "optim.schedule": "plateau", "optim.decay_patience": 1, "optim.decay_factor": 0.5}),
              tmp_path / "run", quiet=True)
    assert s["status"] == "stopped_early" and "no validation improvement in 2 evaluations" in s["reason"]
    assert s["steps"] == 30 and s["best_step"] == 10
    scales = [r["lr_scale"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"]
    assert scales == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5]  # records at steps 5..30; halved by the evaluation at step 20


@pytest.mark.integration  # end to end: whole runs or sweeps
def test_workdir_with_a_different_run_is_refused_then_moved_aside(tmp_path):
    wd = tmp_path / "run"
    train(tiny_copy(), wd, quiet=True)
    with pytest.raises(RunConflictError, match=r"different config \(differs in model.hidden_size\).*--force"):
        train(tiny_copy(**{"model.hidden_size": 12}), wd, quiet=True)
    s = train(tiny_copy(**{"model.hidden_size": 12}), wd, quiet=True, force=True)
    assert s["status"] == "completed"
    aside = list(wd.glob("replaced-*"))
    assert len(aside) == 1 and (aside[0] / "summary.json").exists()


@pytest.mark.integration  # the CLI in a subprocess
def test_divergence_is_recorded_and_cli_exits_nonzero(tmp_path):
    cfg = tiny_copy(**{"task.name": "adding", "task.options": {"T": 6, "eval_size": 16}, "optim.name": "sgd",
                       "optim.learning_rate": 1e30, "optim.clip_norm": 0.0})
    s = train(cfg, tmp_path / "lib", quiet=True)
    assert s["status"] == "diverged" and 1 <= s["diverged_at_step"] <= 20
    exp = tmp_path / "exp.py"
    exp.write_text(f"overrides = {cfglib.to_overrides(cfg)!r}\n")
    r = subprocess.run([sys.executable, "-m", "lstm_lab.cli", "train", str(exp), "--workdir", str(tmp_path / "cli"),
                        "--quiet"], capture_output=True, text=True)
    assert r.returncode == 3 and "diverged at step" in r.stderr
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["status"] == "diverged"


@pytest.mark.integration  # the CLI in a subprocess
def test_bad_data_path_and_bad_keys_from_the_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lstm_lab.cli", "train", str(REPO / "experiments" / "char_lm.py"),
                        "--set", "task.options.path=/no/such.txt", "--workdir", str(tmp_path / "w")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "'/no/such.txt' does not exist" in r.stderr
    r = subprocess.run([sys.executable, "-m", "lstm_lab.cli", "train", str(REPO / "experiments" / "copy.py"),
                        "--set", "model.hiden_size=3", "--workdir", str(tmp_path / "w")], capture_output=True, text=True)
    assert r.returncode == 2 and "Did you mean 'model.hidden_size'" in r.stderr


def _cli_train(exp: pathlib.Path, workdir: pathlib.Path, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "lstm_lab.cli", "train", str(exp), "--workdir", str(workdir),
                           "--quiet"], capture_output=True, text=True, env=env)


@pytest.mark.integration  # training processes, one SIGKILLed
def test_sigkill_and_resume_is_bitwise_identical(tmp_path, corpus):
    """A char LM (carry passed between windows, dropout, input noise) killed with SIGKILL at step 17
    (last checkpoint at 10) and resumed ends with exactly the metrics of an uninterrupted run."""
    cfg = tiny_lm(corpus)
    exp = tmp_path / "exp.py"
    exp.write_text(f"overrides = {cfglib.to_overrides(cfg)!r}\n")
    straight = _cli_train(exp, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    # the kill: a train() call in a child process with a callback that SIGKILLs it after step 17
    code = (f"import signal; from lstm_lab.config import load_config; from lstm_lab.training import signal_at, train; "
            f"train(load_config({str(exp)!r}), {str(tmp_path / 'killed')!r}, quiet=True, "
            f"callbacks=[signal_at(17, signal.SIGKILL)])")
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "killed" / "summary.json").exists()
    resumed = _cli_train(exp, tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "from step 10" in resumed.stderr
    a = json.loads((tmp_path / "straight" / "summary.json").read_text())
    b = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert a["valid"] == b["valid"] and a["test"] == b["test"] and a["steps"] == b["steps"] == 30
    hist = lambda wd: [r for r in map(json.loads, (wd / "metrics.jsonl").read_text().splitlines())  # noqa: E731
                       if r["kind"] == "valid"]
    assert hist(tmp_path / "straight")[-1] == hist(tmp_path / "killed")[-1]
    # the resume rewrote metrics.jsonl to the checkpoint's step: steps 11..17 were not recorded twice
    records = lambda wd: [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}  # noqa: E731
                          for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert records(tmp_path / "killed") == records(tmp_path / "straight")


@pytest.mark.integration  # end to end: whole runs or sweeps
def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, corpus):
    wd = tmp_path / "run"
    cfg = tiny_lm(corpus, **{"train.steps": 20, "train.keep_checkpoints": 3})
    train(cfg, wd, quiet=True)
    (wd / "summary.json").unlink()  # pretend the run was cut off after its last checkpoint
    latest = wd / "checkpoints" / "last" / "20"
    for f in latest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    messages = []
    s = train(cfg, wd, quiet=True, log=messages.append)
    assert any("step 20 is unreadable" in m and "falling back" in m for m in messages), messages
    assert any("resuming" in m and "step 10" in m for m in messages)
    assert s["status"] == "completed" and s["steps"] == 20


@pytest.mark.integration  # the CLI in a subprocess
def test_sample_from_a_trained_char_lm(tmp_path, corpus):
    wd = tmp_path / "lm"
    train(tiny_lm(corpus), wd, quiet=True)
    text = sample(wd, prompt="to be", length=40, temperature=0.8)
    assert text.startswith("to be") and len(text) == 45
    assert set(text) <= set(corpus.read_text())
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample(wd, temperature=0)
    r = subprocess.run([sys.executable, "-m", "lstm_lab.cli", "sample", str(wd), "--length", "10"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and len(r.stdout.rstrip("\n")) >= 10


@pytest.mark.integration  # a process with 4 host devices
def test_four_device_data_parallel_matches_one_device(tmp_path, corpus):
    cfg = tiny_lm(corpus, **{"model.dropout": 0.0, "model.input_noise": 0.0, "train.steps": 20})
    exp = tmp_path / "exp.py"
    exp.write_text(f"overrides = {cfglib.to_overrides(cfg)!r}\n")
    a = train(cfg, tmp_path / "one", quiet=True, log=lambda m: None)  # one device, in this process
    four = _cli_train(exp, tmp_path / "four", {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert four.returncode == 0, four.stderr
    b = json.loads((tmp_path / "four" / "summary.json").read_text())
    assert a["devices"] == 1 and b["devices"] == 4
    assert b["valid"]["loss"] == pytest.approx(a["valid"]["loss"], abs=1e-5)
    assert b["test"]["loss"] == pytest.approx(a["test"]["loss"], abs=1e-5)


def test_batch_not_divisible_by_devices_is_a_clear_error():
    from lstm_lab.training import device_setup as _device_setup

    with pytest.raises(ValueError, match="train.batch_size=4 must be divisible by the 3 visible devices"):
        _device_setup(4, 6, devices=[object()] * 3)
    with pytest.raises(ValueError, match="train.eval_batch_size=16 must be divisible by the 3 visible devices"):
        _device_setup(6, 16, devices=[object()] * 3)
