"""Word-level Penn Treebank, Zaremba et al. 2014 "small" (2x200, no dropout).

Give the PTB-format directory (ptb.train.txt, ptb.valid.txt, ptb.test.txt):
lstm-lab train experiments/word_lm.py --set task.options.path=/data/ptb
"""

overrides = {
    "task.name": "word_lm",
    "task.options": {"path": "ptb", "seq_len": 35},
    "model.cell": "lstm",
    "model.hidden_size": 200,
    "model.num_layers": 2,
    "model.embed_dim": 200,
    "model.forget_bias": 0.0,
    "optim.name": "sgd",
    "optim.momentum": 0.0,
    "optim.learning_rate": 1.0,
    "optim.clip_norm": 5.0,
    "optim.schedule": "plateau",      # Zaremba: divide by 2 when validation stops improving
    "optim.decay_factor": 0.5,
    "train.batch_size": 20,
    "train.steps": 30000,
    "train.eval_every": 1000,
}
