"""Loading a recipe: YAML + `key.sub=value` overrides -> a validated `Config`.

Unknown keys, wrong types and impossible combinations are rejected with a message that
names the offending key (`ConfigError`: one stderr line from the command-line tools).
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import ConfigError
from .schema import Config
from .validate import validate

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def recipe_path(name_or_path: str) -> Path:
    """A recipe file: an existing path, or the name of a shipped recipe (`tiny`)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (RECIPES_DIR / name_or_path, RECIPES_DIR / f"{name_or_path}.yaml"):
        if cand.is_file():
            return cand
    shipped = sorted(q.stem for q in RECIPES_DIR.glob("*.yaml"))
    raise ConfigError(f"recipe {name_or_path!r} is neither a file nor a shipped recipe ({', '.join(shipped)})")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one leaf value to the annotated type, naming `key` on failure."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        (elem,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(elem)}, got {value!r}")
        return [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "3e-5" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        # nan would pass no range check and inf none that means anything: neither is a setting.
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<root>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise ConfigError(
                f"unknown config key '{prefix}{k}'; known keys under {prefix.rstrip('.') or '<root>'}: {sorted(names)}"
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name], key + ".")
        else:
            kwargs[f.name] = _coerce(data[f.name], tp, key)
    return cls(**kwargs)


def _parse_override(arg: str) -> tuple[list[str], Any]:
    if "=" not in arg:
        raise ConfigError(f"override {arg!r} is not of the form key.sub=value")
    key, raw = arg.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {arg!r}: the key {key.strip()!r} has an empty part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _set_nested(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part!r} is a leaf, not a section")
        node = nxt
    node[path[-1]] = value


def load_config(recipe: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Recipe YAML + `key.sub=value` overrides -> validated Config.

    Relative model/data paths in a recipe resolve against the current directory, so a
    recipe is reusable across checkouts; the resolved config is what a run records.
    """
    tree: dict = {}
    if recipe is not None:
        path = recipe_path(str(recipe))
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"recipe {path}: not a UTF-8 text file") from None
        except yaml.YAMLError as e:
            mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
            where = (
                f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
                if mark and problem
                else " ".join(str(e).split())
            )
            raise ConfigError(f"recipe {path}: not valid YAML ({where})") from None
        if tree is None:  # an empty file is a mistake, not "all defaults": those name no weights
            raise ConfigError(
                f"recipe {path}: empty; expected a mapping of config sections ({', '.join(f.name for f in dataclasses.fields(Config))})"
            )
        if not isinstance(tree, dict):
            raise ConfigError(
                f"recipe {path}: top level must be a mapping of config sections, got {type(tree).__name__}"
            )
    for arg in overrides:
        keys, value = _parse_override(arg)
        _set_nested(tree, keys, value)
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
