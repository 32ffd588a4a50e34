"""Quick Odyssey-style study: vanilla LSTM and its 8 Odyssey ablations x 6 random-search trials on the adding
problem (T = 50), trained 6 at a time as vmapped populations. About 3 minutes on a 2-core CPU.

lstm-lab sweep experiments/quick.py              # then open studies/quick/report/report.html
lstm-lab status studies/quick
"""

from lstm_lab.sweep import ODYSSEY_VARIANTS, LogUniform, OneMinusLogUniform, Study, Uniform

study = Study(
    name="quick",
    base={
        "task.name": "adding",
        "task.options": {"T": 50},      # long enough that a bad learning rate or a crippled cell shows in 500 steps
        "model.hidden_size": 16,
        "optim.name": "adam",
        "optim.clip_norm": 1.0,
        "train.batch_size": 32,
        "train.steps": 500,
        "train.eval_every": 100,
        "train.log_every": 50,
        "train.eval_batch_size": 250,
        "train.keep_checkpoints": 1,
    },
    variants=ODYSSEY_VARIANTS,
    space={
        "optim.learning_rate": LogUniform(1e-3, 1e-1),     # Odyssey: the hyperparameter that matters most
        "optim.b1": OneMinusLogUniform(0.01, 0.5),          # Adam's momentum, 1 - log-uniform like Odyssey's
        "model.input_noise": Uniform(0.0, 0.2),
    },
    trials_per_variant=6,
    population=6,            # one vmapped program per variant (`--population 1` trains them one by one)
    metric="test.loss",
    direction="minimize",
    baseline="vanilla",
    search="random",
)
