"""The Odyssey protocol (Greff et al. 2017) on JSB Chorales, one of the paper's own datasets: the vanilla LSTM and
its 8 ablations x 200 random-search trials, SGD with Nesterov momentum, the paper's ranges (learning rate
log-uniform [1e-6, 1e-2], hidden size log-uniform [20, 200] on 8 levels so that populations fill, momentum
1 - log-uniform [0.01, 1], input noise uniform [0, 1]; REFERENCES.md), early stopping on the validation NLL
(evaluated every epoch, patience 10 epochs, at most 100 epochs). The metric is the test NLL per step.

lstm-lab sweep experiments/odyssey_jsb.py --population 8            # resumable: run it over several sittings
lstm-lab status studies/odyssey_jsb
lstm-lab report studies/odyssey_jsb --out docs/odyssey_jsb
"""

from lstm_lab.sweep import ODYSSEY_BASE, ODYSSEY_SPACE_POPULATION, ODYSSEY_VARIANTS, Study

study = Study(
    name="odyssey_jsb",
    base="jsb.py",                        # the music task on ../shared/data/jsb-chorales-quarter.json, batch 8
    overrides={**ODYSSEY_BASE, "optim.clip_norm": 1.0, "train.steps": 2900, "train.eval_every_epochs": 1.0,
               "train.early_stop_patience": 10, "train.keep_checkpoints": 1},
    variants=ODYSSEY_VARIANTS,
    space=ODYSSEY_SPACE_POPULATION,
    trials_per_variant=200,
    metric="test.loss",
    direction="minimize",
    baseline="vanilla",
    search="random",
    population=8,
    interleave=True,                      # trial i of every variant first: a study stopped part way is balanced
)
