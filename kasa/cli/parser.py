"""The argument parser of kasa's flag-style commands (kasa-compare, kasa-plot, `python -m kasa.cli.sweep`) and of
the scripts."""

from __future__ import annotations

import argparse
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line, as every kasa command's are (`error: ...`, status 2): the problem
    and where the usage is (argparse's default prints the whole usage block above the error)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (usage: {self.prog} --help)\n")
