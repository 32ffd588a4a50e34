"""Run configuration: typed frozen dataclasses, every default in one place.

Why frozen dataclasses and not ml_collections: they are typed (a wrong type
is caught when an override is applied, naming the field), need no extra
dependency (the GPU machines lack ml_collections), are hashable and
comparable (a workdir's stored config is compared with a new one), and
``dataclasses.asdict`` gives the JSON saved with every run.

An experiment file in ``experiments/`` holds only overrides, as dotted keys::

    # experiments/copy.py
    overrides = {
        "task.name": "copy",
        "task.options": {"T": 20},
        "model.hidden_size": 128,      # why: ...
    }

``lstm-lab train experiments/copy.py --set optim.learning_rate=3e-3`` applies
the command-line overrides after the file's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import typing
from typing import Any, Literal

from lstm_lab._hints import did_you_mean
from lstm_lab.recurrent import IMPLS

__all__ = ["Config", "TaskConfig", "ModelConfig", "OptimConfig", "TrainConfig", "apply_overrides", "load_config",
           "parse_value", "flat_keys", "to_dict", "to_overrides", "from_dict", "cell_from_config", "OPTIMIZERS",
           "SCHEDULES", "DTYPES"]

OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")
SCHEDULES = ("constant", "cosine", "plateau")
DTYPES = ("float32", "bfloat16", "float64")


def cell_from_config(cell):
    """A :class:`~lstm_lab.CellSpec` from ``model.cell``: a preset name or a dict of CellSpec fields."""
    from lstm_lab.cells import CellSpec, resolve_cell

    if isinstance(cell, dict):
        return CellSpec(**cell)
    return resolve_cell(cell)


class _Section:
    """Every config section: on construction each field is coerced to its type (a ``Literal`` names its
    choices) and checked against the section's rules (``_check``), so an invalid config cannot exist.
    Errors name the dotted key, the value and the rule."""

    _name = ""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(f"{self._name}.{f.name}", getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
        self._check()

    def _check(self) -> None:
        pass

    def _require(self, field: str, ok: bool, rule: str) -> None:
        if not ok:
            raise ValueError(f"config: {self._name}.{field} must be {rule}; got {getattr(self, field)!r}.")

    def _finite(self, field: str, low: float | None = None, *, strict: bool = False, high: float | None = None,
                rule: str) -> None:
        v = getattr(self, field)
        ok = math.isfinite(v) and (low is None or (v > low if strict else v >= low)) and (high is None or v < high)
        self._require(field, ok, rule)


@dataclasses.dataclass(frozen=True)
class TaskConfig(_Section):
    _name = "task"
    name: str = "copy"  # a registered task: copy, adding, char_lm, word_lm (lstm_lab.tasks.names())
    options: dict = dataclasses.field(default_factory=dict)  # the task's own options, e.g. {"T": 20}

    def _check(self):
        self._require("name", bool(self.name), "a task name (lstm-lab data --help lists them)")


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Section):
    _name = "model"
    cell: Any = "lstm"  # a preset name or a dict of CellSpec fields
    hidden_size: int = 128  # units per layer and direction
    num_layers: int = 1  # stacked recurrent layers
    bidirectional: bool = False  # not for language models (they would see the future)
    embed_dim: int = 0  # token embedding size; 0 = hidden_size
    dropout: float = 0.0  # on the embedding and between recurrent layers (training only)
    output_dropout: float = 0.0  # on the last recurrent layer's output (training only)
    input_noise: float = 0.0  # std of Gaussian noise added to the encoded inputs (Odyssey; training only)
    weight_noise: float = 0.0  # std of Gaussian noise on the weight matrices at each training step (Graves 2011)
    tie_weights: bool = False  # LMs: the output layer reuses the embedding (needs embed_dim == hidden_size)
    forget_bias: float = 1.0  # added to the retention gate's bias at init
    chrono_init: float = 0.0  # T_max for chrono initialisation (> 2); 0 = off
    unroll: int = 1  # lax.scan unroll factor
    dtype: Literal[DTYPES] = "float32"  # compute dtype
    impl: Literal[IMPLS] = "auto"  # the recurrence: auto (the fastest measured), scan, scan_vjp, pallas, native

    def _check(self):
        from lstm_lab.recurrent import chrono_unsupported, impl_unsupported

        try:
            spec = cell_from_config(self.cell)
        except (TypeError, ValueError, KeyError) as e:
            msg = e.args[0] if e.args else e
            raise ValueError(f"config: model.cell={self.cell!r}: {msg}") from None
        for name in ("hidden_size", "num_layers", "unroll"):
            self._require(name, getattr(self, name) >= 1, "an integer >= 1")
        self._require("embed_dim", self.embed_dim >= 0, "an integer >= 0 (0 = hidden_size)")
        for name in ("dropout", "output_dropout"):
            self._finite(name, 0.0, high=1.0, rule="in [0, 1)")
        self._finite("input_noise", 0.0, rule="a finite number >= 0")
        self._finite("weight_noise", 0.0, rule="a finite number >= 0")
        self._finite("forget_bias", rule="a finite number")
        self._finite("chrono_init", 0.0, rule="0 (off) or T_max > 2")
        out = self.hidden_size * (2 if self.bidirectional else 1)
        if self.tie_weights and (self.embed_dim or self.hidden_size) != out:
            raise ValueError(f"config: model.tie_weights needs embed_dim == the RNN output size: "
                             f"embed_dim={self.embed_dim or self.hidden_size}, output {out}. "
                             f"Set model.embed_dim={out} (or 0{' and no bidirectional' if self.bidirectional else ''}).")
        why = chrono_unsupported(spec, self.chrono_init or None)
        if why:
            raise ValueError(f"config: model.chrono_init={self.chrono_init!r}: {why}")
        import jax.numpy as jnp

        why = impl_unsupported(self.impl, spec, self.hidden_size, dtype=jnp.dtype(self.dtype))
        if why:
            raise ValueError(f"config: model.impl={self.impl!r}: {why}")


@dataclasses.dataclass(frozen=True)
class OptimConfig(_Section):
    _name = "optim"
    name: Literal[OPTIMIZERS] = "adam"  # sgd (Nesterov momentum, the Odyssey setting), adam, adamw, rmsprop
    learning_rate: float = 1e-3  # peak learning rate
    momentum: float = 0.9  # sgd and rmsprop momentum
    nesterov: bool = True  # sgd: Nesterov momentum
    b1: float = 0.9  # adam/adamw
    b2: float = 0.999  # adam/adamw
    weight_decay: float = 0.0  # adamw decoupled weight decay
    clip_norm: float = 1.0  # global-norm gradient clipping; 0 = off
    schedule: Literal[SCHEDULES] = "constant"  # constant, cosine (to 0 at train.steps), plateau (Zaremba: decay when valid stalls)
    warmup_steps: int = 0  # linear warm-up (constant and cosine)
    decay_factor: float = 0.5  # plateau: multiply the learning rate by this ...
    decay_patience: int = 1  # ... after this many evaluations without improvement

    def _check(self):
        self._finite("learning_rate", 0.0, strict=True, rule="a finite number > 0")
        for name in ("momentum", "b1", "b2"):
            self._finite(name, 0.0, high=1.0, rule="in [0, 1)")
        self._finite("weight_decay", 0.0, rule="a finite number >= 0")
        self._finite("clip_norm", 0.0, rule="a finite number > 0, or 0 (off)")
        self._require("warmup_steps", self.warmup_steps >= 0, "an integer >= 0")
        self._require("decay_factor", math.isfinite(self.decay_factor) and 0.0 < self.decay_factor <= 1.0,
                      "in (0, 1]")
        self._require("decay_patience", self.decay_patience >= 1, "an integer >= 1")


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Section):
    _name = "train"
    seed: int = 0  # parameters, data order and dropout all derive from it
    steps: int = 2000  # training steps (batches)
    batch_size: int = 32
    eval_every: int = 200  # steps between validation evaluations (and checkpoints)
    eval_every_epochs: float = 0.0  # > 0: evaluate every this many epochs instead (tasks of a finite set)
    eval_batch_size: int = 0  # 0 = batch_size
    log_every: int = 50  # steps between metric records
    early_stop_patience: int = 0  # stop after this many evaluations without improvement; 0 = never
    keep_checkpoints: int = 2  # most recent checkpoints kept (plus the best)
    max_minutes: float = 0.0  # stop (and keep the best) after this much wall time; 0 = no limit

    def _check(self):
        self._require("seed", self.seed >= 0, "an integer >= 0")
        for name in ("steps", "batch_size", "eval_every", "log_every", "keep_checkpoints"):
            self._require(name, getattr(self, name) >= 1, "an integer >= 1")
        self._require("eval_batch_size", self.eval_batch_size >= 0, "an integer >= 0 (0 = train.batch_size)")
        self._require("early_stop_patience", self.early_stop_patience >= 0, "an integer >= 0 (0 = never)")
        self._finite("max_minutes", 0.0, rule="a finite number of minutes > 0, or 0 (no limit)")
        self._finite("eval_every_epochs", 0.0, rule="a finite number of epochs > 0, or 0 (use train.eval_every)")


@dataclasses.dataclass(frozen=True)
class Config:
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def flat_keys(cfg: Config | None = None) -> list[str]:
    """Every dotted key a config has, e.g. ``model.hidden_size``."""
    cfg = cfg or Config()
    return [f"{section}.{name}" for section in _fields(Config) for name in _fields(type(getattr(cfg, section)))]


# names people type for a config key, from other tools (the key's last part): suggested when nothing is closer
ALIASES = {"lr": "optim.learning_rate", "learningrate": "optim.learning_rate", "optimizer": "optim.name",
           "hidden": "model.hidden_size", "hidden_dim": "model.hidden_size", "units": "model.hidden_size",
           "layers": "model.num_layers", "cell_type": "model.cell", "variant": "model.cell",
           "batch": "train.batch_size", "iterations": "train.steps", "max_steps": "train.steps",
           "num_steps": "train.steps", "epochs": "train.steps", "grad_clip": "optim.clip_norm",
           "clip": "optim.clip_norm", "wd": "optim.weight_decay", "beta1": "optim.b1", "beta2": "optim.b2",
           "noise": "model.input_noise", "precision": "model.dtype", "task": "task.name"}


def _hint_for_key(key: str, keys: list[str]) -> str:
    """Did-you-mean for an unknown dotted key: a close key of the same section, then the same field name in
    another section (``train.learning_rate`` -> ``optim.learning_rate``), then a known alias (``train.lr``)."""
    section, _, field = key.rpartition(".")
    same = [k for k in keys if k.startswith(section + ".")] if section else []
    hint = did_you_mean(key, same, cutoff=0.75) if same else ""
    if hint:
        return hint
    moved = [k for k in keys if k.rpartition(".")[2] == field]
    if moved:
        return f" Did you mean {' or '.join(repr(k) for k in moved)}?"
    alias = ALIASES.get(field.lower().replace("-", "_"))
    if alias:
        return f" Did you mean {alias!r}?"
    return did_you_mean(key, keys + ["task.options.<name>"])


def parse_value(text: str) -> Any:
    """A command-line value: a Python literal if it parses (``nan``, ``inf`` are floats), else the string."""
    import ast

    if text.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
        return float(text)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def _coerce(key: str, value: Any, hint) -> Any:
    if hint is Any:
        return value
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if isinstance(value, str) and value in choices:
            return value
        raise ValueError(f"config: {key}={value!r} is not one of {', '.join(choices)}."
                         f"{did_you_mean(str(value), choices)}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is dict:
        if isinstance(value, dict):
            return dict(value)
    else:
        return value
    raise TypeError(f"config: {key} must be {hint.__name__}; got {value!r} ({type(value).__name__}).")


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """``cfg`` with dotted-key overrides applied; ``task.options.X`` sets one task option. Every value is
    checked against its field's type and rules as it is applied (ValueError/TypeError naming the key).

    >>> apply_overrides(Config(), {"model.hidden_size": 64}).model.hidden_size
    64
    >>> apply_overrides(Config(), {"model.hiden_size": 64})
    Traceback (most recent call last):
    ...
    KeyError: "config: unknown key 'model.hiden_size'. Did you mean 'model.hidden_size'?"
    >>> apply_overrides(Config(), {"train.steps": 0})
    Traceback (most recent call last):
    ...
    ValueError: config: train.steps must be an integer >= 1; got 0.
    """
    if not isinstance(overrides, dict):
        raise TypeError(f"config: overrides must be a dict of dotted keys; got {type(overrides).__name__}.")
    sections = {name: getattr(cfg, name) for name in _fields(Config)}
    changes: dict[str, dict[str, Any]] = {name: {} for name in sections}
    for key, value in overrides.items():
        parts = str(key).split(".")
        if len(parts) >= 3 and parts[0] == "task" and parts[1] == "options":
            opts = dict(changes["task"].get("options", sections["task"].options))
            opts[".".join(parts[2:])] = value
            changes["task"]["options"] = opts
            continue
        if len(parts) != 2 or parts[0] not in sections or parts[1] not in _fields(type(sections[parts[0]])):
            raise KeyError(f"config: unknown key {key!r}.{_hint_for_key(str(key), flat_keys(cfg))}")
        changes[parts[0]][parts[1]] = value
    # each section is rebuilt once with all its changes: rules that relate two fields (model.tie_weights and
    # model.embed_dim, model.impl and model.cell) see the final values, whatever the order of the overrides.
    # Every section's problem is reported at once, in the order the overrides named them.
    order = {}
    for key in overrides:
        order.setdefault(str(key).split(".")[0], len(order))
    built, errors = {}, []
    for name, section in sorted(sections.items(), key=lambda kv: order.get(kv[0], len(order))):
        try:
            built[name] = dataclasses.replace(section, **changes[name]) if changes[name] else section
        except (TypeError, ValueError) as e:
            errors.append(e)
    if errors:
        text = "; ".join(str(e).removeprefix("config: ") for e in errors)
        raise (type(errors[0]) if all(type(e) is type(errors[0]) for e in errors) else ValueError)(f"config: {text}")
    return Config(**built)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_overrides(cfg: Config) -> dict[str, Any]:
    """Every field as a dotted key (``task.options`` stays one dict): ``apply_overrides(Config(), ...)`` rebuilds ``cfg``."""
    return {f"{section}.{name}": value for section, fields in to_dict(cfg).items() for name, value in fields.items()}


def from_dict(data: dict) -> Config:
    """A config from :func:`to_dict`'s output (unknown keys raise)."""
    flat = {f"{s}.{k}": v for s, sec in data.items() for k, v in (sec.items() if isinstance(sec, dict) else [])}
    for s in data:
        if s not in _fields(Config):
            raise KeyError(f"config: unknown section {s!r}.{did_you_mean(s, _fields(Config))}")
    return apply_overrides(Config(), flat)


def load_config(path: str | pathlib.Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the file's ``overrides`` dict (a ``.py`` experiment file or a ``config.json``), then ``overrides``."""
    cfg = Config()
    if path is not None:
        p = pathlib.Path(path)
        if not p.exists():
            raise FileNotFoundError(f"config file {str(p)!r} does not exist.")
        if p.suffix == ".json":
            cfg = from_dict(json.loads(p.read_text()))
        elif p.suffix == ".py":
            from lstm_lab._pyfile import exec_file

            module = exec_file(p, f"_lstm_lab_experiment_{p.stem}", "experiment file")
            file_overrides = getattr(module, "overrides", None)
            if not isinstance(file_overrides, dict):
                raise ValueError(f"experiment file {str(p)!r} must define a dict named 'overrides' "
                                 f"(dotted keys, e.g. {{'model.hidden_size': 128}}).")
            cfg = apply_overrides(cfg, file_overrides)
        else:
            raise ValueError(f"config file {str(p)!r}: expected a .py experiment file or a .json config.")
    return apply_overrides(cfg, overrides or {})
