"""The demo (``lstm-lab demo``): an LSTM-32 on the adding problem, T = 30, 400 steps of Adam; about 10 s on a
2-core CPU. Predicting 1.0 always scores an MSE of 1/6; the run ends with its validation MSE against that.
``lstm-lab demo --cell gru --steps 800`` changes it; ``lstm-lab train experiments/demo.py`` is the same run."""

overrides = {
    "task.name": "adding",
    "task.options": {"T": 30},
    "model.cell": "lstm",
    "model.hidden_size": 32,
    "optim.name": "adam",
    "optim.learning_rate": 1e-2,
    "optim.clip_norm": 1.0,
    "train.batch_size": 64,
    "train.steps": 400,
    "train.eval_every": 100,
    "train.log_every": 50,
    "train.eval_batch_size": 250,
}
