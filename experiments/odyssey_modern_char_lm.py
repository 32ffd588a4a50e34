"""The variants of experiments/odyssey_modern.py on character-level Tiny Shakespeare, at a CPU-sized budget:
the standard LSTM, vanilla, LayerNorm-LSTM, zoneout (c 0.5, h 0.05), sLSTM, minLSTM, GRU and minGRU, the same
random search over the Odyssey's ranges for every variant, SGD with Nesterov momentum, 1,000 steps of B=32, T=100
(evaluated every 250, patience 3). Scored by test nats/char.

lstm-lab sweep experiments/odyssey_modern_char_lm.py --population 8
lstm-lab report studies/odyssey_modern_char_lm --out docs/odyssey_modern_char_lm
"""

from lstm_lab.sweep import ODYSSEY_BASE, ODYSSEY_SPACE_POPULATION, Study

study = Study(
    name="odyssey_modern_char_lm",
    base="char_lm.py",                    # ../shared/data/tinyshakespeare.txt, B=32, T=100
    overrides={**ODYSSEY_BASE, "optim.schedule": "constant", "optim.clip_norm": 1.0, "train.steps": 1000,
               "train.eval_every": 250, "train.max_minutes": 0.0, "train.early_stop_patience": 3,
               "train.keep_checkpoints": 1},
    variants=("lstm", "vanilla", "ln_lstm", {"name": "zoneout", "zoneout_c": 0.5, "zoneout_h": 0.05},
              "slstm", "minlstm", "gru", "mingru"),
    space=ODYSSEY_SPACE_POPULATION,
    trials_per_variant=50,
    metric="test.loss",
    direction="minimize",
    baseline="lstm",
    search="random",
    population=8,
    interleave=True,
)
