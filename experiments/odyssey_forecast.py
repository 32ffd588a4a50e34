"""The Odyssey's question asked of a forecasting problem: the vanilla LSTM and its 8 ablations x 4 random-search
trials on the Mauna Loa CO2 series (experiments/forecast.py: 12 months ahead from 36), trained 4 at a time as
vmapped populations. A few minutes on a 2-core CPU; the metric is the test MAE in ppm (on the same test windows the
baselines score: linear AR 0.343, seasonal naive 1.51, naive 2.54; `lstm-lab data forecast --dataset co2`).

lstm-lab sweep experiments/odyssey_forecast.py          # then open studies/odyssey_forecast/report/report.html
"""

from lstm_lab.sweep import ODYSSEY_VARIANTS, LogUniform, OneMinusLogUniform, Study, Uniform

study = Study(
    name="odyssey_forecast",
    base="forecast.py",
    overrides={"train.steps": 600, "train.keep_checkpoints": 1},
    variants=ODYSSEY_VARIANTS,
    space={
        "optim.learning_rate": LogUniform(1e-3, 3e-2),
        "optim.b1": OneMinusLogUniform(0.01, 0.5),
        "model.input_noise": Uniform(0.0, 0.2),
    },
    trials_per_variant=4,
    population=4,
    metric="test.mae",
    direction="minimize",
    baseline="vanilla",
    search="random",
)
