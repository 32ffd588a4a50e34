"""Does the 1997 cell still hold up? The standard LSTM against LayerNorm-LSTM, zoneout, xLSTM's sLSTM, minLSTM,
the GRU and minGRU on JSB Chorales, with the Odyssey's protocol (Greff et al. 2017): the same random search over
the same ranges for every variant (learning rate log-uniform [1e-6, 1e-2], hidden size log-uniform [20, 200] on 8
levels, momentum 1 - log-uniform [0.01, 1], input noise uniform [0, 1]), SGD with Nesterov momentum, gradient
norm clipped at 1. A CPU-sized budget: at most 30 epochs, early stopping on the validation NLL with a patience of
5 epochs (the paper's own JSB study: experiments/odyssey_jsb.py, 100 epochs). The metric is the test NLL per step.

Zoneout uses the rates Krueger et al. (2016) recommend for LSTMs (c 0.5, h 0.05).

lstm-lab sweep experiments/odyssey_modern.py --population 8      # resumable: run it over several sittings
lstm-lab status studies/odyssey_modern
lstm-lab report studies/odyssey_modern --out docs/odyssey_modern
"""

from lstm_lab.sweep import ODYSSEY_BASE, ODYSSEY_SPACE_POPULATION, Study

study = Study(
    name="odyssey_modern",
    base="jsb.py",                        # the music task on ../shared/data/jsb-chorales-quarter.json, batch 8
    overrides={**ODYSSEY_BASE, "optim.clip_norm": 1.0, "train.steps": 870, "train.eval_every_epochs": 1.0,
               "train.early_stop_patience": 5, "train.keep_checkpoints": 1},
    variants=("lstm", "vanilla", "ln_lstm", {"name": "zoneout", "zoneout_c": 0.5, "zoneout_h": 0.05},
              "slstm", "minlstm", "gru", "mingru"),
    space=ODYSSEY_SPACE_POPULATION,
    trials_per_variant=100,
    metric="test.loss",
    direction="minimize",
    baseline="lstm",
    search="random",
    population=8,
    interleave=True,                      # trial i of every variant first: a study stopped part way is balanced
)
