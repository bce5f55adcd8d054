"""Config files and `--key=value` overrides, read into a config/TrainConfig.

A config file (e.g. config/7b.py) is plain Python run in a namespace of its own; it must define
`config = TrainConfig(...)`. Overrides are `--key=value` and `--model.key=value`, each converted
to its field's declared type. An unknown key gets the closest valid ones as a hint. A checkpoint's
saved config is read back with from_dict.
"""

import dataclasses
import difflib
import json
import math
import runpy
import types
import typing
from pathlib import Path

from config import ConfigError, ModelConfig, TrainConfig, field_types


def _parse_value(text: str, annotation, key: str):
    """Convert a CLI string to the field's declared type, or fail with a ConfigError."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if text.lower() in ("none", "null", ""):
            return None
        annotation = next(a for a in args if a is not type(None))
    name = getattr(annotation, "__name__", str(annotation))
    try:
        if annotation is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if annotation is int:
            digits = text.replace("_", "")
            try:
                return int(digits)  # exact, however large
            except ValueError:
                number = float(digits)  # 4e6; only while a double still holds the integer exactly
                if not (math.isfinite(number) and number == int(number) and abs(number) <= 2**53):
                    raise ValueError from None
                return int(number)
        if annotation is float:
            return float(text)
        if typing.get_origin(annotation) is list:
            if text.startswith("["):  # a JSON list, for paths that contain commas
                items = json.loads(text)
                if not (isinstance(items, list) and all(isinstance(item, str) for item in items)):
                    raise ValueError
                return items
            return [item for item in text.split(",") if item]
        return text
    except ValueError:
        raise ConfigError(f"--{key}={text}: expected a value of type {name}") from None


def valid_keys() -> list[str]:
    """Every key an override may name: training keys, then model.<key>."""
    train_keys = [k for k in field_types(TrainConfig) if k != "model"]
    return train_keys + [f"model.{k}" for k in field_types(ModelConfig)]


def parse_overrides(overrides: list[str]) -> dict:
    """`--key=value` strings -> {key: typed value} ("model.dim" for model keys), type-checked."""
    train_types, model_types = field_types(TrainConfig), field_types(ModelConfig)
    values = {}
    for override in overrides:
        if not override.startswith("--") or "=" not in override:
            example = "overrides look like --key=value (e.g. --lr=1e-3)"
            raise ConfigError(f"cannot read {override!r}: {example}")
        key, text = override[2:].split("=", 1)
        key = key.replace("-", "_")
        if key.startswith("model.") and key[6:] in model_types:
            values[key] = _parse_value(text, model_types[key[6:]], key)
        elif key in train_types and key != "model":
            values[key] = _parse_value(text, train_types[key], key)
        else:
            close = difflib.get_close_matches(key, valid_keys(), n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else "see config/__init__.py"
            hint += "" if close else " for the keys"
            raise ConfigError(f"unknown config key {key!r}; {hint}")
    return values


def with_values(config: TrainConfig, values: dict) -> TrainConfig:
    """A new config with {key: value} applied ("model.KEY" for model keys); validated as a whole."""
    model = {k[6:]: v for k, v in values.items() if k.startswith("model.")}
    train = {k: v for k, v in values.items() if not k.startswith("model.")}
    try:
        model = dataclasses.replace(config.model, **model)
    except ValueError as error:  # model.py's checks of the shape: a plain ValueError there
        raise ConfigError(f"model: {error}") from None
    return dataclasses.replace(config, model=model, **train)


def load_config(path: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    """The config file (or the defaults) with the overrides; infra/run.py applies init_from."""
    return with_values(load_file(path), parse_overrides(list(overrides)))


def load_file(path: str | None) -> TrainConfig:
    """The config a config file defines, or the defaults when there is none."""
    if path is None:
        return TrainConfig()
    if not Path(path).is_file():
        raise ConfigError(f"config file {path} not found (see config/ for examples)")
    try:
        config = runpy.run_path(path).get("config")
    except ConfigError:
        raise
    except Exception as error:  # the file is plain Python: its error in one line, with where it is
        raise ConfigError(f"{path}: {type(error).__name__}: {error}") from None
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"{path} must define `config = TrainConfig(...)`")
    return config


def from_dict(saved: dict) -> TrainConfig:
    """The config saved in a checkpoint (dataclasses.asdict form); keys added since then take
    their defaults, keys removed since are dropped."""
    model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
    model = ModelConfig(**{k: v for k, v in saved.get("model", {}).items() if k in model_keys})
    return TrainConfig(model=model, **{k: v for k, v in saved.items() if k in train_keys})


def flat(config: TrainConfig) -> dict:
    """{key: value} over every key an override may name, for comparing configs key by key."""
    values = {k: v for k, v in dataclasses.asdict(config).items() if k != "model"}
    return values | {f"model.{k}": v for k, v in dataclasses.asdict(config.model).items()}
