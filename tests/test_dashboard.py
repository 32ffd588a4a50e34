"""A live view of a study: ``lstm-lab dashboard`` runs optuna-dashboard on the study's storage, whose trials show the
variant, the hyperparameters in actual units (user attrs; the params keep Optuna's search units) and the learning
curve (intermediate values, reported while a trial trains too)."""

from __future__ import annotations

import json
import math
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings

import pytest

from lstm_lab._io import read_jsonl
from test_sweep import ROOT, cli, write_study


def test_dashboard_without_its_extra_is_one_line(tmp_path, monkeypatch, capsys):
    from lstm_lab.cli import main

    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # import optuna_dashboard raises ImportError
    assert main(["dashboard", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == "lstm-lab dashboard needs the dashboard extra: pip install -e '.[dashboard]'\n"


def _valid(path: pathlib.Path, step: int, loss: float) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({"kind": "train", "step": step, "loss": loss + 0.5}) + "\n")
        f.write(json.dumps({"kind": "valid", "step": step, "loss": loss}) + "\n")


def test_a_running_trial_reports_its_learning_curve(tmp_path, monkeypatch):
    optuna = pytest.importorskip("optuna")
    from lstm_lab.sweep.worker import _LiveCurves, _history, _report_curve

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ostudy = optuna.create_study()
    trial = ostudy.ask()
    wd = tmp_path / "run"
    wd.mkdir()
    metrics = wd / "metrics.jsonl"
    _valid(metrics, 10, 2.0)
    live = _LiveCurves([trial], [wd])
    live.tick()
    assert ostudy.trials[0].intermediate_values == {10: 2.0}
    _valid(metrics, 20, 1.5)
    _valid(metrics, 30, math.nan)  # a diverged evaluation is no point of the curve
    live.tick()
    assert ostudy.trials[0].intermediate_values == {10: 2.0, 20: 1.5}
    with metrics.open("a") as f:
        f.write('{"kind": "valid", "st')  # a torn last line (the writer is mid-line)
    live.tick()
    assert ostudy.trials[0].intermediate_values == {10: 2.0, 20: 1.5}

    # the thread: a tick every LSTM_LAB_CURVE_SECONDS while the trial trains
    trial2, wd2 = ostudy.ask(), tmp_path / "run2"
    wd2.mkdir()
    monkeypatch.setenv("LSTM_LAB_CURVE_SECONDS", "0.05")
    with _LiveCurves([trial2], [wd2]):
        _valid(wd2 / "metrics.jsonl", 5, 3.0)
        deadline = time.monotonic() + 10
        while not ostudy.trials[1].intermediate_values and time.monotonic() < deadline:
            time.sleep(0.05)
    assert ostudy.trials[1].intermediate_values == {5: 3.0}

    # the outcome reports the whole curve: the steps reported live are not stored again (nor warned about)
    _valid(wd2 / "metrics.jsonl", 10, 2.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _report_curve(trial2, _history(wd2))
    assert not caught, [str(w.message) for w in caught]
    assert ostudy.trials[1].intermediate_values == {5: 3.0, 10: 2.5}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        body = r.read()
        return json.loads(body) if r.headers.get_content_type() == "application/json" else body.decode()


@pytest.mark.integration
def test_the_dashboard_shows_variants_actual_hyperparameters_and_curves(tmp_path):
    pytest.importorskip("optuna_dashboard")
    sd = tmp_path / "study"
    cli("sweep", write_study(tmp_path / "tiny.py"), "--dir", sd, "--no-report")  # 2 variants x 2 trials
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "lstm_lab.cli", "dashboard", str(sd), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                studies = _get(f"{base}/api/studies")["study_summaries"]
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the dashboard did not answer on {base}") from None
                time.sleep(0.3)
        assert [s["study_name"] for s in studies] == ["tiny"]
        sid = studies[0]["study_id"]
        detail = _get(f"{base}/api/studies/{sid}?after=0")
        page = _get(f"{base}/dashboard/studies/{sid}")  # the page the printed URL opens
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert "<html" in page.lower()
    assert f"open {base}/dashboard/studies/{sid} " in out, (out, err)

    trials = detail["trials"]
    assert len(trials) == 4 and {t["state"] for t in trials} == {"Complete"}
    assert detail["has_intermediate_values"]
    assert {"optim.learning_rate", "optim.momentum"} <= {a["key"] for a in detail["union_user_attrs"]}
    variants = []
    for t in trials:
        params = {p["name"]: p["param_external_value"] for p in t["params"]}
        attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
        variants.append(params["variant"])
        assert attrs["variant"] == params["variant"]
        # the hyperparameters in actual units, as the run trained with them (params: 1 - momentum, search units)
        config = json.loads((pathlib.Path(attrs["workdir"]) / "config.json").read_text())["config"]
        momentum, lr = float(attrs["optim.momentum"]), float(attrs["optim.learning_rate"])
        assert 0 <= momentum < 1 and momentum == pytest.approx(config["optim"]["momentum"], rel=1e-12, abs=0)
        assert momentum == pytest.approx(1 - float(params["1-optim.momentum"]), rel=1e-12, abs=0)
        assert 1e-2 <= lr <= 1e-1 and lr == pytest.approx(config["optim"]["learning_rate"], rel=1e-12, abs=0)
        assert float(params["optim.learning_rate"]) == pytest.approx(lr, rel=1e-12, abs=0)
        # the learning curve: the validation loss at every evaluation step (train.eval_every 10 of 20 steps)
        curve = {r["step"]: r["loss"] for r in read_jsonl(pathlib.Path(attrs["workdir"]) / "metrics.jsonl",
                                                           kinds=("valid",))}
        assert [(v["step"], v["value"]) for v in t["intermediate_values"]] == sorted(curve.items())
        assert sorted(curve) == [10, 20]
    assert sorted(variants) == ["nfg", "nfg", "vanilla", "vanilla"]
