"""A vmapped population gives each member what training it alone gives (same seed), to 1e-5."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from lstm_lab import tasks
from lstm_lab.tasks.synthetic import AddingTask

from lstm_lab.config import Config, apply_overrides
from lstm_lab.training import population_key, train_population
from lstm_lab.training import train


def _close(a, b, rtol=1e-5):
    return a is not None and b is not None and abs(a - b) <= rtol * max(abs(a), abs(b), 1e-12)


def _check_equal(pop, solo):
    for p, s in zip(pop, solo):
        assert p["status"] == s["status"] and p["steps"] == s["steps"] and p["best_step"] == s["best_step"], (p, s)
        for split in ("valid", "test"):
            assert set(p[split]) == set(s[split])
            for k in s[split]:
                assert _close(p[split][k], s[split][k]), (split, k, p[split][k], s[split][k])


@pytest.mark.integration  # end to end: whole runs or sweeps
def test_copy_population_equals_solo_runs(tmp_path):
    base = {"task.name": "copy", "task.options": {"T": 3}, "model.hidden_size": 12, "model.cell": "vanilla",
            "optim.name": "adam", "train.batch_size": 8, "train.steps": 20, "train.eval_every": 10,
            "train.log_every": 5, "train.eval_batch_size": 100}
    # two members that differ in every field varied here (a third would only add another solo compile)
    members = [dict(lr=5e-3, b1=0.9, noise=0.0, seed=0, fb=1.0), dict(lr=2e-2, b1=0.5, noise=0.3, seed=7, fb=2.0)]
    cfgs = [apply_overrides(Config(), {**base, "optim.learning_rate": m["lr"], "optim.b1": m["b1"],
                                       "model.input_noise": m["noise"], "train.seed": m["seed"],
                                       "model.forget_bias": m["fb"]}) for m in members]
    assert len({population_key(c) for c in cfgs}) == 1
    pop = train_population(cfgs, [tmp_path / f"p{i}" for i in range(2)])
    solo = [train(c, tmp_path / f"s{i}", quiet=True) for i, c in enumerate(cfgs)]
    _check_equal(pop, solo)
    assert len({round(p["test"]["loss"], 6) for p in pop}) == 2  # the members did differ
    assert all(p["population"] == 2 for p in pop)
    # a second call finds the finished summaries
    again = train_population(cfgs, [tmp_path / f"p{i}" for i in range(2)])
    assert [a["test"] for a in again] == [p["test"] for p in pop]


@pytest.mark.integration  # end to end: whole runs or sweeps
def test_stateful_lm_population_with_plateau_and_early_stop_equals_solo(tmp_path):
    rng = np.random.default_rng(0)
    words = ["the ", "cat ", "sat ", "on ", "a ", "mat ", "and ", "then ", "ran\n"]
    text = "".join(rng.choice(words, size=3000))
    path = tmp_path / "text.txt"
    path.write_text(text)
    base = {"task.name": "char_lm", "task.options": {"path": str(path), "seq_len": 16}, "model.hidden_size": 16,
            "model.embed_dim": 8, "model.cell": "cifg", "model.dropout": 0.1, "optim.name": "sgd",
            "optim.schedule": "plateau", "train.batch_size": 4, "train.steps": 40, "train.eval_every": 8,
            "train.log_every": 4, "train.early_stop_patience": 2}
    # SGD at lr 1e-9 changes nothing a float32 loss can see: no validation improvement -> plateau decay, early
    # stop. (A chaotic member, e.g. Adam at lr 3, amplifies rounding differences and could not be compared.)
    members = [dict(lr=1.0, mom=0.9, seed=0), dict(lr=1e-9, mom=0.0, seed=1)]
    cfgs = [apply_overrides(Config(), {**base, "optim.learning_rate": m["lr"], "optim.momentum": m["mom"],
                                       "train.seed": m["seed"]}) for m in members]
    pop = train_population(cfgs, [tmp_path / f"p{i}" for i in range(2)])
    solo = [train(c, tmp_path / f"s{i}", quiet=True) for i, c in enumerate(cfgs)]
    _check_equal(pop, solo)
    assert {s["status"] for s in solo} == {"completed", "stopped_early"}  # both paths were exercised


def _lm_population(tmp_path):
    rng = np.random.default_rng(0)
    words = ["the ", "cat ", "sat ", "on ", "a ", "mat ", "and ", "then ", "ran\n"]
    path = tmp_path / "text.txt"
    path.write_text("".join(rng.choice(words, size=3000)))
    base = {"task.name": "char_lm", "task.options": {"path": str(path), "seq_len": 16}, "model.hidden_size": 16,
            "model.embed_dim": 8, "model.cell": "cifg", "model.dropout": 0.1, "model.input_noise": 0.1,
            "optim.name": "sgd", "optim.schedule": "plateau", "train.batch_size": 4, "train.steps": 40,
            "train.eval_every": 8, "train.log_every": 4, "optim.decay_patience": 1}
    return [apply_overrides(Config(), {**base, "optim.learning_rate": lr, "optim.momentum": mom, "train.seed": seed})
            for lr, mom, seed in ((1.0, 0.9, 0), (0.3, 0.0, 1), (1e-9, 0.5, 2))]


@pytest.mark.integration  # a population process, SIGKILLed
def test_killed_population_resumes_bitwise(tmp_path):
    """A population (stateful LM: carries, dropout, input noise, plateau decay in each member's optimizer state)
    SIGKILLed at step 21 (checkpoints at 16) resumes there and ends bitwise equal to an uninterrupted one; every
    member's workdir is a solo run's (its checkpoint loads)."""
    from lstm_lab.config import to_overrides
    from lstm_lab.training import load_model

    cfgs = _lm_population(tmp_path)

    def run(wds, *callbacks):  # in a child process (this one enables float64)
        code = ("import json, signal; from lstm_lab.config import Config, apply_overrides; "
                "from lstm_lab.training import signal_at, train_population; "
                f"cfgs = [apply_overrides(Config(), o) for o in {[to_overrides(c) for c in cfgs]!r}]; "
                f"print(json.dumps(train_population(cfgs, {[str(tmp_path / w) for w in wds]!r}, quiet=False, "
                f"callbacks=[{', '.join(callbacks)}])))")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)

    a, b = [f"a{i}" for i in range(3)], [f"b{i}" for i in range(3)]
    straight = run(a)
    assert straight.returncode == 0, straight.stderr
    killed = run(b, "signal_at(21, signal.SIGKILL)")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run(b)
    assert resumed.returncode == 0 and "resuming the population (3 members) from step 16" in resumed.stderr, \
        resumed.stderr
    straight, resumed = json.loads(straight.stdout), json.loads(resumed.stdout)
    assert [s["valid"] for s in resumed] == [s["valid"] for s in straight]
    assert [s["test"] for s in resumed] == [s["test"] for s in straight]
    records = lambda wd: [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"}  # noqa: E731
                          for x in (tmp_path / wd / "metrics.jsonl").read_text().splitlines()]
    for i in range(3):
        assert records(f"b{i}") == records(f"a{i}")
    decayed = [i for i in range(3) if any(r.get("lr_scale", 1) < 1 for r in records(f"a{i}"))]
    assert decayed and len(decayed) < 3, decayed  # plateau decays happened, in some members only
    model, cfg, _ = load_model(tmp_path / "b2")
    assert cfg.train.seed == 2 and model.rnn is not None


class _Ragged(AddingTask):
    """The adding problem with training batches one step shorter for odd seeds (a variable-length task)."""

    name = "test_ragged"

    def train_batches(self, batch_size, *, seed=0, start_step=0):
        for b in super().train_batches(batch_size, seed=seed, start_step=start_step):
            yield dataclasses.replace(b, inputs=b.inputs[:, seed % 2:])


tasks.register("test_ragged")(_Ragged)


def test_population_of_members_with_different_batch_shapes_is_refused(tmp_path):
    cfgs = [apply_overrides(Config(), {"task.name": "test_ragged", "task.options": {"T": 6}, "model.hidden_size": 4,
                                       "train.steps": 2, "train.seed": s}) for s in (0, 1)]
    with pytest.raises(ValueError, match=r"population: task 'test_ragged' gives the members batches of different "
                                         r"shapes at step 0 \(\(32, 5, 2\), \(32, 6, 2\): .*Train these trials "
                                         r"one at a time"):
        train_population(cfgs, [tmp_path / "a", tmp_path / "b"])
    assert not (tmp_path / "a").exists()  # nothing written


def test_population_refuses_mixed_shapes(tmp_path):
    a = apply_overrides(Config(), {"model.hidden_size": 8})
    b = apply_overrides(Config(), {"model.hidden_size": 16})
    with pytest.raises(ValueError, match="population_key"):
        train_population([a, b], [tmp_path / "a", tmp_path / "b"])
