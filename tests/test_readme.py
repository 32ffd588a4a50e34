"""The README's quoted results are the ones scripts/readme_results.py wrote (docs/readme_results.md), and the
README's commands and files exist."""

from __future__ import annotations

import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

from readme_results import BLOCK, RESULTS_JSON, RESULTS_MD, check_readme  # noqa: E402  (scripts/ on sys.path)


def test_readme_results_match_the_script_output():
    assert RESULTS_MD.exists() and RESULTS_JSON.exists(), "run python scripts/readme_results.py"
    assert check_readme() == [], "README.md differs from docs/readme_results.md: python scripts/readme_results.py " \
                                 "--update-readme (after re-running the sections whose code changed)"
    results = json.loads(RESULTS_JSON.read_text())
    quoted = dict(BLOCK.findall((ROOT / "README.md").read_text()))
    assert "quick" in quoted, "the README quotes the quick study from the script"
    for name in quoted:  # every quoted section says the machine it ran on
        m = results[name]["machine"]
        assert m["cpu"] in quoted[name] and f"jax {m['jax']}" in quoted[name], name


def test_check_notices_a_number_edited_by_hand(tmp_path, monkeypatch):
    import readme_results

    readme = (ROOT / "README.md").read_text()
    name, body = BLOCK.findall(readme)[0]
    edited = readme.replace(body, re.sub(r"\d", "7", body, count=1), 1)
    assert edited != readme
    fake = tmp_path / "README.md"
    fake.write_text(edited)
    monkeypatch.setattr(readme_results, "ROOT", tmp_path)
    assert readme_results.check_readme() == [name]


@pytest.mark.parametrize("path", sorted({m for m in re.findall(r"`((?:experiments|benchmarks|scripts|docs|notebooks)/"
                                                               r"[\w./-]+\.(?:py|png|ipynb|sh|md|json))`",
                                                               (ROOT / "README.md").read_text())}))
def test_files_the_readme_names_exist(path):
    assert (ROOT / path).exists(), path
