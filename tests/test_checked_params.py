"""Parameter dataclasses that check themselves from declarations (mergebench_core.contract.checked_params)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mergebench_core.contract.checked_params import CheckedParams
from mergebench_core.contract.config import build_params, parse_overrides
from mergebench_core.errors import ConfigError


@dataclass
class Base(CheckedParams):
    n: int = 4
    mode: str = "a"
    at_least = {"n": 1}
    choices = {"mode": ("a", "b")}


@dataclass
class Derived(Base):
    rate: float = 0.1
    limit: int | None = None
    at_least = {"n": 2, "limit": 0}  # tightens the base's bound, adds one of its own
    above = {"rate": 0.0}


def test_declared_bounds_are_checked_with_the_field_and_the_value():
    with pytest.raises(ValueError, match="mode must be one of a, b, got 'c'"):
        Base(mode="c")
    with pytest.raises(ValueError, match="n must be at least 1, got 0"):
        Base(n=0)
    assert Base(n=1).n == 1


def test_declarations_add_up_and_the_most_derived_bound_wins():
    with pytest.raises(ValueError, match="n must be at least 2, got 1"):
        Derived(n=1)
    with pytest.raises(ValueError, match="mode must be one of"):  # inherited
        Derived(mode="z")
    with pytest.raises(ValueError, match="rate must be greater than 0.0, got 0"):
        Derived(rate=0)
    with pytest.raises(ValueError, match="limit must be at least 0, got -1"):
        Derived(limit=-1)
    assert Derived().limit is None  # None is "unset", not checked


def test_a_declaration_naming_no_field_is_a_programming_error():
    @dataclass
    class Typo(CheckedParams):
        n: int = 1
        at_least = {"m": 1}

    with pytest.raises(TypeError, match="Typo.at_least names 'm'"):
        Typo()


def test_declarations_are_not_parameters_and_config_errors_name_the_method():
    assert [f.name for f in __import__("dataclasses").fields(Derived)] == ["n", "mode", "rate", "limit"]
    with pytest.raises(ConfigError, match="method 'toy': rate must be greater than 0.0"):
        build_params("toy", Derived, overrides=parse_overrides(["toy.rate=-1"]))
    assert build_params("toy", Derived, overrides=parse_overrides(["toy.mode=b"]))[0].mode == "b"
