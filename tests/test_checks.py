"""Checks before work: every refused run exits 2 with one message that says the fix, and writes nothing."""

import pytest
import torch

from mergebench_core import registry as registry_module
from mergebench_core.cli import main

POOL = "digits-mlp_TA8"


@pytest.mark.parametrize("config, message", [
    ("mehtod:\n  k: 0.1\n", "unknown section 'mehtod'. Did you mean 'method'?"),
    ("tiez:\n  k: 0.1\n", "unknown section 'tiez'. Did you mean 'ties'?"),
    ("ties:\n  kk: 0.1\n", "has no parameter 'kk'. Did you mean 'k'?"),
])
def test_config_typos_are_refused(cli_env, capsys, config, message):
    (cli_env / "my.yaml").write_text(config)
    assert main(["run", "-m", "ties", "-p", POOL, "--config", "my.yaml"]) == 2
    assert message in capsys.readouterr().err
    assert not (cli_env / "results.sqlite").exists()


def test_a_config_may_hold_sections_for_methods_not_selected(cli_env, capsys):
    (cli_env / "my.yaml").write_text("task_arithmetic:\n  scaling_factor: 0.4\nties:\n  k: 0.1\n")
    assert main(["run", "-m", "ties", "-p", POOL, "--tasks", "digits", "--config", "my.yaml"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda"], "no CUDA GPU"),
    (["--device", "gpu"], "is not a device"),
    (["--seed", "a"], "--seed 'a' is not an integer"),
    (["--limit", "0"], "--limit 0"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--taskpool", "digits_full"], "task pool 'digits_full' cannot score model pool 'digits-mlp_TA8'"),
])
def test_bad_flags_exit_2_before_any_work(cli_env, capsys, argv, message):
    if argv[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["run", "-m", "ties", "-p", POOL, *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (cli_env / "results.sqlite").exists()


def test_an_unexpected_error_is_one_line_unless_debug(cli_env, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(registry_module, "get_registry", broken)
    assert main(["list"]) == 1
    err = capsys.readouterr().err
    assert "error: RuntimeError: disk on fire" in err and "--debug" in err and "Traceback" not in err
    with pytest.raises(RuntimeError, match="disk on fire"):
        main(["--debug", "list"])


def test_a_refused_pickle_is_reported_without_terminal_codes(tmp_path, capsys):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a whole module: not tensors only
    assert main(["convert", str(tmp_path / "module.pt")]) == 2
    err = capsys.readouterr().err
    assert "--trust-pickle" in err and "\x1b[" not in err
