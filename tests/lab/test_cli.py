"""The `der` command: help, group listing, unknown names, and the docstring examples of the core."""

import doctest
import subprocess
import sys

import pytest

import der.functional
import der.regularizer
from der import cli


def test_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "exp", "bench", "train", "breakeven"):
        assert cmd in out


def test_group_listing_and_unknown_name(capsys):
    assert "core-gradient-check" in cli.available("bench")
    assert cli.main(["bench", "--help"]) == 0
    assert "core-gradient-check" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown name 'nope'.*available"):
        cli.main(["exp", "nope"])
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "der.cli", "--help"], capture_output=True, text=True, check=True)
    assert "Differentiable Entropy Regularization" in out.stdout


@pytest.mark.parametrize("module", [der.functional, der.regularizer])
def test_docstring_examples(module):
    res = doctest.testmod(module, verbose=False)
    assert res.attempted > 0 and res.failed == 0


@pytest.mark.parametrize("argv", [["exp", "--help"], ["bench", "core-gradient-check"], ["demo"]])
def test_missing_der_lab_is_a_clear_error(monkeypatch, argv):
    for name in ("der_lab", "der_lab.experiments", "der_lab.bench", "der_lab.demo"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import der_lab...` fail as if not installed
    with pytest.raises(SystemExit, match="needs the package 'der_lab'.*pip install -e"):
        cli.main(argv)
