"""JSB Chorales (../shared/data/jsb-chorales-quarter.json, Boulanger-Lewandowski et al. 2012 split): next-frame
prediction with 88 Bernoulli outputs, NLL per predicted step (nats). The sizes of Chung et al. (2014), about 20k
recurrent parameters each (the 36 x 88 + 88 output layer comes on top):

    lstm-lab train experiments/jsb.py                                                      # LSTM-36
    lstm-lab train experiments/jsb.py --set model.cell=gru --set model.hidden_size=46      # GRU-46
    lstm-lab train experiments/jsb.py --set model.cell=rnn --set model.hidden_size=100     # tanh RNN-100

Adam with early stopping on the validation NLL, evaluated every epoch (29 batches of 8 chorales).
"""

import pathlib

overrides = {
    "task.name": "music",
    "task.options": {"path": str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" /
                                 "jsb-chorales-quarter.json")},
    "model.cell": "lstm",
    "model.hidden_size": 36,
    "optim.name": "adam",
    "optim.learning_rate": 3e-3,
    "optim.clip_norm": 1.0,
    "train.batch_size": 8,
    "train.eval_batch_size": 32,
    "train.steps": 8700,              # 300 epochs at most; early stopping ends it sooner
    "train.eval_every_epochs": 1.0,
    "train.log_every": 29,
    "train.early_stop_patience": 15,
}
