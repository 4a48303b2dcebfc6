from dataclasses import dataclass, field

import pytest

from mergebench_core.contract.config import build_params, check_overrides_used, load_yaml, parse_overrides, split_top_level
from mergebench_core.errors import ConfigError


@dataclass
class P:
    scaling_factor: float = 0.3
    steps: int = 10
    weights: list[float] = field(default_factory=list)


def test_defaults_then_yaml_then_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method:\n  scaling_factor: 0.5\n  unrelated: 1\nties:\n  steps: 20\n")
    yaml = load_yaml(cfg)
    assert build_params("ties", P, yaml) == [P(0.5, 20)]
    assert build_params("ties", P, yaml, parse_overrides(["ties.steps=30"])) == [P(0.5, 30)]
    assert build_params("other", P, yaml) == [P(0.5, 10)]


def test_comma_values_sweep_and_brackets_do_not():
    ov = parse_overrides(["method.scaling_factor=0.1,0.3", "ties.steps=1,2", "ties.weights=[0.2,0.8]"])
    configs = build_params("ties", P, {}, ov)
    assert [(c.scaling_factor, c.steps) for c in configs] == [(0.1, 1), (0.1, 2), (0.3, 1), (0.3, 2)]
    assert all(c.weights == [0.2, 0.8] for c in configs)
    assert split_top_level("[1,2],3") == ["[1,2]", "3"]


def test_bad_value_names_parameter_and_type():
    with pytest.raises(ConfigError, match=r"parameter 'steps' expects int, got 'abc'"):
        build_params("ties", P, {}, parse_overrides(["ties.steps=abc"]))


def test_unknown_parameter_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"no parameter 'scaling_facter'.*Did you mean 'scaling_factor'"):
        build_params("ties", P, {}, parse_overrides(["ties.scaling_facter=1"]))
    with pytest.raises(ConfigError, match="no selected method has a parameter 'nope'"):
        check_overrides_used(parse_overrides(["method.nope=1"]), {"ties": P})
    with pytest.raises(ConfigError, match="not of the form"):
        parse_overrides(["scaling_factor"])


def test_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_yaml(bad)
