"""Forecasting the Mauna Loa CO2 series (statsmodels' copy: monthly means 1958-2001, 526 months;
pip install 'lstm_lab[forecast]'): 12 months ahead from the last 36, chronological 70/15/15 split, scaling from the
training period only, metrics in ppm on the test period beside the naive, seasonal-naive and linear-AR baselines.

    lstm-lab data forecast --dataset co2                                  # the series, its splits, the baselines
    lstm-lab train experiments/forecast.py                                # LSTM-32
    lstm-lab train experiments/forecast.py --set model.cell=gru           # or vanilla (the Odyssey's), rnn, ...
    lstm-lab train experiments/forecast.py --set task.options.path=my.csv --set task.options.target=load \\
        --set task.options.dataset=None --set task.options.season=24      # a CSV of your own

Adam with early stopping on the validation loss (evaluated every 5 epochs of 21 batches).
"""

overrides = {
    "task.name": "forecast",
    "task.options": {"dataset": "co2", "context": 36, "horizon": 12},
    "model.cell": "lstm",
    "model.hidden_size": 32,
    "optim.name": "adam",
    "optim.learning_rate": 3e-3,
    "optim.clip_norm": 1.0,
    "train.batch_size": 16,
    "train.steps": 1000,
    "train.eval_every_epochs": 5.0,
    "train.log_every": 100,
    "train.early_stop_patience": 10,
}
