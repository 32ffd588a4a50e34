"""The Odyssey protocol on character-level Tiny Shakespeare: vanilla LSTM and its 8 ablations x 200
random-search trials from the paper's ranges (REFERENCES.md), scored by test nats/char.

lstm-lab sweep experiments/odyssey_char_lm.py --workers 4 --population 8
"""

from lstm_lab.sweep import ODYSSEY_BASE, ODYSSEY_SPACE_POPULATION, ODYSSEY_VARIANTS, Study

study = Study(
    name="odyssey_char_lm",
    base="char_lm.py",                    # ../shared/data/tinyshakespeare.txt, B=32, T=100
    overrides={**ODYSSEY_BASE, "optim.schedule": "constant", "train.steps": 3000, "train.eval_every": 500,
               "train.max_minutes": 0.0, "train.early_stop_patience": 3, "train.keep_checkpoints": 1},
    variants=ODYSSEY_VARIANTS,
    space=ODYSSEY_SPACE_POPULATION,     # hidden sizes on 8 log-spaced levels: populations fill up
    trials_per_variant=200,
    metric="test.loss",
    direction="minimize",
    baseline="vanilla",
    search="random",
    population=8,
)
