"""The process boundary of every console script: the other CLI tests run the commands in-process (cli_helpers.run_cli),
so this is where each [project.scripts] entry is run the way pip's generated script runs it, in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cli_helpers import ENV

SCRIPTS = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
# What pip writes into bin/<name>: import the entry point and exit with what it returns.
LAUNCHER = "import sys; from {module} import {function} as main; sys.argv[0] = {name!r}; sys.exit(main())"


def test_every_command_is_declared():
    assert set(SCRIPTS) == {"kasa-train", "kasa-eval", "kasa-export", "kasa-compare", "kasa-plot", "kasa-estimate",
                            "kasa-inspect"}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_runs_its_command(name):
    module, function = SCRIPTS[name].split(":")
    code = LAUNCHER.format(module=module, function=function, name=name)
    result = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, env=ENV,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert name in result.stdout.splitlines()[0], result.stdout  # its own help, under its own name
    assert result.stderr == ""


def test_the_package_exports_its_api_without_importing_torch():
    """`from kasa import *` imported nothing (no __all__; walk AS); `import kasa` stays light (every command's --help
    imports it)."""
    code = ("import sys, kasa; light = 'torch' not in sys.modules\n"
            "from kasa import *\n"
            "print(light, apply_adapters.__module__, sorted(kasa.__all__) == sorted(kasa.adapters.__all__))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert result.stdout.split() == ["True", "kasa.adapters.model", "True"], result.stderr
