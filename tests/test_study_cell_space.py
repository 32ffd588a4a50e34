"""CellSpec fields in a study's space (``model.cell.<field>``): merged into each variant's cell, recorded as the
trial's parameters, checked on every variant when the study is made, and built the same way by every worker."""

from __future__ import annotations

import json

import pytest

from lstm_lab.cells import resolve_cell
from lstm_lab.sweep import Choice, IntUniform, LogUniform, Study, StudyError, Uniform

from test_sweep import TINY

SPACE = {"optim.learning_rate": LogUniform(1e-3, 1e-1), "model.cell.zoneout_h": Uniform(0.0, 0.3)}


def make(space=None, variants=("lstm", "gru"), **kw):
    return Study(**{"name": "reg", "base": TINY, "variants": variants, "baseline": variants[0],
                    "space": SPACE if space is None else space, "trials_per_variant": 3, **kw})


def test_sampled_cell_field_is_merged_into_the_variants_cell():
    from lstm_lab import tasks
    from lstm_lab.config import cell_from_config
    from lstm_lab.training.engine import build_model, task_info

    study = make(variants=("lstm", "gru", {"name": "cifg_vd", "coupled": True, "variational_dropout": 0.1}))
    cfg = study.config_for("gru", {"optim.learning_rate": 0.01, "model.cell.zoneout_h": 0.2}, 3)
    assert cfg.model.cell == {**resolve_cell("gru").flags(), "zoneout_h": 0.2}
    assert cfg.optim.learning_rate == 0.01 and cfg.train.seed == 3
    spec = cell_from_config(cfg.model.cell)
    assert (spec.family, spec.zoneout_h) == ("gru", 0.2)
    model = build_model(cfg, task_info(tasks.get(cfg.task.name, **cfg.task.options)))
    assert model.rnn.spec == spec and model.rnn.spec.zoneout_h == 0.2
    # a dict variant keeps its own fields; the space's value is merged in
    cell = study.config_for("cifg_vd", {"model.cell.zoneout_h": 0.1}, 0).model.cell
    assert (cell["coupled"], cell["variational_dropout"], cell["zoneout_h"]) == (True, 0.1, 0.1)
    # without a model.cell.* key in the space, model.cell stays the variant itself (existing studies unchanged)
    plain = make(space={"optim.learning_rate": LogUniform(1e-3, 1e-1)})
    assert plain.config_for("lstm", {"optim.learning_rate": 0.01}, 0).model.cell == "lstm"


def test_choice_over_a_bool_flag():
    study = make(space={"model.cell.layer_norm": Choice(False, True)}, variants=("lstm", "cifg"), seeds=1)
    plan = study.plan()
    seen = {p["params"]["model.cell.layer_norm"] for p in plan}
    assert seen == {False, True} and all(isinstance(v, bool) for v in seen)
    for p in plan:
        cfg = study.config_for(p["variant"], study.hyper_from_params(p["params"]), p["seed"])
        assert cfg.model.cell["layer_norm"] is p["params"]["model.cell.layer_norm"]
    assert study.config_for("cifg", {"model.cell.layer_norm": True}, 0).model.cell["coupled"] is True
    assert Study.from_record(study.record()).fingerprint() == study.fingerprint()


@pytest.mark.parametrize("space, variants, match", [
    ({"model.cell.zonout_h": Uniform(0.0, 0.3)}, ("lstm",),
     r"'model.cell.zonout_h' is not a CellSpec field.*Did you mean 'model.cell.zoneout_h'"),
    ({"model.cell.family": Choice("lstm", "gru")}, ("lstm",), r"'model.cell.family' cannot be searched"),
    ({"model.cell": Choice("lstm", "gru")}, ("lstm",), r"'model.cell' is the variant.*model.cell.<field>"),
    ({"model.cell.zoneout_c": Uniform(0.0, 0.3)}, ("lstm", "gru"),
     r"'model.cell.zoneout_c'.*model.cell.zoneout_c=0.3.*variant 'gru'.*zoneout_c=0.3 applies to lstm"),
    ({"model.cell.layer_norm": Choice(False, True)}, ("lstm", "gru"),
     r"model.cell.layer_norm=True.*variant 'gru'.*layer_norm=True applies to lstm"),
    ({"model.cell.zoneout_h": Uniform(0.0, 1.0)}, ("gru",), r"model.cell.zoneout_h=1.0.*rate in \[0, 1\)"),
    ({"model.cell.num_heads": IntUniform(1, 4)}, ("lstm",), r"model.cell.num_heads=4.*sLSTM only"),
    ({"model.cell.num_heads": Uniform(1, 4)}, ("slstm",), r"model.cell.num_heads=1.0.*must be an int"),
    ({"model.cell.coupled": Choice(False, True), "model.cell.input_gate": Choice(True, False)}, ("lstm",),
     r"model.cell.coupled=True, model.cell.input_gate=False together make an invalid cell \(variant 'lstm'\)"),
])
def test_bad_cell_space_is_one_clear_line(space, variants, match):
    with pytest.raises(StudyError, match=match) as e:
        make(space=space, variants=variants)
    assert "\n" not in str(e.value)


def test_planned_study_of_two_variants_builds_the_configs(tmp_path):
    """Planned into the database (2 variants x 3 trials), each trial's config is rebuilt by a worker from its fixed
    parameters, with the sampled rate in model.cell and recorded under its full key."""
    from lstm_lab.sweep import storage as db
    from lstm_lab.sweep.study import prepare_study
    from lstm_lab.sweep.worker import _Configs

    study = make(space={**SPACE, "model.cell.variational_dropout": Choice(0.0, 0.25)})
    prepare_study(study, tmp_path / "st", log=lambda m: None)
    trials = db.open_study(tmp_path / "st").get_trials(deepcopy=False)
    plan = {p["slot"]: p for p in study.plan()}
    assert len(trials) == 6 and {t.user_attrs["variant"] for t in trials} == {"lstm", "gru"}
    configs = _Configs(study)
    for t in trials:
        p = plan[t.user_attrs["slot"]]
        fixed = t.system_attrs["fixed_params"]
        assert fixed == p["params"] and 0.0 <= fixed["model.cell.zoneout_h"] <= 0.3
        cfg = configs._planned(t)
        assert cfg == study.config_for(p["variant"], study.hyper_from_params(p["params"]), p["seed"])
        assert cfg.model.cell == {**resolve_cell(p["variant"]).flags(), "zoneout_h": fixed["model.cell.zoneout_h"],
                                  "variational_dropout": fixed["model.cell.variational_dropout"]}
    # what a `lstm-lab worker` on another machine rebuilds from the stored record: the same study, the same configs
    again = Study.from_record(study.record())
    assert again.fingerprint() == study.fingerprint()
    for p in plan.values():
        assert again.config_for(p["variant"], again.hyper_from_params(p["params"]), p["seed"]) \
            == study.config_for(p["variant"], study.hyper_from_params(p["params"]), p["seed"])
    assert set(study.describe_params()) == {"optim.learning_rate", "model.cell.zoneout_h",
                                            "model.cell.variational_dropout"}


def test_populations_never_mix_cells(tmp_path, monkeypatch):
    """population_key keys on model.cell: members with different rates train in different populations."""
    from lstm_lab import training
    from lstm_lab.sweep.study import prepare_study
    from lstm_lab.sweep.worker import run_worker

    study = make(space={"model.cell.zoneout_h": Choice(0.0, 0.1)}, trials_per_variant=4)
    prepare_study(study, tmp_path / "st", log=lambda m: None)
    done = {"status": "complete", "valid": {"loss": 1.0}, "test": {"loss": 1.0}, "steps": 20, "wall_seconds": 0.1}
    runs = []
    monkeypatch.setattr(training, "train", lambda cfg, wd, **kw: runs.append([cfg]) or dict(done))
    monkeypatch.setattr(training, "train_population",
                        lambda cfgs, wds, **kw: runs.append(list(cfgs)) or [dict(done) for _ in cfgs])
    assert run_worker(study, tmp_path / "st", population=4, progress=False, log=lambda m: None) == {"complete": 8}
    assert sum(len(r) for r in runs) == 8 and max(len(r) for r in runs) > 1  # populations did form
    for group in runs:
        assert len({json.dumps(c.model.cell, sort_keys=True) for c in group}) == 1, [c.model.cell for c in group]
        assert len({training.population_key(c) for c in group}) == 1
    assert {c.model.cell["zoneout_h"] for r in runs for c in r} <= {0.0, 0.1}
    from lstm_lab.sweep.results import load_trials

    df = load_trials(tmp_path / "st")
    assert "model.cell.zoneout_h" in df.columns and set(df["model.cell.zoneout_h"]) <= {0.0, 0.1}
