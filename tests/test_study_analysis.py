"""Notebook 03 and the report read one study with the same functions (lstm_lab.analysis): on one study they print
the same fANOVA importances, the same Welch p-values and the same comparison with the Odyssey's findings."""

from __future__ import annotations

import json
import math
import pathlib

import nbformat
import numpy as np
import pytest

from lstm_lab.analysis import data
from lstm_lab.analysis import report as analysis_report
from lstm_lab.sweep import LogUniform, OneMinusLogUniform, Study, Uniform
from lstm_lab.sweep import storage as db
from lstm_lab.sweep.study import prepare_study
from lstm_lab.sweep.worker import _finish

from test_sweep import TINY

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from run_notebook import execute  # noqa: E402  (scripts/ is on sys.path, see conftest)


def synthetic_study(sd: pathlib.Path) -> None:
    """A planned study whose trials are recorded with a made-up metric (no training): strongly dependent on the
    learning rate, NFG worse."""
    study = Study(name="both", base=TINY, variants=("vanilla", "nfg", "cifg"), trials_per_variant=14,
                  space={"optim.learning_rate": LogUniform(1e-3, 1e-1), "optim.momentum": OneMinusLogUniform(0.05, 1),
                         "model.input_noise": Uniform(0.0, 0.5)})
    prepare_study(study, sd, log=lambda m: None)
    ostudy = db.open_study(sd, sampler=study.sampler())
    rng = np.random.default_rng(0)
    while trials := db.pop(ostudy, 8):
        for t in trials:
            variant, hyper = study.ask(t)
            loss = (1.0 + (math.log10(hyper["optim.learning_rate"]) + 2) ** 2 + 0.3 * hyper["model.input_noise"]
                    + (0.8 if variant == "nfg" else 0.0) + 0.05 * rng.normal())
            summary = {"status": "complete", "valid": {"loss": loss + 0.01}, "test": {"loss": loss}, "steps": 20,
                       "wall_seconds": 1.0, "history": [{"step": 10, "loss": loss + 0.5}, {"step": 20, "loss": loss}]}
            assert _finish(ostudy, study, t, summary, None, lambda m: None)["status"] == "complete"


@pytest.mark.integration  # a notebook kernel
def test_notebook_and_report_print_the_same_numbers(tmp_path):
    sd = tmp_path / "study"
    synthetic_study(sd)
    path = analysis_report.report(sd)
    numbers = json.loads((path.parent / "report.json").read_text())
    assert numbers["trials"] == 42 and max(numbers["importance"], key=numbers["importance"].get) == "learning_rate"

    nb = nbformat.read(ROOT / "notebooks" / "03_odyssey_study.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(
        'import json\nprint("NUMBERS " + json.dumps({"importance": imp.to_json(), '
        '"all": imp.rename(index=st.search_label)["all"].dropna().to_dict(), '
        '"p_values": welch["p_value"].to_dict()}))'))
    copy = tmp_path / "03_odyssey_study.ipynb"
    nbformat.write(nb, copy)
    ran = execute(copy, {"study_file": "", "study_dir": str(sd), "run_if_missing": False}, cwd=ROOT / "notebooks",
                  timeout=600)
    text = "".join(o.get("text", "") for c in ran.cells if c.cell_type == "code" for o in c.outputs)
    got = json.loads(text.split("NUMBERS ", 1)[1].splitlines()[0])

    assert got["all"] == numbers["importance"]  # the same floats, not merely close
    assert got["p_values"] == {v: r["p_value"] for v, r in numbers["variants"].items() if v != "vanilla"}
    # and every column (per variant too) is the report's table
    table = analysis_report.importance(data.load(sd))
    assert json.loads(got["importance"]) == json.loads(table.to_json())
    assert list(table.columns) == ["all", "vanilla", "nfg", "cifg"]

    # "Beside the Odyssey's findings": the notebook shows the report's section, word for word
    shown = [o["data"]["text/markdown"] for c in ran.cells if c.cell_type == "code" for o in c.outputs
             if "text/markdown" in o.get("data", {})]
    md = path.read_text()
    start = md.index("## Beside the Odyssey's findings\n")
    body = md[md.index("\n", start):md.index("\n## ", start + 1)]
    assert "42 complete trials over 3 variants" in body and "*NFG significantly worse*" in body
    assert [s.strip() for s in shown] == [body.strip()]
