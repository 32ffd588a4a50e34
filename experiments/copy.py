"""Copy-memory task (Arjovsky et al. 2016) with delay T = 20.

lstm-lab train experiments/copy.py                       # T = 20
lstm-lab train experiments/copy.py --set task.options.T=50 --set model.chrono_init=70.0
"""

overrides = {
    "task.name": "copy",
    "task.options": {"T": 20},
    "model.cell": "lstm",
    "model.hidden_size": 128,
    "model.chrono_init": 40.0,       # Tallec & Ollivier: T_max = the sequence length T + 20; learns ~2x faster
    "optim.name": "adam",
    "optim.learning_rate": 5e-3,     # with chrono init: the README's Results (scripts/readme_results.py) has the curve
    "optim.clip_norm": 1.0,
    "train.batch_size": 64,
    "train.steps": 4000,
    "train.eval_every": 250,
    "train.eval_batch_size": 250,     # the 1000 fixed eval examples in 4 batches
}
