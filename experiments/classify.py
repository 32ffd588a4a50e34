"""Sequence classification on JapaneseVowels (UEA/UCR archive; sktime's bundled copy: pip install
'lstm_lab[classify]'): 9 speakers, 12 LPC cepstrum coefficients per frame, 7-29 frames; 270 training cases (a
stratified fifth of them held out for validation) and 370 test cases. The label is read from the logits at each
sequence's last frame (task.options.pool=mean: their mean over the frames).

    lstm-lab data classify                                              # classes, lengths, the baselines
    lstm-lab train experiments/classify.py                              # LSTM-32
    lstm-lab train experiments/classify.py --set model.cell=gru         # or vanilla (the Odyssey's), rnn, ...
    lstm-lab train experiments/classify.py --set task.options.dataset=None \\
        --set task.options.path=data/MyProblem_TRAIN.ts                 # any .ts file (its _TEST file beside it)

Adam with early stopping on the validation loss (evaluated every 5 epochs of 14 batches).
"""

overrides = {
    "task.name": "classify",
    "task.options": {"dataset": "JapaneseVowels"},
    "model.cell": "lstm",
    "model.hidden_size": 32,
    "optim.name": "adam",
    "optim.learning_rate": 3e-3,
    "optim.clip_norm": 1.0,
    "train.batch_size": 16,
    "train.eval_batch_size": 64,
    "train.steps": 1400,
    "train.eval_every_epochs": 5.0,
    "train.log_every": 70,
    "train.early_stop_patience": 8,
}
