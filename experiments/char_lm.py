"""Character-level Tiny Shakespeare (../shared/data/tinyshakespeare.txt), 90/5/5 contiguous split."""

import pathlib

overrides = {
    "task.name": "char_lm",
    "task.options": {
        "path": str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"),
        "seq_len": 100,
    },
    "model.cell": "lstm",
    "model.hidden_size": 256,
    "model.embed_dim": 64,
    "optim.name": "adam",
    "optim.learning_rate": 3e-3,
    "optim.schedule": "cosine",       # anneals to 0 at train.steps
    "optim.clip_norm": 1.0,
    "train.batch_size": 32,
    "train.steps": 5000,              # ~150 ms a step on 2 CPU cores: about 13 minutes
    "train.eval_every": 500,
    "train.max_minutes": 14.0,        # keep the best within a 15-minute budget on 2 CPU cores
}
