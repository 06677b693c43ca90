"""Name -> factory registry with argument checking that names the valid choices."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

Factory = Callable[..., nn.Module]
F = TypeVar("F", bound=Factory)

MODELS: dict[str, Factory] = {}

# Every factory takes these; everything else it accepts is an "override".
_REQUIRED = ("num_classes", "image_size", "in_channels")


def register_model(name: str) -> Callable[[F], F]:
    """Decorator: register ``factory(*, num_classes, image_size, in_channels, **sizes)``."""

    def decorator(factory: F) -> F:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        missing = [p for p in _REQUIRED if p not in inspect.signature(factory).parameters]
        if missing:
            raise TypeError(f"factory for {name!r} must accept {', '.join(missing)}")
        MODELS[name] = factory
        return factory

    return decorator


def model_names() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(MODELS)


def override_names(name: str) -> list[str]:
    """The keyword arguments ``build_model(name, ...)`` accepts besides the required three."""
    params = inspect.signature(_lookup(name)).parameters
    return [p for p in params if p not in _REQUIRED]


def build_model(
    name: str, *, num_classes: int, image_size: int, in_channels: int, **overrides: Any
) -> nn.Module:
    """Build a registered model; ``overrides`` change its default (paper) sizes.

    Raises ValueError for an unknown name or override, listing the valid ones.
    """
    factory = _lookup(name)
    valid = override_names(name)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown argument(s) {', '.join(unknown)} for model {name!r}; "
            f"valid overrides: {', '.join(valid) or '(none)'}"
        )
    return factory(
        num_classes=num_classes, image_size=image_size, in_channels=in_channels, **overrides
    )


def _lookup(name: str) -> Factory:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; valid names: {', '.join(model_names())}"
        ) from None


def check_positive(**values: int) -> None:
    """Raise ValueError naming the first argument that is not a positive int."""
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
