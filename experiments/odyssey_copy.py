"""The Odyssey protocol (Greff et al. 2017) on the copy task: vanilla LSTM and its 8 ablations x 200
random-search trials (SGD with Nesterov momentum; hidden size, learning rate, momentum, input noise drawn
from the paper's ranges; REFERENCES.md). 1800 trials: run it on a GPU or many workers.

lstm-lab sweep experiments/odyssey_copy.py --workers 4 --population 16
lstm-lab status studies/odyssey_copy
lstm-lab report studies/odyssey_copy
"""

from lstm_lab.sweep import ODYSSEY_BASE, ODYSSEY_SPACE_POPULATION, ODYSSEY_VARIANTS, Study

study = Study(
    name="odyssey_copy",
    base="copy.py",                       # T = 20, batch 64, evaluation on the fixed 1000 examples
    overrides={**ODYSSEY_BASE, "model.chrono_init": 0.0, "train.steps": 3000, "train.eval_every": 250,
               "train.early_stop_patience": 4, "train.keep_checkpoints": 1},
    variants=ODYSSEY_VARIANTS,
    space=ODYSSEY_SPACE_POPULATION,     # hidden sizes on 8 log-spaced levels: populations fill up
    trials_per_variant=200,
    metric="test.loss",
    direction="minimize",
    baseline="vanilla",
    search="random",
    population=16,
)
