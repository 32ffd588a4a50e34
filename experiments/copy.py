"""Copy-memory task (Arjovsky et al. 2016) with delay T = 20.

lstm-lab train experiments/copy.py                       # T = 20
lstm-lab train experiments/copy.py --set task.options.T=50
"""

overrides = {
    "task.name": "copy",
    "task.options": {"T": 20},
    "model.cell": "lstm",
    "model.hidden_size": 128,
    "optim.name": "adam",
    "optim.learning_rate": 2e-3,     # faster than 1e-3 here, still stable with clipping
    "optim.clip_norm": 1.0,
    "train.batch_size": 64,
    "train.steps": 3000,
    "train.eval_every": 250,
    "train.eval_batch_size": 250,     # the 1000 fixed eval examples in 4 batches
}
