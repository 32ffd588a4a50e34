"""The four notebooks run top to bottom at their tiny size (nbclient) and draw their figures; none is
committed with outputs."""

from __future__ import annotations

import json
import pathlib
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from run_notebook import execute, images  # noqa: E402  (scripts/ is on sys.path, see conftest)


def test_notebooks_committed_without_outputs():
    assert [p.name for p in NOTEBOOKS] == ["01_cells_and_gates.ipynb", "02_compare_variants.ipynb",
                                           "03_odyssey_study.ipynb", "04_forecasting.ipynb"]
    for p in NOTEBOOKS:
        nb = json.loads(p.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(not c["outputs"] and c["execution_count"] is None for c in code), p.name
        tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{p.name}: one cell tagged 'parameters'"


def _run(name, params, tmp_path):
    nb = execute(ROOT / "notebooks" / name, params, timeout=600)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    return nb


@pytest.mark.integration  # a notebook kernel
def test_cells_and_gates_notebook(tmp_path):
    nb = _run("01_cells_and_gates.ipynb", {"T": 2, "hidden_size": 8, "steps": 20, "workdir": str(tmp_path)}, tmp_path)
    assert images(nb) == 5  # curve, gate heat maps, cell norms, NFG growth, CIFG coupling
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "max |f - (1 - i)| = 0.0e+00" in text


@pytest.mark.integration  # a notebook kernel
def test_compare_variants_notebook(tmp_path, shared_data):
    nb = _run("02_compare_variants.ipynb", {
        "data_path": str(shared_data / "tinyshakespeare.txt"), "variants": ["lstm", "cifg"], "hidden_size": 16,
        "embed_dim": 8, "seq_len": 16, "batch_size": 8, "steps": 20, "eval_every": 10, "sample_length": 20,
        "prompt_length": 50,
        "workdir": str(tmp_path)}, tmp_path)
    assert images(nb) == 1
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "----- lstm" in text and "----- cifg" in text and "prompt (50 characters)" in text
    assert len(list(tmp_path.glob("*/summary.json"))) == 2


@pytest.mark.integration  # a notebook kernel
def test_odyssey_study_notebook_runs_and_reads_a_study(tmp_path):
    study = tmp_path / "tiny_study.py"
    study.write_text(textwrap.dedent("""\
        from lstm_lab.sweep import LogUniform, Study, Uniform
        study = Study(name="nb", variants=("vanilla", "nfg"), trials_per_variant=3, population=3,
                      base={"task.name": "adding", "task.options": {"T": 6}, "model.hidden_size": 8,
                            "train.batch_size": 16, "train.steps": 20, "train.eval_every": 10,
                            "train.eval_batch_size": 250, "train.keep_checkpoints": 1},
                      space={"optim.learning_rate": LogUniform(1e-3, 1e-1), "model.input_noise": Uniform(0, 0.2)})
        """))
    nb = _run("03_odyssey_study.ipynb", {"study_file": str(study), "study_dir": str(tmp_path / "st"),
                                         "run_if_missing": True}, tmp_path)
    assert images(nb) == 3  # distributions, fANOVA, metric vs learning rate
    md = [o["data"]["text/markdown"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
          if "text/markdown" in o.get("data", {})]
    assert len(md) == 1 and "6 complete trials over 2 variants" in md[0] and "*NFG significantly worse*" in md[0]


@pytest.mark.integration  # a notebook kernel
def test_forecasting_notebook_on_a_csv_of_ones_own(tmp_path):
    import numpy as np

    t = np.arange(150)
    load = 10 + 0.05 * t + 2 * np.sin(2 * np.pi * t / 12)
    csv = tmp_path / "load.csv"
    csv.write_text("hour,load\n" + "\n".join(f"{i},{v:.5f}" for i, v in zip(t, load)) + "\n")
    nb = _run("04_forecasting.ipynb", {"dataset": None, "path": str(csv), "target": "load", "season": 12,
                                       "context": 12, "horizon": 3, "variants": ["lstm", "gru"], "hidden_size": 8,
                                       "steps": 20, "workdir": str(tmp_path / "runs")}, tmp_path)
    assert images(nb) == 1  # the forecasts against the truth
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "150 steps, 0.0 .. 149.0, every 1; columns load; forecast load" in text
    assert "lstm: MAE" in text and "gru: MAE" in text and "the linear AR baseline" in text
    html = [o["data"]["text/html"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "text/html" in o.get("data", {})]
    assert len(html) == 1 and all(m in html[0] for m in ("seasonal_naive (baseline)", "MASE", "lstm", "gru"))
