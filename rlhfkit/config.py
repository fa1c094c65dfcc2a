"""Typed configs: plain dataclasses loaded from YAML with ``key=value`` overrides.

Every error in a config is found before any model loads and reported at once, in one
line (docs/pitfalls.md#14): unknown keys (with the closest valid name), wrong types, bad values.
Nothing is coerced silently. A stage config may pass the fields of a TRL config class
through under their TRL names (``passthrough``); they land in its ``trl_args`` dict.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Sequence, TypeVar, Union

import yaml

from rlhfkit.errors import ConfigError

T = TypeVar("T")


def field(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING):
    """A dataclass field whose ``help`` is shown by ``--help`` and in docs."""
    kwargs: dict[str, Any] = {"metadata": {"help": help}}
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    elif default is not dataclasses.MISSING:
        kwargs["default"] = default
    return dataclasses.field(**kwargs)


class Passthrough:
    """Mixin: unknown keys that are fields of ``passthrough_class()`` (the class ``passthrough_name``
    names, e.g. ``trl.SFTConfig``, imported when first needed) go to ``trl_args``."""

    passthrough_name: ClassVar[str] = ""

    @classmethod
    def passthrough_class(cls) -> type | None:
        if not cls.passthrough_name:
            return None
        import importlib

        module, _, name = cls.passthrough_name.rpartition(".")
        return getattr(importlib.import_module(module), name)


class DuplicateKey(ConfigError):
    """A mapping names a key twice (PyYAML would keep the last silently)."""

    def __init__(self, key: str, line: int, first: int):
        super().__init__(f"key '{key}' given twice")
        self.key, self.line, self.first = key, line, first


class _Loader(yaml.SafeLoader):
    """YAML with the YAML 1.2 scalars users expect: only true/false are booleans (``no``,
    ``off``, ``yes``, ``on`` stay text, e.g. ``eval_strategy: no``) and ``1e-3`` is a number;
    a key given twice in one mapping is refused, as YAML itself requires."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[tuple[str, str], yaml.Node] = {}
        for key_node, _ in node.value:  # before a merge (<<) adds its keys, which the mapping's own replace
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                first = seen.setdefault((key_node.tag, key_node.value), key_node)
                if first is not key_node:
                    raise DuplicateKey(key_node.value, key_node.start_mark.line + 1, first.start_mark.line + 1)
        return super().construct_mapping(node, deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_value(text: str) -> Any:
    """A KEY=VALUE override's value: YAML (numbers, booleans, null, lists), else the text itself."""
    try:
        return yaml_load(text)
    except DuplicateKey as e:
        raise ConfigError(f"{text}: {e}; give it once") from None
    except yaml.YAMLError:
        return text


def _closest(name: str, options: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(tp, "__name__", str(tp))


def _check_value(value: Any, tp: Any, where: str, errors: list[str]) -> Any:
    """Return ``value`` converted only where lossless (int -> float, '3e-3' -> float)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        sub: list[str] = []
        for a in inner:
            trial: list[str] = []
            out = _check_value(value, a, where, trial)
            if not trial:
                return out
            sub.extend(trial)
        errors.append(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is Literal:
        if value not in args:
            errors.append(f"{where}: must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return value
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str) and origin is not None and args and args[0] is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            errors.append(f"{where}: expected a list, got {value!r}")
            return value
        if args:
            return [_check_value(v, args[0], f"{where}[{i}]", errors) for i, v in enumerate(value)]
        return list(value)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
            return value
        return _build(tp, value, where, errors)
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            errors.append(f"{where}: expected a number, got {value!r}")
            return value
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                errors.append(f"{where}: expected a number, got {value!r}")
                return value
        if not isinstance(value, float):
            errors.append(f"{where}: expected a number, got {value!r}")
        elif not math.isfinite(value):  # nan/inf would train silently into garbage
            errors.append(f"{where}: must be a finite number, got {value}")
        return value
    if tp is str:
        if isinstance(value, (os.PathLike,)):
            return os.fspath(value)
        if not isinstance(value, str):
            errors.append(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _passthrough_fields(cls: type) -> dict[str, Any]:
    pcls = cls.passthrough_class() if issubclass(cls, Passthrough) else None
    if pcls is None:
        return {}
    hints = typing.get_type_hints(pcls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(pcls) if f.init}


def _build(cls: type[T], data: Mapping[str, Any], where: str, errors: list[str]) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    passthrough = _passthrough_fields(cls)
    known = len(errors)  # problems found before this object (e.g. in an earlier section)
    kwargs: dict[str, Any] = {}
    trl_args: dict[str, Any] = dict(data.get("trl_args") or {}) if "trl_args" in fields else {}
    prefix = f"{where}." if where else ""
    for key, value in data.items():
        if key == "trl_args" and "trl_args" in fields:
            continue
        if key in fields:
            kwargs[key] = _check_value(value, hints[key], f"{prefix}{key}", errors)
        elif key in passthrough:
            trl_args[key] = _check_value(value, passthrough[key], f"{prefix}{key}", errors)
        else:
            options = [k for k in fields if k != "trl_args"] + list(passthrough)
            errors.append(f"unknown key '{prefix}{key}'{_closest(key, options)}")
    if "trl_args" in fields:
        kwargs["trl_args"] = trl_args
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    for n in missing:
        errors.append(f"missing required key '{prefix}{n}'")
    if missing or len(errors) > known:
        try:
            return cls(**{**{n: None for n in missing}, **kwargs})
        except Exception:  # noqa: BLE001 - errors already recorded
            return None  # type: ignore[return-value]
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        for problem in validate() or []:
            errors.append(f"{prefix}{problem}")
    return obj


def choice_problems(obj: Any) -> list[str]:
    """A dataclass's fields typed ``Literal[...]`` (or a union with one) whose value is not one of the choices.

    The check ``load_config`` makes as it reads a file (``_check_value``), for a config built in
    Python, so a misspelt choice fails in ``validate`` (before any model loads), not mid-run.
    """
    problems: list[str] = []
    for name, tp in typing.get_type_hints(type(obj)).items():
        choices = typing.get_origin(tp) is Literal or any(typing.get_origin(a) is Literal for a in typing.get_args(tp))
        if choices and hasattr(obj, name):
            _check_value(getattr(obj, name), tp, name, problems)
    return problems


def collect_errors(cls: type, data: Mapping[str, Any], where: str = "") -> list[str]:
    """Every problem building ``cls`` from ``data`` would raise, prefixed with ``where.``."""
    errors: list[str] = []
    _build(cls, data, where, errors)
    return errors


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {} if child is None else child
            node[p] = child
        node = child
    node[parts[-1]] = value


def keys_overlap(a: str, b: str) -> bool:
    """Whether setting dotted keys ``a`` and ``b`` touches the same value (equal, or one a section of the other)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """``['ppo.kl_coef=0.1', 'seed=3']`` -> ``[('ppo.kl_coef', 0.1), ('seed', 3)]``.

    A key given twice is refused: the last would win without a word."""
    out, texts = [], {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not KEY=VALUE (for example learning_rate=1e-4)")
        key, text = item.split("=", 1)
        key, shown = key.strip(), text.strip()
        for prev, prev_text in texts.items():
            if prev == key:
                raise ConfigError(f"{key} given twice on the command line ({prev_text}, {shown}); give it once")
            if keys_overlap(prev, key):
                raise ConfigError(f"{prev} and {key} both given on the command line ({prev}={prev_text}, {key}={shown}); "
                                  "one would replace the other: give each key once")
        texts[key] = shown
        out.append((key, parse_value(text)))
    return out


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml_load(path.read_text(encoding="utf-8"))
    except DuplicateKey as e:
        raise ConfigError(f"{path} line {e.line}: {e} (first on line {e.first}); give it once") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (byte {e.start} is not UTF-8); give a YAML config") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    _check_keys(path, data)
    return data


def _check_keys(path: Path, data: dict, prefix: str = "") -> None:
    """Every key of the config and of its sections must be text (YAML also allows numbers, lists, null)."""
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{path}: key {prefix}{key!r} is not a name; config keys are text (quote it if you must)")
        if isinstance(value, dict):
            _check_keys(path, value, f"{prefix}{key}.")


def load_config(
    cls: type[T],
    source: str | os.PathLike | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    **kwargs: Any,
) -> T:
    """Build ``cls`` from a YAML file or mapping, then ``KEY=VALUE`` overrides, then kwargs.

    Raises ConfigError listing every problem found, in one line.
    """
    label = ""
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        data = read_yaml(source)
        label = f"{source}: "
    data = copy.deepcopy(data)
    for key, value in parse_overrides(overrides):
        set_dotted(data, key, value)
    for key, value in kwargs.items():
        set_dotted(data, key, value)
    errors: list[str] = []
    obj = _build(cls, data, "", errors)
    if errors:
        raise ConfigError(label + "; ".join(errors))
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def section_of(name: str, cls: type, drop: Sequence[str], extra: Sequence[tuple[str, Any, Any]] = (),
               namespace: Mapping[str, Any] | None = None) -> type:
    """A dataclass with the fields of the stage config ``cls`` (types, defaults, help) minus ``drop``.

    The chain's sections are built this way so that each field is declared, with its one
    default, in its stage's config only; ``extra`` adds ``(name, type, dataclasses.field(...))``
    fields in front (the chain's own, e.g. a source that may be null), and ``namespace`` the
    section's methods (its ``validate``).
    """
    hints = typing.get_type_hints(cls)
    fields: list[tuple[str, Any, Any]] = list(extra)
    for f in dataclasses.fields(cls):
        if f.name in drop or not f.init:
            continue
        spec: dict[str, Any] = {"metadata": f.metadata}
        if f.default is not dataclasses.MISSING:
            spec["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            spec["default_factory"] = f.default_factory
        fields.append((f.name, hints[f.name], dataclasses.field(**spec)))
    return dataclasses.make_dataclass(name, fields, namespace={"__module__": cls.__module__, **(namespace or {})})


def describe(cls: type, indent: str = "  ") -> str:
    """Field list with types, defaults and help, for ``--help`` and the docs."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name == "trl_args":
            continue
        if f.default is not dataclasses.MISSING:
            default = f" = {f.default!r}"
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = ""
        else:
            default = " (required)"
        help_text = f.metadata.get("help", "")
        lines.append(f"{indent}{f.name} ({_type_name(hints[f.name])}{default}): {help_text}")
    if issubclass(cls, Passthrough) and cls.passthrough_name:
        lines.append(f"{indent}... and any field of {cls.passthrough_name}, under its TRL name")
    return "\n".join(lines)

