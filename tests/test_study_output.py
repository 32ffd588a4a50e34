"""What a sweep shows: trial lines with the metric, the wall time or the error; the progress bar on a
terminal, progress lines elsewhere; `status --failed`; a finished study is not run or reported again;
Ctrl-C says how to resume."""

from __future__ import annotations

import io
import json
import pathlib
import re
import sys

import pytest

from lstm_lab import sweep
from lstm_lab.cli import main
from lstm_lab.analysis.report import REPORT_STATE, report_is_current
from lstm_lab.sweep import storage as db
from lstm_lab.sweep.results import format_status
from lstm_lab.sweep.study import prepare_study
from lstm_lab.sweep.worker import run_worker

from test_sweep import TINY, cli, write_study

FAST = {**TINY, "train.steps": 10, "train.eval_every": 5}


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.integration  # end to end: whole runs or sweeps
def test_trial_lines_failed_trials_and_progress_lines(tmp_path, monkeypatch, capsys):
    # one trial completes, one fails when it starts (a task that is not registered: a valid config)
    f = write_study(tmp_path / "s.py", variants=("vanilla",), search="grid", base=FAST,
                    space={"task.name": "Choice('copy', 'nosuchtask')"})
    study = sweep.load_study(f)
    sd = tmp_path / "st"
    prepare_study(study, sd, log=lambda m: None)
    monkeypatch.setenv("LSTM_LAB_PROGRESS_SECONDS", "0.2")
    logs = []
    run_worker(study, sd, log=logs.append)  # stderr is not a terminal here: progress lines
    done = [ln for ln in logs if ln.startswith("trial ")]
    assert len(done) == 2, logs
    assert any(re.fullmatch(r"trial \d vanilla/000\d: complete test\.loss=[-+.e\d]+ \(\d+\.\d s\)", ln) for ln in done), done
    (failed,) = [ln for ln in done if ": failed" in ln]
    assert re.match(r"trial \d vanilla/000\d: failed \(\d+\.\d s\): \w+Error: .*nosuchtask", failed), failed
    progress = [ln for ln in logs if ln.startswith("progress: ")]
    assert progress and all(re.fullmatch(r"progress: \d/2 done(, 1 failed)?, \d running, [\d.]+ trials/min, ETA .+", ln)
                            for ln in progress), progress

    st = sweep.status(sd)
    assert [(t["slot"], t["status"]) for t in st["failed_trials"]] == [(failed.split()[2].rstrip(":"), "failed")]
    assert "nosuchtask" in st["failed_trials"][0]["error"] and "\n" not in st["failed_trials"][0]["error"]
    assert main(["status", str(sd), "--failed"]) == 0
    out = capsys.readouterr().out
    assert "failed trials: 1" in out and re.search(r"  trial \d vanilla/000\d: failed: \w+Error: .*nosuchtask", out), out
    assert main(["status", str(sd)]) == 0
    assert "failed trials" not in capsys.readouterr().out
    assert main(["status", str(sd), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["failed_trials"][0]["status"] == "failed"


@pytest.mark.integration  # end to end: whole runs or sweeps
def test_lines_go_through_the_bar_on_a_terminal(tmp_path, monkeypatch):
    f = write_study(tmp_path / "s.py", variants=("vanilla",), base=FAST)
    study = sweep.load_study(f)
    sd = tmp_path / "st"
    prepare_study(study, sd, log=lambda m: None)
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    run_worker(study, sd, log=lambda m: print(m, file=sys.stderr))
    monkeypatch.undo()
    text = term.getvalue()
    assert "study tiny" in text and "2/2" in text  # the bar
    lines = [ln for ln in text.split("\n") if "trial " in ln]
    assert len(lines) == 2, text
    for ln in lines:  # each trial line on a line of its own: the bar was cleared before it
        assert ln.split("\r")[-1].startswith("trial "), repr(ln)
    assert text.count("study tiny") >= 2 and text.rstrip().endswith("]")  # redrawn below, closed once


@pytest.mark.integration  # end to end: whole runs or sweeps
def test_status_tells_a_running_trial_whose_worker_is_gone(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("LSTM_LAB_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("LSTM_LAB_GRACE_PERIOD", "1")
    study = sweep.load_study(write_study(tmp_path / "s.py", variants=("vanilla",)))
    sd = tmp_path / "st"
    prepare_study(study, sd, log=lambda m: None)
    ostudy = db.open_study(sd, sampler=study.sampler())
    (mine,) = db.pop(ostudy, 1)  # this process: alive
    (theirs,) = db.pop(ostudy, 1)
    theirs.set_user_attr("host", "node-b")  # elsewhere: only its heartbeat tells
    st = sweep.status(sd)
    assert (st["running"], st["dead"]) == (2, 0)
    time.sleep(2.5)
    ostudy._storage.record_heartbeat(mine._trial_id)
    st = sweep.status(sd)
    assert (st["running"], st["dead"]) == (1, 1), st
    assert st["dead_trials"][0]["number"] == theirs.number and "no heartbeat" in st["dead_trials"][0]["why"]
    assert f"trial {theirs.number} vanilla/0001: running (worker dead): no heartbeat" in format_status(st)


@pytest.mark.integration  # end to end: whole runs or sweeps
def test_finished_study_is_not_run_or_reported_again(tmp_path, capsys):
    f = write_study(tmp_path / "s.py", variants=("vanilla",), base=FAST)
    sd = tmp_path / "st"
    assert main(["sweep", str(f), "--dir", str(sd)]) == 0
    out = capsys.readouterr()
    assert "report: " in out.out and out.err.count("trial ") == 2
    html = sd / "report" / "report.html"
    written = html.stat().st_mtime_ns
    assert report_is_current(sd)
    page = html.read_text()  # one file to share: figures embedded, the CSV linked
    assert 'src="data:image/png;base64,' in page and not re.search(r'src="[^"]*\.png"', page)
    assert '<a href="trials.csv">trials.csv</a>' in page
    assert json.loads((sd / "report" / REPORT_STATE).read_text())["trials"] == 2

    assert main(["sweep", str(f), "--dir", str(sd)]) == 0
    out = capsys.readouterr()
    assert "nothing left to do: 2/2 complete" in out.err and "trial " not in out.err, out.err
    assert "is up to date" in out.out and html.stat().st_mtime_ns == written, out.out

    assert main(["sweep", str(f), "--dir", str(sd), "--report"]) == 0
    assert "report: " in capsys.readouterr().out and html.stat().st_mtime_ns != written

    ostudy = db.open_study(sd)  # a trial changed since: the report is stale
    ostudy.enqueue_trial({}, user_attrs={"slot": "extra"})
    assert not report_is_current(sd)
    with pytest.raises(SystemExit):
        main(["sweep", str(f), "--report", "--no-report"])


@pytest.mark.integration  # a sweep process, interrupted
def test_ctrl_c_hands_trials_back_and_says_how_to_resume(tmp_path):
    f = write_study(tmp_path / "s.py", variants=("vanilla",))
    sd = tmp_path / "st"
    # SIGINT at step 12 of the first trial (checkpoint at step 10), as a Ctrl-C would
    out = cli("sweep", f, "--dir", sd, env={"LSTM_LAB_DEBUG_SIGINT_AT_STEP": "12"}, check=False)
    assert out.returncode == 130, out.stderr
    assert out.stderr.rstrip().splitlines()[-1] == "interrupted; run the same command to resume", out.stderr
    assert "Traceback" not in out.stderr and "KeyboardInterrupt" not in out.stderr.replace("(KeyboardInterrupt)", "")
    st = sweep.status(sd)
    assert (st["complete"], st["running"], st["dead"], st["waiting"]) == (0, 0, 0, 2), st
    out = cli("sweep", f, "--dir", sd, "--no-report")
    assert sweep.status(sd)["complete"] == 2
    every = sweep.trials(sd, all_attempts=True)
    retry = every[every["retry_of"].notna()].iloc[0]
    metrics = [json.loads(x) for x in (pathlib.Path(retry.workdir) / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["kind"] == "valid"] == [10, 20]  # resumed from the checkpoint
