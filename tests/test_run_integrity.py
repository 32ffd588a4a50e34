"""A run directory survives faults: corrupt checkpoints are caught (checksums) and the run falls back to an
intact one; one process per workdir (flock); metrics.jsonl has one record per (kind, step) after a resume;
read-only workdirs, bad configs and Ctrl-C end in one line, not a traceback or a broken workdir."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lstm_lab import config as cfglib
from lstm_lab._debug import SIGINT_AT_STEP as DEBUG_INTERRUPT_ENV
from lstm_lab.training import (CheckpointCorruptError, RunConflictError, WorkdirBusyError,
                               WorkdirLock, WorkdirNotWritableError, sample, train)

from test_sweep import sigint_default
from test_training import corpus, tiny_copy, tiny_lm  # noqa: F401 - fixture

CLI = [sys.executable, "-m", "lstm_lab.cli"]


def _lm(corpus, **extra):  # noqa: F811
    return tiny_lm(corpus, **{"train.keep_checkpoints": 3, **extra})


def _records(wd: pathlib.Path) -> list[dict]:
    """metrics.jsonl without the timing field."""
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (wd / "metrics.jsonl").read_text().splitlines()]


def _one_per_kind_and_step(wd: pathlib.Path) -> bool:
    keys = [(r["kind"], r["step"]) for r in _records(wd)]
    return len(keys) == len(set(keys))


def _flip_array_bytes(step_dir: pathlib.Path) -> list[str]:
    """Flip one byte in an ocdbt data file of an orbax checkpoint, as a disk fault would, where orbax still reads
    the checkpoint without an error but an array's values differ (large arrays sit in zstd blocks with no
    checksum; OCDBT b-tree nodes, which hold small arrays inline, carry a CRC that orbax checks already).
    Returns the keys of the arrays that changed."""
    import orbax.checkpoint as ocp

    state = (step_dir / "state").absolute()
    from lstm_lab.training.checkpoints import named_arrays

    ck = ocp.StandardCheckpointer()
    arrays = {k: np.asarray(v) for k, v in named_arrays(ck.restore(state)).items()}
    data_files = [f for f in state.rglob("*") if f.is_file() and f.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"]
    for f in sorted(data_files, key=lambda f: -f.stat().st_size):
        original = f.read_bytes()
        for at in np.linspace(0.05, 0.95, 19) * len(original):
            data = bytearray(original)
            data[int(at)] ^= 0x10
            f.write_bytes(bytes(data))
            try:
                after = named_arrays(ck.restore(state))
                changed = [k for k in arrays if not np.array_equal(np.asarray(after[k]), arrays[k])]
            except Exception:  # noqa: BLE001 - a decoding error: not the silent kind
                changed = []
            if changed:
                return changed
            f.write_bytes(original)
    raise AssertionError(f"found no byte to flip silently under {state}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):  # noqa: F811
    """An uninterrupted run (in this process) and its records."""
    wd = tmp_path_factory.mktemp("reference") / "run"
    summary = train(_lm(corpus), wd, quiet=True)
    return summary, _records(wd)


def _cut_off(cfg, wd):
    """A finished run made to look cut off after its last checkpoint (no summary yet)."""
    train(cfg, wd, quiet=True)
    (wd / "summary.json").unlink()


# ---------------------------------------------------------------------------
# checkpoints: checksums and fallback
# ---------------------------------------------------------------------------
@pytest.mark.integration  # end to end: whole runs or sweeps
def test_flipped_bytes_in_the_latest_checkpoint_fall_back_to_the_previous_one(tmp_path, corpus, reference):  # noqa
    wd = tmp_path / "run"
    _cut_off(_lm(corpus), wd)
    _flip_array_bytes(wd / "checkpoints" / "last" / "30")
    messages = []
    s = train(_lm(corpus), wd, quiet=True, log=messages.append)
    warnings = [m for m in messages if m.startswith("warning:")]
    assert len(warnings) == 1 and "\n" not in warnings[0], messages
    assert ("the last checkpoint at step 30 is corrupt" in warnings[0] and "sha256" in warnings[0]
            and "falling back to the last checkpoint at step 20" in warnings[0]), warnings
    assert f"resuming {wd} from step 20" in messages
    assert s["status"] == "completed" and s["valid"] == reference[0]["valid"] and s["test"] == reference[0]["test"]
    assert _records(wd) == reference[1] and _one_per_kind_and_step(wd)  # steps 21..30 were not logged twice
    assert sorted(int(p.name) for p in (wd / "checkpoints" / "last").iterdir()) == [10, 20, 30]  # 30 rewritten


@pytest.mark.integration  # end to end: whole runs or sweeps
def test_every_last_checkpoint_corrupt_resumes_from_best(tmp_path, corpus, reference):  # noqa: F811
    wd = tmp_path / "run"
    _cut_off(_lm(corpus), wd)
    for p in (wd / "checkpoints" / "last").iterdir():
        _flip_array_bytes(p)
    best = int(next((wd / "checkpoints" / "best").iterdir()).name)
    messages = []
    s = train(_lm(corpus), wd, quiet=True, log=messages.append)
    assert sum("is corrupt" in m for m in messages) == 3, messages
    assert f"resuming {wd} from the best checkpoint at step {best}" in messages
    assert s["valid"] == reference[0]["valid"] and s["test"] == reference[0]["test"]
    assert _records(wd) == reference[1]


@pytest.mark.integration  # and the CLI's line
def test_no_intact_checkpoint_is_one_error_and_force_starts_over(tmp_path, corpus, reference):  # noqa: F811
    wd = tmp_path / "run"
    cfg = _lm(corpus)
    _cut_off(cfg, wd)
    for which in ("last", "best"):
        for p in (wd / "checkpoints" / which).iterdir():
            _flip_array_bytes(p)
    with pytest.raises(CheckpointCorruptError, match=r"workdir '.*run' has no intact checkpoint to resume from "
                                                     r"\(corrupt or unreadable: last 30, last 20, last 10, best \d+\)"
                                                     r"; use --force"):
        train(cfg, wd, quiet=True, log=lambda m: None)
    assert not (wd / "summary.json").exists()  # not recorded as a failed run
    exp = tmp_path / "exp.py"
    exp.write_text(f"overrides = {cfglib.to_overrides(cfg)!r}\n")
    r = subprocess.run(CLI + ["train", str(exp), "--workdir", str(wd), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[-1].startswith("lstm-lab train: error: workdir ") and "--force" in r.stderr
    messages = []
    s = train(cfg, wd, quiet=True, force=True, log=messages.append)
    assert any(m.startswith("moved the previous run (no intact checkpoint") for m in messages), messages
    assert s["valid"] == reference[0]["valid"] and _records(wd) == reference[1]
    assert len(list(wd.glob("replaced-*"))) == 1 and (wd / ".lock").exists()


@pytest.mark.integration  # end to end: whole runs or sweeps
def test_checkpoints_of_the_positional_format_are_refused_in_one_line(tmp_path, corpus, reference):  # noqa: F811
    """Checkpoints of the previous format (arrays keyed by position: a renamed or reordered parameter would restore
    into the wrong slot) are not restored: each is named in one line, and --force starts the run over."""
    wd = tmp_path / "run"
    _cut_off(_lm(corpus), wd)
    for meta_file in (wd / "checkpoints").glob("*/*/meta/metadata"):
        meta = json.loads(meta_file.read_text())
        meta["format"] = 1
        meta_file.write_text(json.dumps(meta))
    messages = []
    with pytest.raises(CheckpointCorruptError, match="no intact checkpoint to resume from"):
        train(_lm(corpus), wd, quiet=True, log=messages.append)
    assert any("last checkpoint at step 30 is corrupt (an older lstm_lab wrote it (checkpoint format 1: arrays "
               "by position" in m for m in messages), messages
    s = train(_lm(corpus), wd, quiet=True, force=True, log=lambda m: None)
    assert s["test"] == reference[0]["test"]


def test_checkpoints_restore_by_name_and_a_renamed_array_is_an_error(tmp_path):
    from lstm_lab.training.checkpoints import Checkpoints, named_arrays

    a, b = np.arange(6.0).reshape(2, 3), -np.arange(6.0).reshape(2, 3) - 1
    ck = Checkpoints(tmp_path, 2, print)
    ck.save("last", 1, {"params": {"W_i": a, "W_o": b}}, {"step": 1})
    got, meta, which, step = ck.restore_newest({"params": {"W_i": np.zeros((2, 3)), "W_o": np.zeros((2, 3))}})
    assert np.array_equal(got["params"]["W_i"], a) and np.array_equal(got["params"]["W_o"], b)
    # a later version renamed W_o to Z_o (which now sorts after W_i's replacement A_i): by position, the two
    # same-shaped arrays would swap silently; by name, the restore refuses and says which names differ
    messages = []
    ck.log = messages.append
    target = {"params": {"A_i": np.zeros((2, 3)), "Z_o": np.zeros((2, 3))}}
    assert ck.restore_newest(target) is None
    assert "the model has params/A_i, params/Z_o; the checkpoint has params/W_i, params/W_o" in messages[0], messages
    assert list(named_arrays({"x": (a, {"k": b})})) == ["x/0", "x/1/k"]
    ck.close()


# ---------------------------------------------------------------------------
# one process per workdir
# ---------------------------------------------------------------------------
@pytest.mark.integration  # end to end: whole runs or sweeps
def test_a_locked_workdir_is_refused_before_anything_is_written(tmp_path):
    wd = tmp_path / "run"
    with WorkdirLock(wd):
        assert (wd / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(WorkdirBusyError, match=rf"workdir '.*run' is in use by pid {os.getpid()} "
                                                   rf"\(lock .*\.lock\); wait for it or use another --workdir"):
            train(tiny_copy(), wd, quiet=True)
        assert sorted(p.name for p in wd.iterdir()) == [".lock"]
    s = train(tiny_copy(), wd, quiet=True)  # released
    assert s["status"] == "completed"


def test_population_members_are_locked(tmp_path):
    from lstm_lab.training import train_population

    cfgs = [tiny_copy(**{"train.seed": i}) for i in range(2)]
    wds = [tmp_path / "a", tmp_path / "b"]
    with WorkdirLock(wds[1]):
        with pytest.raises(WorkdirBusyError, match=f"in use by pid {os.getpid()}"):
            train_population(cfgs, wds)
    assert not (wds[0] / "config.json").exists()  # nothing written into the members
    with pytest.raises(ValueError, match="two members share a workdir"):
        train_population(cfgs, [tmp_path / "c", tmp_path / "c"])


def _wait(pred, timeout=120.0, what=""):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.integration
def test_two_cli_runs_on_one_workdir_one_trains_the_other_exits_2(tmp_path):
    cfg = tiny_copy(**{"train.steps": 10_000_000, "train.eval_every": 1_000_000, "train.log_every": 1000})
    exp = tmp_path / "exp.py"
    exp.write_text(f"overrides = {cfglib.to_overrides(cfg)!r}\n")
    wd = tmp_path / "run"
    procs = [subprocess.Popen(CLI + ["train", str(exp), "--workdir", str(wd), "--quiet"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        _wait(lambda: any(p.poll() is not None for p in procs), what="one of the two runs to exit")
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        err = loser.communicate()[1]
        assert loser.returncode == 2 and "Traceback" not in err, err
        assert err.splitlines()[-1] == (f"lstm-lab train: error: workdir {str(wd)!r} is in use by pid {winner.pid} "
                                        f"(lock {wd / '.lock'}); wait for it or use another --workdir")
        assert winner.poll() is None and (wd / ".lock").read_text().strip() == str(winner.pid)
        winner.send_signal(signal.SIGKILL)
        winner.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    with WorkdirLock(wd):  # a killed holder leaves no stale lock
        pass


# ---------------------------------------------------------------------------
# nothing written for a bad config; read-only workdirs; failed attempts
# ---------------------------------------------------------------------------
def test_model_errors_leave_no_workdir(tmp_path):
    bad = tiny_copy(**{"task.name": "adding", "task.options": {"T": 5}, "model.tie_weights": True,
                       "model.embed_dim": 8})
    with pytest.raises(ValueError, match="tie_weights needs a token task"):
        train(bad, tmp_path / "run", quiet=True)
    with pytest.raises(FileNotFoundError, match="--resume: .* has no checkpoint"):
        train(tiny_copy(), tmp_path / "resume", quiet=True, resume=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration  # end to end: whole runs or sweeps
def test_a_failed_attempt_does_not_block_the_corrected_command(tmp_path):
    """A workdir left by an attempt that failed before its first checkpoint (as older versions left one for a
    config error caught late) is moved aside for a different config, without --force."""
    wd = tmp_path / "run"
    from lstm_lab.training import run_record
    from lstm_lab._io import atomic_json

    wd.mkdir()
    atomic_json(wd / "config.json", run_record(tiny_copy(**{"model.hidden_size": 6})))
    atomic_json(wd / "summary.json", {"status": "failed", "error": "ValueError: bad", "workdir": str(wd)})
    messages = []
    s = train(tiny_copy(), wd, quiet=True, log=messages.append)
    assert s["status"] == "completed"
    assert any(m.startswith("moved the previous run (it failed before its first checkpoint: ValueError: bad")
               for m in messages), messages
    with pytest.raises(RunConflictError):  # a run with checkpoints still needs --force
        train(tiny_copy(**{"model.hidden_size": 6}), wd, quiet=True)


@pytest.mark.integration
def test_unwritable_workdir_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(WorkdirNotWritableError, match=r"workdir '.*file/run' is not writable \(.*\); fix its "
                                                      r"permissions or use another --workdir"):
        train(tiny_copy(), blocker / "run", quiet=True)
    exp = tmp_path / "exp.py"
    exp.write_text(f"overrides = {cfglib.to_overrides(tiny_copy())!r}\n")
    r = subprocess.run(CLI + ["train", str(exp), "--workdir", str(blocker / "run"), "--quiet"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[-1].startswith(f"lstm-lab train: error: workdir {str(blocker / 'run')!r} is not "
                                                f"writable")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through file permissions")
def test_read_only_workdir_is_a_clear_error(tmp_path):
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / ".lock").write_text("")  # even with a writable lock file left from before
    wd.chmod(0o555)
    try:
        with pytest.raises(WorkdirNotWritableError, match="is not writable"):
            train(tiny_copy(), wd, quiet=True)
    finally:
        wd.chmod(0o755)


# ---------------------------------------------------------------------------
# Ctrl-C; sample
# ---------------------------------------------------------------------------
@pytest.mark.integration
def test_sigint_stops_with_one_line_and_resumes_exactly(tmp_path, corpus):  # noqa: F811
    cfg = tiny_lm(corpus)
    exp = tmp_path / "exp.py"
    exp.write_text(f"overrides = {cfglib.to_overrides(cfg)!r}\n")

    def run(wd, **env):
        return subprocess.run(CLI + ["train", str(exp), "--workdir", str(wd), "--quiet"], capture_output=True,
                              text=True, env={**os.environ, **env}, preexec_fn=sigint_default)

    straight = run(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    stopped = run(tmp_path / "run", **{DEBUG_INTERRUPT_ENV: "17"})
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr, stopped.stderr
    assert stopped.stderr.splitlines()[-1] == ("lstm-lab train: interrupted at step 17 (checkpoint saved); run the "
                                               "same command to resume")
    assert not (tmp_path / "run" / "summary.json").exists()  # not a failed run
    resumed = run(tmp_path / "run")
    assert resumed.returncode == 0 and f"resuming {tmp_path / 'run'} from step 17" in resumed.stderr, resumed.stderr
    # the train record at step 20 averages steps 16-20 as the uninterrupted one does: the checkpoint kept 16, 17
    assert _records(tmp_path / "run") == _records(tmp_path / "straight")
    a, b = (json.loads((tmp_path / w / "summary.json").read_text()) for w in ("straight", "run"))
    assert a["valid"] == b["valid"] and a["test"] == b["test"]


@pytest.mark.integration
def test_sample_length_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match=r"length must be an integer >= 1 \(tokens to generate\); got -5"):
        sample(tmp_path, length=-5)
    r = subprocess.run(CLI + ["sample", str(tmp_path), "--length", "-5"], capture_output=True, text=True)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "Traceback" not in r.stderr and "length" in last and "-5" in last, r.stderr
