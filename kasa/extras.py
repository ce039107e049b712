"""kasa's optional extras (pyproject.toml's optional-dependencies: `peft`, `quant`, `e2e`, ...), named in the line
that tells a user how to install the one a setting needs."""


def install_extra(extra: str) -> str:
    """The command that installs one of kasa's optional extras: from kasa's checkout, held to the installed torch by
    constraints.txt (the `kasa` on PyPI is another project)."""
    return f"pip install -c constraints.txt -e '.[{extra}]' in kasa's checkout"
