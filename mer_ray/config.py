"""The one config loader: ``load(ConfigClass, path_or_mapping, overrides)``.

Every typed config derives from :class:`StrictModel`, which refuses unknown keys,
so a typo in a YAML key is an error that names the key and the file instead of a
setting silently ignored. Overrides are dotted ``a.b=value`` strings (the value is
parsed as YAML), the same on every command that takes ``--config``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every config: unknown keys are errors; field docstrings are the field descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class ConfigError(ValueError):
    """A config that cannot be read or does not validate; the message names the file and the key."""


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML file (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping, got {type(raw).__name__}")
    return raw


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """``data[a][b] = value`` for ``dotted == "a.b"``, creating sections as needed."""
    keys = dotted.split(".")
    for k in keys[:-1]:
        data = data.setdefault(k, {})
        if not isinstance(data, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    data[keys[-1]] = value


Overrides = Sequence["str | tuple[str, Any]"] | Mapping[str, Any]


def apply_overrides(data: dict, overrides: Overrides | None) -> dict:
    """Apply overrides in order: ``"a.b=1"`` strings (value parsed as YAML, as ``--set`` gives them), or
    ``("a.b", value)`` pairs and mappings (value as given; ``None`` is skipped: an option left unset).
    A string's ``null`` is a value (``--set lantern=null`` turns a member off), never skipped."""
    if not overrides:
        return data
    items = overrides.items() if isinstance(overrides, Mapping) else [(*_split(o), True) if isinstance(o, str) else o for o in overrides]
    for item in items:
        k, v, explicit = item if len(item) == 3 else (*item, False)
        if v is not None or explicit:
            set_dotted(data, k.strip(), v)
    return data


def _split(o: str) -> tuple[str, Any]:
    if "=" not in o:
        raise ConfigError(f"override {o!r} must look like key.sub=value")
    k, v = o.split("=", 1)
    return k, yaml.safe_load(v)


def _describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def load(cls: type[T], source: str | Path | Mapping | BaseModel | None = None,
         overrides: Overrides | None = None) -> T:
    """A validated ``cls`` from a YAML path, a mapping, an instance or ``None`` (defaults), with overrides.

    Args:
        cls: the config class (a :class:`StrictModel`).
        source: a YAML file, a mapping of fields, an instance of ``cls``, or ``None``.
        overrides: dotted overrides, ``["train.epochs=3", ("seed", 1)]`` or ``{"train.epochs": 3}``.

    Raises:
        ConfigError: the file or an override does not validate; the message names the file and each bad key.
    """
    where = "config"
    if source is None:
        data: dict = {}
    elif isinstance(source, BaseModel):
        data = source.model_dump()
        where = f"{cls.__name__} instance"
    elif isinstance(source, Mapping):
        data = _deep_copy(source)
    else:
        data, where = read_yaml(source), str(source)
    try:
        return cls.model_validate(apply_overrides(data, overrides))
    except ValidationError as e:
        raise ConfigError(f"{where}: {_describe(e)}") from None


def _deep_copy(d: Mapping) -> dict:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in d.items()}
