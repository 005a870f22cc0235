"""Method options: one frozen, keyword-only dataclass per method, parsed the same way for every method.

A method's options class subclasses :class:`MethodOptions`; each field has a default, and a field may name a
parser in its metadata (``field(default=..., metadata={"parse": fn, "help": "..."})``) that turns a raw value
(from JSON or a ``--method-option key=value`` string) into the field's value or raises ValueError. Fields
typed bool, int, float or str are parsed without one. :func:`parse_options` takes a dict, a list of
``key=value`` strings or an options object and raises UsageError for unknown keys (listing the known ones) and
for bad values (naming the fix).
"""
from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from hubquant.errors import UsageError

OptionsT = TypeVar("OptionsT", bound="MethodOptions")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True, kw_only=True)
class MethodOptions:
    """Base of every method's options. `version` changes when an option's meaning changes (not user-settable)."""

    version: int = 1

    def needs_calibration(self) -> bool:
        """Whether these options make a calibration-free method read calibration text (e.g. FP8 smoothing)."""
        return False

    def uses_scaling(self) -> bool:
        """Whether the method moves scale across the architecture's mappings with these options."""
        return True

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "version")


def parse_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if str(v).strip().lower() in _TRUE:
        return True
    if str(v).strip().lower() in _FALSE:
        return False
    raise ValueError("use true or false")


def parse_int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("use a whole number")
    if isinstance(v, float) and not v.is_integer():
        raise ValueError("use a whole number")
    try:
        return int(v) if not isinstance(v, str) else int(v.strip())
    except (TypeError, ValueError):
        raise ValueError("use a whole number") from None


def parse_float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError("use a number")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError("use a number") from None


def parse_str(v: Any) -> str:
    if isinstance(v, (dict, list)):
        raise ValueError("use a plain string")
    return str(v)


def choice(*values: str):
    """A parser accepting one of `values`."""
    def parse(v: Any) -> str:
        if str(v) not in values:
            raise ValueError(f"use one of: {', '.join(values)}")
        return str(v)
    return parse


def at_least(minimum: int):
    """A parser for whole numbers >= `minimum`."""
    def parse(v: Any) -> int:
        n = parse_int(v)
        if n < minimum:
            raise ValueError(f"use a whole number >= {minimum}")
        return n
    return parse


def positive_float(v: Any) -> float:
    x = parse_float(v)
    if not x > 0:
        raise ValueError("use a number > 0")
    return x


_BY_TYPE = {bool: parse_bool, int: parse_int, float: parse_float, str: parse_str}


def _parser(cls: type, f: dataclasses.Field):
    if "parse" in f.metadata:
        return f.metadata["parse"]
    hint = typing.get_type_hints(cls).get(f.name)
    if hint in _BY_TYPE:
        return _BY_TYPE[hint]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and args[0] in _BY_TYPE:  # Optional[x]: None keeps the default meaning
        inner = _BY_TYPE[args[0]]
        return lambda v: None if v is None else inner(v)
    raise TypeError(f"{cls.__name__}.{f.name} needs a 'parse' entry in its field metadata")


def option_strings(items: Iterable[str]) -> dict[str, Any]:
    """``["damp=0.05", "actorder=false"]`` -> {"damp": 0.05, "actorder": False} (values read as JSON when they are)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--method-option {item} is not KEY=VALUE", hint="e.g. --method-option damp=0.05")
        k, v = item.split("=", 1)
        v = v.strip()
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def parse_options(cls: type[OptionsT], raw: OptionsT | Mapping[str, Any] | Iterable[str] | None, *,
                  method: str) -> OptionsT:
    """Options of `cls` from a dict, ``key=value`` strings, None (all defaults) or an options object.

    Raises:
        UsageError: an unknown key (the hint lists the known ones) or a bad value (the hint says what fits).
    """
    if isinstance(raw, cls):
        return raw
    if isinstance(raw, MethodOptions):
        raise UsageError(f"{type(raw).__name__} are not options of --method {method}",
                         hint=f"pass {cls.__name__} or a dict of its keys")
    if raw is None:
        raw = {}
    elif not isinstance(raw, Mapping):
        raw = option_strings(raw)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "version"}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        known = ", ".join(fields) or "none"
        raise UsageError(f"unknown option(s) for --method {method}: {', '.join(unknown)}",
                         hint=f"known options: {known}")
    values = {}
    for key, value in raw.items():
        f = fields[key]
        try:
            values[key] = _parser(cls, f)(value)
        except ValueError as e:
            extra = f" ({f.metadata['help']})" if "help" in f.metadata else ""
            raise UsageError(f"--method-option {key}={value!r} is invalid for --method {method}{extra}",
                             hint=f"{key}: {e}") from None
    return cls(**values)
