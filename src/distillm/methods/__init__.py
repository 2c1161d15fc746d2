"""Distillation methods, one module each: its options, the data it consumes, the loss it applies and its
ablation variants (see `methods.base`).

`METHODS` maps each `--method` name to its class, in listing order; it is every `Method` subclass with a `name`
found in the modules of this package, so adding a method is adding its module. `build_method(config)` makes the
configured one.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import fields

from .base import CommonOptions, LossInputs, Method


def _discover() -> dict[str, type[Method]]:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    found: list[type[Method]] = []
    stack = list(Method.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if "name" in vars(cls) and cls.__module__.startswith(__name__ + "."):
            found.append(cls)
    found.sort(key=lambda cls: (cls.rank, cls.name))
    registry: dict[str, type[Method]] = {}
    for cls in found:
        if cls.name in registry:
            raise TypeError(f"Two methods are named '{cls.name}': {registry[cls.name].__module__} and {cls.__module__}.")
        registry[cls.name] = cls
    return registry


METHODS: dict[str, type[Method]] = _discover()


def option_fields() -> list:
    """The fields of section `method` after `method` itself: the shared options, then each method's own, in
    listing order. Every name must be unique (they are flat config keys and flags)."""
    out, owner = [], {}
    for who, options in (("common", CommonOptions), *((name, cls.Options) for name, cls in METHODS.items())):
        for f in fields(options):
            if f.name in owner:
                raise TypeError(f"Option '{f.name}' of method {who} is also an option of {owner[f.name]}: give it "
                                "the method's prefix.")
            owner[f.name] = who
            out.append(f)
    return out


def ablations() -> dict[str, dict]:
    """Every method's ablation variants: name -> option overrides."""
    return {name: overrides for cls in METHODS.values() for name, overrides in cls.ablations.items()}


def ablation_rows() -> list[tuple[str, str]]:
    """Every method's ablation table rows: (label, variant)."""
    return [row for cls in METHODS.values() for row in cls.ablation_rows]


def build_method(config) -> Method:
    return METHODS[config.method.method](config)


__all__ = ["METHODS", "LossInputs", "Method", "ablation_rows", "ablations", "build_method", "option_fields"]
