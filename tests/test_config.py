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


def test_interpolations_in_a_config_file_are_refused_with_their_key(tmp_path):
    """Nested interpolations double at each level (here 2**6 = 64 copies; 30 levels in 1.5 KB reach gigabytes):
    the file is refused, not resolved."""
    levels = ["a0: x"] + [f"a{i}: ${{a{i - 1}}}${{a{i - 1}}}" for i in range(1, 7)]
    cfg = tmp_path / "laughs.yaml"
    cfg.write_text("\n".join(levels) + "\nties:\n  steps: 3\n  weights: ['${a6}']\n")
    with pytest.raises(ConfigError, match=r"laughs.yaml', key 'a1': '\$\{a0\}\$\{a0\}' is an interpolation"):
        load_yaml(cfg)
    cfg.write_text("ties:\n  steps: 3\n  weights: [1, '${ties.steps}']\n")
    with pytest.raises(ConfigError, match=r"key 'ties.weights\[1\]'.*write the value itself"):
        load_yaml(cfg)


def test_yaml_aliases_and_huge_files_are_refused(tmp_path):
    cfg = tmp_path / "alias.yaml"
    cfg.write_text("base: &b {steps: 3}\nties: *b\n")
    with pytest.raises(ConfigError, match=r"alias.yaml', line 2: the YAML alias \*b is refused"):
        load_yaml(cfg)
    big = tmp_path / "big.yaml"
    big.write_text("method:\n  scaling_factor: 0.5\n" + "# padding\n" * 200_000)
    with pytest.raises(ConfigError, match="more than the 1,048,576 a config file may hold"):
        load_yaml(big)


def test_the_environment_is_read_only_for_the_variables_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "0.7")
    monkeypatch.delenv("MERGEBENCH_CONFIG_ENV", raising=False)
    cfg = tmp_path / "env.yaml"
    cfg.write_text("ties:\n  scaling_factor: ${oc.env:SECRET_TOKEN}\n")
    with pytest.raises(ConfigError, match=r"key 'ties.scaling_factor'.*would read the environment into a parameter"
                                          r".*MERGEBENCH_CONFIG_ENV=SECRET_TOKEN"):
        load_yaml(cfg)
    monkeypatch.setenv("MERGEBENCH_CONFIG_ENV", "OTHER, SECRET_TOKEN")
    assert build_params("ties", P, load_yaml(cfg)) == [P(scaling_factor=0.7)]
    monkeypatch.delenv("SECRET_TOKEN")
    with pytest.raises(ConfigError, match="reads environment variable SECRET_TOKEN, which is not set"):
        load_yaml(cfg)


def test_interpolations_in_overrides_are_refused_not_resolved(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "0.7")
    with pytest.raises(ConfigError, match=r"method 'ties': parameter 'scaling_factor' = '\$\{oc.env:SECRET_TOKEN\}' "
                                          r"is an interpolation"):
        build_params("ties", P, {}, parse_overrides(["ties.scaling_factor=${oc.env:SECRET_TOKEN}"]))
    with pytest.raises(ConfigError, match="key 'steps': '.*' would read the environment"):
        build_params("ties", P, {"ties": {"steps": "${oc.env:SECRET_TOKEN}"}})
    with pytest.raises(ConfigError, match="key 'weights': '.*' is an interpolation"):
        build_params("ties", P, {"method": {"weights": "${ties.steps}"}})
