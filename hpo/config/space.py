"""The search space: every hyperparameter either fixed or searched, declared once.

A SPEC, on the command line or in a study file, is one of
    LOW..HIGH        uniform between LOW and HIGH, both inclusive
    LOW..HIGH:log    log-uniform (LOW > 0)
    A,B,C            one of the listed values
    VALUE            fixed
The hyperparameter's type decides how the text is read: an integer parameter (batch_size) gets
an integer range and integer choices, a float parameter a float range even when the bounds are
written as integers (`0..1`), a string parameter (arch) choices only. A study file may also give
a YAML list (choices) or a plain number or string (fixed).

Converting to Optuna's distributions happens here and nowhere else (`to_optuna`, which imports
Optuna when called: both backends and the results' Optuna views use it); to Ray Tune's domains,
in the Ray backend (hpo.search.backends.ray.space).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Union

from imgcls.errors import ConfigError

Scalar = Union[bool, int, float, str]  # noqa: UP007 (a runtime alias used in isinstance checks)


class SpaceError(ConfigError):
    """A malformed or impossible search-space entry."""


@dataclass(frozen=True)
class Fixed:
    name: str
    value: Scalar

    def spec(self) -> str:
        return _fmt(self.value)


@dataclass(frozen=True)
class FloatRange:
    name: str
    low: float
    high: float
    log: bool = False

    def spec(self) -> str:
        return f"{_fmt(self.low)}..{_fmt(self.high)}" + (":log" if self.log else "")


@dataclass(frozen=True)
class IntRange:
    name: str
    low: int
    high: int
    log: bool = False

    def spec(self) -> str:
        return f"{self.low}..{self.high}" + (":log" if self.log else "")


@dataclass(frozen=True)
class Choice:
    name: str
    choices: tuple[Scalar, ...]

    def spec(self) -> str:
        return ",".join(_fmt(c) for c in self.choices)


Param = Fixed | FloatRange | IntRange | Choice


def _fmt(value: Scalar) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back as the same float
    return str(value)


def _convert(name: str, text: str, kind: type) -> Scalar:
    """Read one value as the parameter's type; raise SpaceError naming the parameter."""
    text = text.strip()
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        if kind is int:
            number = float(text)
            if not number.is_integer():
                raise ValueError
            return int(number)
        if kind is float:
            value = float(text)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError
            return value
    except ValueError:
        raise SpaceError(f"{name}: {text!r} is not {_article(kind)}") from None
    if not text:
        raise SpaceError(f"{name}: empty value")
    return text


def _article(kind: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false"}.get(kind, "a value")


def parse_param(name: str, spec: Any, kind: type) -> Param:
    """One hyperparameter's entry, from a SPEC string, a YAML list or a YAML scalar."""
    if isinstance(spec, list | tuple):
        if not spec:
            raise SpaceError(f"{name}: an empty list of choices")
        return _choice(name, [_convert(name, str(v), kind) for v in spec])
    if isinstance(spec, bool | int | float):
        return Fixed(name, _convert(name, _fmt(spec), kind))
    if not isinstance(spec, str):
        raise SpaceError(f"{name}: expected a SPEC string, a list or a value, not {spec!r}")
    text = spec.strip()
    if ".." in text:
        return _range(name, text, kind)
    if "," in text:
        return _choice(name, [_convert(name, part, kind) for part in text.split(",")])
    return Fixed(name, _convert(name, text, kind))


def _range(name: str, text: str, kind: type) -> Param:
    body, _, scale = text.partition(":")
    if scale not in ("", "log"):
        raise SpaceError(f"{name}: unknown scale {scale!r} in {text!r} (only ':log')")
    log = scale == "log"
    low_text, _, high_text = body.partition("..")
    if kind not in (int, float):
        raise SpaceError(f"{name}: {text!r} is a range, but {name} takes one of a list of "
                         "values (A,B,C)")
    low, high = _convert(name, low_text, kind), _convert(name, high_text, kind)
    assert isinstance(low, int | float) and isinstance(high, int | float)
    if low > high:
        raise SpaceError(f"{name}: LOW {_fmt(low)} is above HIGH {_fmt(high)} in {text!r}")
    if log and low <= 0:
        raise SpaceError(f"{name}: a log scale needs LOW > 0, not {_fmt(low)}")
    if low == high:
        return Fixed(name, low)
    if kind is int:
        return IntRange(name, int(low), int(high), log)
    return FloatRange(name, float(low), float(high), log)


def _choice(name: str, values: list[Scalar]) -> Param:
    unique = tuple(dict.fromkeys(values))  # keep the order, drop repeats
    return Fixed(name, unique[0]) if len(unique) == 1 else Choice(name, unique)


@dataclass(frozen=True)
class SearchSpace:
    """An ordered set of parameters, each fixed or searched."""

    params: tuple[Param, ...] = ()

    @classmethod
    def parse(cls, entries: Mapping[str, Any], kinds: Mapping[str, type]) -> SearchSpace:
        params = []
        for name, spec in entries.items():
            if name not in kinds:
                raise SpaceError(f"unknown hyperparameter {name!r} (known: {', '.join(kinds)})")
            params.append(parse_param(name, spec, kinds[name]))
        return cls(tuple(params))

    def __iter__(self) -> Iterator[Param]:
        return iter(self.params)

    def __contains__(self, name: object) -> bool:
        return any(p.name == name for p in self.params)

    def __getitem__(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def searched(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not isinstance(p, Fixed))

    def fixed_values(self) -> dict[str, Scalar]:
        return {p.name: p.value for p in self.params if isinstance(p, Fixed)}

    def describe(self) -> dict[str, str]:
        """Each parameter as its SPEC text: what the study run logs."""
        return {p.name: p.spec() for p in self.params}

    def values(self, name: str) -> list[Scalar]:
        """The values a parameter can take that a validator must accept: bounds or choices."""
        p = self[name]
        if isinstance(p, Fixed):
            return [p.value]
        if isinstance(p, Choice):
            return list(p.choices)
        return [p.low, p.high]

    def check(self, validate: Callable[[str, Scalar], None]) -> None:
        """Call `validate(name, value)` on every bound, choice and fixed value."""
        for p in self.params:
            for value in self.values(p.name):
                validate(p.name, value)

    def contains(self, name: str, value: Scalar) -> bool:
        p = self[name]
        if isinstance(p, Fixed):
            return value == p.value
        if isinstance(p, Choice):
            return value in p.choices
        if isinstance(p, IntRange) and not isinstance(value, int):
            return False
        return isinstance(value, int | float) and p.low <= value <= p.high

    def to_optuna(self) -> dict[str, Any]:
        """The searched parameters as Optuna distributions (bounds inclusive, as here)."""
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        out: dict[str, Any] = {}  # name -> optuna.distributions.BaseDistribution
        for p in self.searched:
            if isinstance(p, FloatRange):
                out[p.name] = FloatDistribution(p.low, p.high, log=p.log)
            elif isinstance(p, IntRange):
                out[p.name] = IntDistribution(p.low, p.high, log=p.log)
            elif isinstance(p, Choice):
                out[p.name] = CategoricalDistribution(p.choices)
        return out
