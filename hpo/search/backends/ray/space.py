"""The search space as Ray Tune domains, and a Tune trial's config back to the declared types.
Bounds are inclusive here (as in hpo.config.space); Ray's integer upper bound is exclusive."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hpo.config.space import Choice, FloatRange, IntRange, Scalar, SearchSpace


def to_ray(space: SearchSpace) -> dict[str, Any]:
    """The searched parameters as Ray Tune domains. Bounds here are inclusive; Ray's integer
    upper bound is exclusive, hence high + 1 (float bounds: a continuous draw never lands on
    exactly HIGH either way)."""
    from ray import tune

    out: dict[str, Any] = {}
    for p in space.searched:
        if isinstance(p, FloatRange):
            out[p.name] = (tune.loguniform if p.log else tune.uniform)(p.low, p.high)
        elif isinstance(p, IntRange):
            out[p.name] = (tune.lograndint if p.log else tune.randint)(p.low, p.high + 1)
        elif isinstance(p, Choice):
            out[p.name] = tune.choice(list(p.choices))
    return out


def from_ray(space: SearchSpace, config: Mapping[str, Any]) -> dict[str, Scalar]:
    """A Tune trial's config back to the declared types, inside the declared bounds (Ray hands
    out numpy scalars; a log-scale draw may round a hair past its bound)."""
    values: dict[str, Scalar] = {}
    for p in space.searched:
        if p.name not in config:
            continue
        value = config[p.name]
        value = value.item() if hasattr(value, "item") else value
        if isinstance(p, IntRange):
            value = min(max(int(value), p.low), p.high)
        elif isinstance(p, FloatRange):
            value = min(max(float(value), p.low), p.high)
        values[p.name] = value
    return values


def nothing_to_search(trial: Any) -> None:
    """OptunaSearch's define-by-run space for a study that searches nothing (all fixed)."""
    return None
