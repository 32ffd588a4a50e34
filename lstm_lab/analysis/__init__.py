"""The analysis of a study (``lstm-lab report``, notebook 03): what the sweep's results say.

The modules, in the order of the data: :mod:`~.data` (a study's trials as one typed table, read through
:mod:`lstm_lab.sweep.results`), :mod:`~.stats` (top 10%, Welch's t-test against the baseline, fANOVA
importance: arrays and tables in, tables out), :mod:`~.plots` (data in, a matplotlib Figure out),
:mod:`~.render` (Markdown and HTML), :mod:`~.odyssey` (the study beside the Odyssey paper's findings) and
:mod:`~.report` (the report: :func:`~.report.report`)::

    from lstm_lab.analysis import data, plots, stats
    st = data.load("studies/quick")
    stats.fanova_importance(st.done, st.params, direction=st.direction, variants=st.variants)
    plots.distributions(st)

The analysis imports the sweep (never the other way). pandas, scipy, optuna and matplotlib are imported by the
functions that need them (matplotlib by :mod:`~.plots` only).
"""

__all__ = ["data", "stats", "plots", "render", "odyssey", "report"]
