"""Adding problem (Hochreiter & Schmidhuber 1997; Le et al. 2015), T = 100."""

overrides = {
    "task.name": "adding",
    "task.options": {"T": 100},
    "model.cell": "lstm",
    "model.hidden_size": 128,
    "optim.name": "adam",
    "optim.learning_rate": 1e-3,
    "train.batch_size": 64,
    "train.steps": 3000,
    "train.eval_every": 250,
    "train.eval_batch_size": 250,
}
