"""Parameter dataclasses that check themselves from declarations instead of hand-written `__post_init__` code.

Every method's parameters need the same few checks (a string that must be one of a few choices, a count that must be
at least one, a rate that must be positive), and each plugin used to write them out with its own wording. A
`CheckedParams` subclass declares them as class attributes (not dataclass fields, so they are not parameters):

    @dataclass
    class Params(CheckedParams):
        solver: str = "emd"
        reg: float = 0.01
        choices = {"solver": ("emd", "sinkhorn")}
        above = {"reg": 0.0}

`at_most` gives an inclusive upper bound (a NaN passes no bound). The base is not itself a dataclass, so frozen
parameter dataclasses (a model pool's, `@dataclass(frozen=True)`) can declare their bounds the same way.

Declarations add up along the class hierarchy (a family's base declares its own fields, a plugin adds its), a field
set to None is not checked, and a value out of bounds raises `ValueError` naming the field, the bound and the value
(the config layer turns it into a `ConfigError`). Checks that relate fields stay in the subclass's `__post_init__`,
which must call `super().__post_init__()`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar


class CheckedParams:
    """A base for parameter dataclasses, frozen or not, whose `choices`, `at_least`, `at_most` (inclusive) and
    `above` (exclusive) bounds are checked when an instance is made."""

    choices: ClassVar[Mapping[str, Sequence[Any]]] = {}
    """Field name → the values it may take."""
    at_least: ClassVar[Mapping[str, float]] = {}
    """Field name → its smallest allowed value."""
    above: ClassVar[Mapping[str, float]] = {}
    """Field name → a value it must exceed."""
    at_most: ClassVar[Mapping[str, float]] = {}
    """Field name → its largest allowed value."""

    def __post_init__(self) -> None:
        for name, allowed in _declared(type(self), "choices"):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")
        for name, low in _declared(type(self), "at_least"):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"{name} must be at least {low}, got {value}")
        for name, low in _declared(type(self), "above"):
            value = getattr(self, name)
            if value is not None and not value > low:
                raise ValueError(f"{name} must be greater than {low}, got {value}")
        for name, high in _declared(type(self), "at_most"):
            value = getattr(self, name)
            if value is not None and not value <= high:
                raise ValueError(f"{name} must be at most {high}, got {value}")


def declared_bounds(cls: type) -> dict[str, str]:
    """Field name → its declared bounds as text (`0 < lr <= 10`, `1 <= steps <= 1000000`, `mode: one of a, b`), for
    listings and messages: made from the declarations the checks read, so what is shown is what is enforced."""
    lows = {n: f"{_number(b)} <= " for n, b in _declared(cls, "at_least")}
    lows.update({n: f"{_number(b)} < " for n, b in _declared(cls, "above") if n not in lows})
    highs = {n: f" <= {_number(b)}" for n, b in _declared(cls, "at_most")}
    out = {n: f"{n}: one of {', '.join(map(str, allowed))}" for n, allowed in _declared(cls, "choices")}
    for name in dict.fromkeys([*lows, *highs]):
        out[name] = f"{lows.get(name, '')}{name}{highs.get(name, '')}"
    return out


def _number(bound: float) -> str:
    """A bound as digits for integers (`1000000`), the shortest form for floats (`0`, `1e-08`)."""
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def _declared(cls: type, attribute: str) -> Iterator[tuple[str, Any]]:
    """The (field, bound) pairs `attribute` declares on `cls` and its bases, the most derived declaration winning."""
    seen: dict[str, Any] = {}
    for klass in cls.__mro__:
        for name, bound in klass.__dict__.get(attribute, {}).items():
            seen.setdefault(name, bound)
    for name, bound in seen.items():
        if not hasattr(cls, "__dataclass_fields__") or name not in cls.__dataclass_fields__:
            raise TypeError(f"{cls.__name__}.{attribute} names {name!r}, which is not one of its fields")
        yield name, bound
