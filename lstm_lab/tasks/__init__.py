"""Benchmark tasks: ``copy``, ``adding``, ``char_lm``, ``word_lm``, ``music``, ``forecast``, ``classify``;
``get(name, **options)``;
:class:`SequenceSet`, the base of any dataset of whole sequences of different lengths.

>>> from lstm_lab import tasks
>>> task = tasks.get("copy", T=5)
>>> batch = next(task.batches("train", batch_size=2, seed=0))
>>> batch.inputs.shape, batch.targets.shape, round(task.baseline["loss"], 4)
((2, 25), (2, 25), 0.8318)

A task of your own is one registered class (or a function returning a task)::

    @tasks.register("parity")
    class Parity(tasks.Task):
        name, input_kind, input_size, output_size = "parity", "real", 1, 2
        ...
"""

from lstm_lab.tasks.base import SPLITS, Batch, Task, pad_examples, row_sum, sequence_cross_entropy
from lstm_lab.tasks.registry import get, import_tasks, names, option_names, register
from lstm_lab.tasks import losses
from lstm_lab.tasks.sequences import SequenceSet
from lstm_lab.tasks import synthetic as _synthetic  # noqa: F401  (registers copy, adding)
from lstm_lab.tasks import language as _language  # noqa: F401  (registers char_lm, word_lm)
from lstm_lab.tasks import music as _music  # noqa: F401  (registers music)
from lstm_lab.tasks import forecast as _forecast  # noqa: F401  (registers forecast)
from lstm_lab.tasks import classify as _classify  # noqa: F401  (registers classify)
from lstm_lab.tasks.synthetic import AddingTask, CopyTask
from lstm_lab.tasks.language import CharLMTask, WordLMTask
from lstm_lab.tasks.music import MusicTask
from lstm_lab.tasks.forecast import ForecastTask
from lstm_lab.tasks.classify import ClassifyTask

__all__ = ["SPLITS", "AddingTask", "Batch", "CharLMTask", "ClassifyTask", "CopyTask", "ForecastTask", "MusicTask",
           "SequenceSet", "Task", "WordLMTask", "get", "import_tasks", "losses", "names", "option_names",
           "pad_examples", "register", "row_sum", "sequence_cross_entropy"]
