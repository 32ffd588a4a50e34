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
import importlib.util
import json
import pathlib
import typing
from typing import Any

from lstm_lab._hints import did_you_mean

__all__ = ["Config", "TaskConfig", "ModelConfig", "OptimConfig", "TrainConfig", "apply_overrides", "load_config",
           "parse_value", "flat_keys", "to_dict", "to_overrides", "from_dict"]


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    name: str = "copy"  # a registered task: copy, adding, char_lm, word_lm (lstm_lab.tasks.names())
    options: dict = dataclasses.field(default_factory=dict)  # the task's own options, e.g. {"T": 20}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    cell: Any = "lstm"  # a preset name or a dict of CellSpec fields
    hidden_size: int = 128  # units per layer and direction
    num_layers: int = 1  # stacked recurrent layers
    bidirectional: bool = False  # not for language models (they would see the future)
    embed_dim: int = 0  # token embedding size; 0 = hidden_size
    dropout: float = 0.0  # on the embedding and between recurrent layers (training only)
    output_dropout: float = 0.0  # on the last recurrent layer's output (training only)
    input_noise: float = 0.0  # std of Gaussian noise added to the encoded inputs (Odyssey; training only)
    tie_weights: bool = False  # LMs: the output layer reuses the embedding (needs embed_dim == hidden_size)
    forget_bias: float = 1.0  # added to the retention gate's bias at init
    chrono_init: float = 0.0  # T_max for chrono initialisation; 0 = off
    unroll: int = 1  # lax.scan unroll factor
    dtype: str = "float32"  # compute dtype: float32 or bfloat16
    impl: str = "auto"  # the recurrence: auto (the fastest measured here), scan, scan_vjp, pallas (fused GPU kernel)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: str = "adam"  # sgd (Nesterov momentum, the Odyssey setting), adam, adamw, rmsprop
    learning_rate: float = 1e-3  # peak learning rate
    momentum: float = 0.9  # sgd and rmsprop momentum
    nesterov: bool = True  # sgd: Nesterov momentum
    b1: float = 0.9  # adam/adamw
    b2: float = 0.999  # adam/adamw
    weight_decay: float = 0.0  # adamw decoupled weight decay
    clip_norm: float = 1.0  # global-norm gradient clipping; 0 = off
    schedule: str = "constant"  # constant, cosine (to 0 at train.steps), plateau (Zaremba: decay when valid stalls)
    warmup_steps: int = 0  # linear warm-up (constant and cosine)
    decay_factor: float = 0.5  # plateau: multiply the learning rate by this ...
    decay_patience: int = 1  # ... after this many evaluations without improvement


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seed: int = 0  # parameters, data order and dropout all derive from it
    steps: int = 2000  # training steps (batches)
    batch_size: int = 32
    eval_every: int = 200  # steps between validation evaluations (and checkpoints)
    eval_batch_size: int = 0  # 0 = batch_size
    log_every: int = 50  # steps between metric records
    early_stop_patience: int = 0  # stop after this many evaluations without improvement; 0 = never
    keep_checkpoints: int = 2  # most recent checkpoints kept (plus the best)
    max_minutes: float = 0.0  # stop (and keep the best) after this much wall time; 0 = no limit


@dataclasses.dataclass(frozen=True)
class Config:
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def flat_keys(cfg: Config | None = None) -> list[str]:
    """Every dotted key a config has, e.g. ``model.hidden_size``."""
    cfg = cfg or Config()
    return [f"{section}.{name}" for section in _fields(Config) for name in _fields(type(getattr(cfg, section)))]


def parse_value(text: str) -> Any:
    """A command-line value: a Python literal if it parses, else the string."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _coerce(key: str, value: Any, hint) -> Any:
    if hint is Any:
        return value
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
    """``cfg`` with dotted-key overrides applied; ``task.options.X`` sets one task option.

    >>> apply_overrides(Config(), {"model.hidden_size": 64}).model.hidden_size
    64
    >>> apply_overrides(Config(), {"model.hiden_size": 64})
    Traceback (most recent call last):
    ...
    KeyError: "config: unknown key 'model.hiden_size'. Did you mean 'model.hidden_size'?"
    """
    sections = {name: getattr(cfg, name) for name in _fields(Config)}
    for key, value in overrides.items():
        parts = key.split(".")
        if len(parts) >= 3 and parts[0] == "task" and parts[1] == "options":
            opts = dict(sections["task"].options)
            opts[".".join(parts[2:])] = value
            sections["task"] = dataclasses.replace(sections["task"], options=opts)
            continue
        if len(parts) != 2 or parts[0] not in sections or parts[1] not in _fields(type(sections[parts[0]])):
            if len(parts) == 2 and parts[0] in sections:  # a known section: suggest among its fields
                same = [f"{parts[0]}.{f}" for f in _fields(type(sections[parts[0]]))]
                hint = did_you_mean(key, same) or did_you_mean(key, flat_keys(cfg))
            else:
                hint = did_you_mean(key, flat_keys(cfg) + ["task.options.<name>"])
            raise KeyError(f"config: unknown key {key!r}.{hint}")
        section = sections[parts[0]]
        value = _coerce(key, value, _hints(type(section))[parts[1]])
        sections[parts[0]] = dataclasses.replace(section, **{parts[1]: value})
    return Config(**sections)


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
            spec = importlib.util.spec_from_file_location(f"_lstm_lab_experiment_{p.stem}", p)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            file_overrides = getattr(module, "overrides", None)
            if not isinstance(file_overrides, dict):
                raise ValueError(f"experiment file {str(p)!r} must define a dict named 'overrides' "
                                 f"(dotted keys, e.g. {{'model.hidden_size': 128}}).")
            cfg = apply_overrides(cfg, file_overrides)
        else:
            raise ValueError(f"config file {str(p)!r}: expected a .py experiment file or a .json config.")
    return apply_overrides(cfg, overrides or {})
