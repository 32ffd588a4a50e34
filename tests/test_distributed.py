"""Multi-host training (``lstm-lab train --distributed``): two processes on localhost, one CPU device each,
train one char LM (carry passed between windows, so the carry is sharded across processes) and end with
the metrics of one process; bad flags are clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import free_port
from lstm_lab import config as cfglib, training

from test_training import corpus, tiny_lm  # noqa: F401 - fixture

CMD = [sys.executable, "-m", "lstm_lab.cli", "train"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**env, **extra}


@pytest.mark.integration  # two training processes
def test_two_processes_match_one_process(tmp_path, corpus):  # noqa: F811
    cfg = tiny_lm(corpus, **{"model.dropout": 0.0, "model.input_noise": 0.0, "train.steps": 20})
    exp = tmp_path / "exp.py"
    exp.write_text(f"overrides = {cfglib.to_overrides(cfg)!r}\n")
    # the reference in this process: one device (test_training checks 1 device == 4 devices)
    a = training.train(cfg, tmp_path / "one", quiet=True, log=lambda m: None)
    port = free_port()
    procs = [subprocess.Popen(CMD + [str(exp), "--workdir", str(tmp_path / "two"), "--quiet", "--distributed",
                                     "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                     "--process-id", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=_env()) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
    assert "process 1 of 2, 1 local of 2 devices" in outs[1][1]
    b = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert a["devices"] == 1 and b["devices"] == 2 and b["processes"] == 2
    assert b["valid"]["loss"] == pytest.approx(a["valid"]["loss"], abs=1e-5)
    assert b["test"]["loss"] == pytest.approx(a["test"]["loss"], abs=1e-5)
    # process 0 alone wrote the records: one line per record, no duplicates
    kinds = [json.loads(x)["kind"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("valid") == 2 and kinds.count("test") == 1


@pytest.mark.parametrize("kw, needle", [
    (dict(coordinator="127.0.0.1:1"), "give all of --coordinator, --num-processes"),
    (dict(coordinator="127.0.0.1:1", num_processes=2, process_id=2), "process id 2 is not in [0, 2)"),
])
def test_bad_distributed_arguments(kw, needle):
    from lstm_lab import distributed

    with pytest.raises(ValueError) as e:  # refused before JAX is touched
        distributed.initialize(**kw)
    assert needle in str(e.value)


def test_process_flags_need_distributed(capsys):
    from lstm_lab import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["train", "experiments/copy.py", "--num-processes", "2"])
    assert e.value.code == 2 and "need --distributed" in capsys.readouterr().err
