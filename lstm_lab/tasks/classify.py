"""Sequence classification on the UEA/UCR ``.ts`` format: one label per (variable-length, multivariate) sequence.

``tasks.get("classify", path="data/JapaneseVowels_TRAIN.ts")`` reads the training file and the test file next to it
(``_TRAIN`` -> ``_TEST``, or ``test_path=``); ``tasks.get("classify")`` (``dataset="JapaneseVowels"``) reads the copy
bundled with ``sktime`` (``pip install 'lstm_lab[classify]'``). A stratified, seeded ``valid_fraction`` of the
training file is the valid split; the test file is the test split. Inputs are standardized per dimension with the
train split's mean and std (``standardize=True``).

The model reads the sequence and emits logits at every step; the task pools them into one prediction per sequence:
``pool="last"`` reads the logits at the last valid step, ``pool="mean"`` averages them over the valid steps (the
head is linear, so that is the head applied to the mean hidden state). Metrics: ``loss`` (cross-entropy per
sequence, nats), ``accuracy``, ``error`` (1 - accuracy) and ``macro_f1`` (the mean over classes of
``2 TP / (2 TP + FP + FN)``, leaving out a class that is neither predicted nor present). Baseline: the majority
class of train, and a logistic regression on per-sequence features (each dimension's mean and std over time, and
the length), both scored on test.

The format (https://www.timeseriesclassification.com): ``#`` comment lines, a header of ``@`` lines (``@problemName``,
``@timeStamps false``, ``@missing``, ``@univariate``, ``@dimensions``, ``@equalLength``, ``@seriesLength``,
``@classLabel true c1 c2 ...``) ending with ``@data``, then one case per line: its dimensions separated by ``:``,
the values of one dimension by ``,``, the class label last::

    1.0,2.0,3.0:0.5,0.1,0.2:up
"""

from __future__ import annotations

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from lstm_lab.tasks import losses
from lstm_lab.tasks.registry import register
from lstm_lab.tasks.sequences import SequenceSet

__all__ = ["ClassifyTask", "read_ts", "stratified_split", "DATASETS"]

#: bundled datasets: name -> the training file's path inside the installed ``sktime`` package
DATASETS = {"JapaneseVowels": ("datasets", "data", "JapaneseVowels", "JapaneseVowels_TRAIN.ts")}
_SPLITS = ("train", "valid", "test")


def read_ts(path) -> tuple[list[np.ndarray], list[str], dict]:
    """A ``.ts`` file's cases (``[T_i, D]`` float32 each), their labels, and its header: ``{"problem_name",
    "classes"`` (the ``@classLabel`` list, in order) ``, "dimensions", "equal_length", "series_length"}``
    (``series_length`` None where not given). Anything it cannot read is one ``ValueError`` line."""
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"classify: {str(p)!r} does not exist (a UEA/UCR .ts file).")

    def fail(what):
        raise ValueError(f"classify: {str(p)!r}: {what}")

    head, classes, cases, labels, at_data = {}, None, [], [], False
    for ln, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not at_data:
            if not line.startswith("@"):
                fail(f"line {ln} is neither a header (@...) nor a comment (#), and no @data line came before it.")
            tag, _, value = line[1:].partition(" ")
            tag, value = tag.lower(), value.strip()
            if tag == "data":
                at_data = True
            elif tag == "timestamps" and value.lower() == "true":
                fail("@timeStamps true is not supported (give the values without timestamps).")
            elif tag == "classlabel":
                flag, *classes = value.split()
                if flag.lower() != "true" or not classes:
                    fail(f"@classLabel {value} (line {ln}): classify needs '@classLabel true' and the class labels.")
            else:
                head[tag] = value
            continue
        case = len(cases)
        *dims, label = line.split(":")
        if classes is None:
            fail("no '@classLabel true c1 c2 ...' line before @data: classify needs class labels.")
        if not dims:
            fail(f"case {case} (line {ln}) has no ':' before a class label (values:label).")
        label = label.strip()
        if label not in classes:
            fail(f"unknown label {label!r} in case {case} (line {ln}); @classLabel lists {' '.join(classes)}.")
        series = []
        for d, text in enumerate(dims):
            values = [_number(t.strip()) for t in text.split(",")]
            bad = next((v for v in values if isinstance(v, str)), None)
            if bad is not None:
                fail(f"case {case} (line {ln}), dimension {d}: {bad}.")
            series.append(values)
        if len({len(s) for s in series}) > 1:
            fail(f"case {case} (line {ln}): its dimensions differ in length "
                 f"({', '.join(str(len(s)) for s in series)}).")
        if cases and len(series) != cases[0].shape[1]:
            fail(f"case {case} (line {ln}) has {len(series)} dimensions; case 0 has {cases[0].shape[1]}.")
        cases.append(np.array(series, np.float32).T)
        labels.append(label)
    if not at_data:
        fail("no @data line (a .ts file's header ends with @data).")
    if not cases:
        fail("no cases after @data.")
    D = cases[0].shape[1]
    if "dimensions" in head and head["dimensions"] != str(D):
        fail(f"@dimensions {head['dimensions']} but the cases have {D}.")
    meta = {"problem_name": head.get("problemname", p.stem), "classes": classes, "dimensions": D,
            "equal_length": head.get("equallength", "false").lower() == "true",
            "series_length": int(head["serieslength"]) if head.get("serieslength", "").isdigit() else None}
    return cases, labels, meta


def _number(token: str) -> float | str:
    """``float(token)``, or why the token is not a value ``read_ts`` takes."""
    if token == "?" or token.lower() == "nan":
        return f"a missing value ({token!r}; not supported)"
    try:
        value = float(token)
    except ValueError:
        return f"{token!r} is not a number" if token else "an empty value"
    return value if math.isfinite(value) else f"{token!r} is not finite"


def stratified_split(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, valid)`` indices into ``labels`` (each sorted): ``round(fraction * n_c)`` cases of each class ``c``
    drawn for valid by ``default_rng(seed)``, at most ``n_c - 1`` (every class keeps a training case)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(int(seed))
    valid = []
    for c in sorted(set(labels.tolist())):
        idx = rng.permutation(np.flatnonzero(labels == c))
        valid += idx[:min(round(fraction * len(idx)), len(idx) - 1)].tolist()
    valid = np.array(sorted(valid), np.int64)
    return np.setdiff1d(np.arange(len(labels)), valid), valid


def _features(xs: list[np.ndarray]) -> np.ndarray:
    """Per sequence: each dimension's mean and std over time, and the length."""
    return np.array([np.concatenate([x.mean(0), x.std(0), [len(x)]]) for x in xs], np.float64)


def _softmax_regression(X: np.ndarray, y: np.ndarray, classes: int, steps: int = 2000, lr: float = 0.5):
    """Multinomial logistic regression by full-batch gradient descent (L2 ``0.5 |W|^2``, C=1 as scikit-learn's
    default); deterministic. ``X`` standardized; returns ``predict(X) -> labels``."""
    Xb = np.c_[X, np.ones(len(X))]
    Y = np.eye(classes)[y]
    W = np.zeros((Xb.shape[1], classes))
    for _ in range(steps):
        Z = Xb @ W
        P = np.exp(Z - Z.max(1, keepdims=True))
        P /= P.sum(1, keepdims=True)
        W -= lr * (Xb.T @ (P - Y) + np.r_[W[:-1], np.zeros((1, classes))]) / len(X)
    return lambda X2: np.argmax(np.c_[X2, np.ones(len(X2))] @ W, axis=1)


def _logistic_predict(Xtr, ytr, Xte, classes: int) -> np.ndarray:
    """Test predictions of a logistic regression fitted on train (features standardized with train's statistics):
    scikit-learn's where importable, else :func:`_softmax_regression`."""
    mu, sd = Xtr.mean(0), Xtr.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        return _softmax_regression(Xtr, ytr, classes)(Xte)
    return LogisticRegression(max_iter=2000).fit(Xtr, ytr).predict(Xte)


def _scores(pred: np.ndarray, y: np.ndarray, classes: int) -> dict[str, float]:
    """accuracy, macro-F1 (classes with TP+FP+FN = 0 left out) and balanced accuracy (mean recall over the classes
    present) of predictions."""
    f1, recall = [], []
    for c in range(classes):
        tp, fp, fn = np.sum((pred == c) & (y == c)), np.sum((pred == c) & (y != c)), np.sum((pred != c) & (y == c))
        if tp + fp + fn:
            f1.append(2 * tp / (2 * tp + fp + fn))
        if tp + fn:
            recall.append(tp / (tp + fn))
    return {"accuracy": float(np.mean(pred == y)), "macro_f1": float(np.mean(f1)),
            "balanced_accuracy": float(np.mean(recall))}


def _locate(dataset: str) -> pathlib.Path:
    if dataset not in DATASETS:
        raise ValueError(f"classify: unknown dataset {dataset!r}; bundled: {', '.join(DATASETS)} "
                         f"(or path= a .ts training file).")
    spec = importlib.util.find_spec("sktime")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"classify: dataset={dataset!r} reads the copy bundled with sktime: "
                         f"pip install 'lstm_lab[classify]'")
    return pathlib.Path(list(spec.submodule_search_locations)[0], *DATASETS[dataset])


@register("classify")
class ClassifyTask(SequenceSet):
    """One class per sequence (see the module doc). Options: ``path`` (a ``.ts`` training file) or ``dataset``
    (``"JapaneseVowels"``, the default), ``test_path`` (default: ``path`` with ``_TRAIN`` -> ``_TEST``),
    ``valid_fraction``, ``seed`` (of the train/valid split), ``pool`` (``"last"`` or ``"mean"``), ``standardize``,
    ``buckets``.

    Targets are the class index at every step (``categorical``); :meth:`metric_sums` pools the per-step logits to
    one per row (``pool``) and scores that. Per row: ``loss_sum`` (cross-entropy), ``weight`` (1, or 0 for a filler
    row), ``correct``, and ``tp{c}``, ``fp{c}``, ``fn{c}`` for each class ``c`` (macro-F1)."""

    name = "classify"

    def __init__(self, path: str | None = None, *, dataset: str | None = None, test_path: str | None = None,
                 valid_fraction: float = 0.2, seed: int = 0, pool: str = "last", standardize: bool = True,
                 buckets: int = 6):
        if path is not None and dataset is not None:
            raise ValueError(f"classify: give path or dataset, not both; got path={path!r}, dataset={dataset!r}.")
        if dataset is not None and test_path is not None:
            raise ValueError(f"classify: test_path goes with path (dataset={dataset!r} has its own test file).")
        if pool not in ("last", "mean"):
            raise ValueError(f"classify: pool must be 'last' or 'mean'; got {pool!r}.")
        if not 0 < valid_fraction < 1:
            raise ValueError(f"classify: valid_fraction must be in (0, 1); got {valid_fraction!r}.")
        if path is None:
            dataset = dataset or "JapaneseVowels"
            train_file = _locate(dataset)
        else:
            train_file = pathlib.Path(path).expanduser()
        if test_path is None:
            if "_TRAIN" not in train_file.name:
                raise ValueError(f"classify: {str(train_file)!r} has no _TRAIN in its name to find the test file "
                                 f"by (_TRAIN -> _TEST): pass test_path.")
            head, _, tail = train_file.name.rpartition("_TRAIN")
            test_file = train_file.with_name(f"{head}_TEST{tail}")
        else:
            test_file = pathlib.Path(test_path).expanduser()
        xs, ys, meta = read_ts(train_file)
        test_xs, test_ys, test_meta = read_ts(test_file)
        if test_meta["classes"] != meta["classes"] or test_meta["dimensions"] != meta["dimensions"]:
            raise ValueError(f"classify: {str(test_file)!r} has classes {' '.join(test_meta['classes'])} and "
                             f"{test_meta['dimensions']} dimensions; {str(train_file)!r} has "
                             f"{' '.join(meta['classes'])} and {meta['dimensions']}.")
        self.classes, self.pool, self.meta = list(meta["classes"]), pool, meta
        index = {c: k for k, c in enumerate(self.classes)}
        y, test_y = np.array([index[c] for c in ys]), np.array([index[c] for c in test_ys])
        tr, va = stratified_split(y, valid_fraction, seed)
        if not len(va):
            raise ValueError(f"classify: valid_fraction={valid_fraction} leaves the valid split of "
                             f"{str(train_file)!r} ({len(y)} cases) empty.")
        unseen = sorted(set(test_y.tolist()) - set(y[tr].tolist()))
        if unseen:
            raise ValueError(f"classify: class {self.classes[unseen[0]]!r} is in {str(test_file)!r} but not in the "
                             f"train split of {str(train_file)!r}.")
        split_x = {"train": [xs[i] for i in tr], "valid": [xs[i] for i in va], "test": test_xs}
        self.labels = {"train": y[tr], "valid": y[va], "test": test_y}
        self.mean = self.std = None  # per dimension, from the train split (standardize=True)
        if standardize:
            frames = np.concatenate(split_x["train"])
            self.mean, self.std = frames.mean(0), np.where(frames.std(0) > 0, frames.std(0), 1.0).astype(np.float32)
            split_x = {s: [(x - self.mean) / self.std for x in v] for s, v in split_x.items()}
        splits = {s: [(x, np.full(len(x), c, np.int32)) for x, c in zip(split_x[s], self.labels[s])] for s in _SPLITS}
        super().__init__(splits, loss="categorical", name="classify", input_kind="real",
                         input_size=meta["dimensions"], output_size=len(self.classes), buckets=buckets,
                         options={"path": None if path is None else str(path), "dataset": dataset,
                                  "test_path": test_path, "valid_fraction": valid_fraction, "seed": seed,
                                  "pool": pool, "standardize": bool(standardize), "buckets": buckets})
        self._baseline = None

    # -- scoring ---------------------------------------------------------------------------------------------
    def metric_sums(self, outputs: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        w = batch["weights"]
        n = w.sum(axis=1)
        if self.pool == "last":
            last = jnp.maximum(n - 1, 0).astype(jnp.int32)
            pooled = jnp.take_along_axis(outputs, last[:, None, None], axis=1)[:, 0]
        else:
            pooled = jnp.where(w[..., None] > 0, outputs, 0.0).sum(axis=1) / jnp.maximum(n, 1.0)[:, None]
        real = (n > 0).astype(jnp.float32)
        label = batch["targets"][:, 0]
        sums = {"loss_sum": jnp.where(real > 0, losses.categorical(pooled, label), 0.0), "weight": real}
        pred = jnp.argmax(pooled, axis=-1)
        sums["correct"] = real * (pred == label)
        P = jax.nn.one_hot(pred, self.output_size) * real[:, None]
        Y = jax.nn.one_hot(label, self.output_size) * real[:, None]
        for c in range(self.output_size):
            sums[f"tp{c}"], sums[f"fp{c}"], sums[f"fn{c}"] = P[:, c] * Y[:, c], P[:, c] - P[:, c] * Y[:, c], \
                Y[:, c] - P[:, c] * Y[:, c]
        return sums

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["weight"], 1e-12)
        f1 = [2 * tp / (2 * tp + fp + fn) for tp, fp, fn in
              ((sums[f"tp{c}"], sums[f"fp{c}"], sums[f"fn{c}"]) for c in range(self.output_size)) if tp + fp + fn > 0]
        accuracy = sums["correct"] / n
        return {"loss": sums["loss_sum"] / n, "accuracy": accuracy, "error": 1.0 - accuracy,
                "macro_f1": sum(f1) / max(len(f1), 1)}

    @property
    def baseline(self) -> dict:
        """On test: the majority class of train (``loss``: the cross-entropy of train's class frequencies; on a
        class-balanced set its accuracy is 1/classes, hence ``balanced_accuracy`` too) and a logistic regression on
        per-sequence features (``logreg_*``)."""
        if self._baseline is None:
            C, y, y_test = self.output_size, self.labels["train"], self.labels["test"]
            freq = np.bincount(y, minlength=C) / len(y)
            majority = int(np.argmax(freq))
            pred = _logistic_predict(_features([x for x, _ in self.data["train"]]), y,
                                     _features([x for x, _ in self.data["test"]]), C)
            self._baseline = {"model": f"majority class {self.classes[majority]!r} of train; logistic regression on "
                                       f"each dimension's mean and std and the length",
                              "loss": float(-np.log(freq[y_test]).mean()),
                              **_scores(np.full(len(y_test), majority), y_test, C),
                              **{f"logreg_{k}": v for k, v in _scores(pred, y_test, C).items()}}
        return self._baseline

    # -- description -------------------------------------------------------------------------------------------
    def format_example(self, batch, row: int = 0) -> str:
        if not batch.weights[row].any():
            return "a filler row (weight 0)"
        c = int(batch.targets[row, 0])
        return f"class {self.classes[c]!r} ({c}), {int(batch.weights[row].sum())} steps of {self.input_size} dimensions"

    def describe(self) -> dict:
        counts = {s: dict(zip(self.classes, np.bincount(self.labels[s], minlength=self.output_size).tolist()))
                  for s in _SPLITS}
        return {**super().describe(), "problem": self.meta["problem_name"], "classes": len(self.classes),
                "class_counts": counts, "dimensions": self.input_size, "pool": self.pool}
