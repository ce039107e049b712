"""Every command asks once whether the Hub can be reached, and goes offline before transformers/peft are imported
(peft imports bitsandbytes, which asks the Hub for a kernel with retries: 20-80 s without network)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from huggingface_hub import constants

from kasa import hub
from kasa.cli.common import register_resolvers

VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy",
             "ALL_PROXY", "all_proxy")


@pytest.fixture
def online_environment(monkeypatch):
    """No offline variable set by the user, huggingface_hub not offline; restored afterwards."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub.hub_reachable.cache_clear()
    yield monkeypatch
    hub.hub_reachable.cache_clear()


def _probe(reachable: bool, calls: list):
    def create_connection(address, timeout=None):
        calls.append(address)
        if not reachable:
            raise OSError("network unreachable")
        return socket.socket()
    return create_connection


def test_unreachable_hub_turns_offline_mode_on(online_environment):
    calls: list = []
    online_environment.setattr(hub.socket, "create_connection", _probe(False, calls))
    register_resolvers()  # the first thing every command does
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert constants.HF_HUB_OFFLINE is True
    register_resolvers()
    assert len(calls) == 1  # asked once per process


def test_reachable_hub_changes_nothing(online_environment):
    calls: list = []
    online_environment.setattr(hub.socket, "create_connection", _probe(True, calls))
    hub.offline_without_hub()
    assert calls and "HF_HUB_OFFLINE" not in os.environ and "HF_DATASETS_OFFLINE" not in os.environ
    assert constants.HF_HUB_OFFLINE is False


@pytest.mark.parametrize("name", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_users_choice_is_kept_and_nothing_probed(online_environment, name):
    calls: list = []
    online_environment.setattr(hub.socket, "create_connection", _probe(False, calls))
    online_environment.setenv(name, "0")
    hub.offline_without_hub()
    assert calls == [] and os.environ[name] == "0"
    assert all(os.environ.get(other) is None for other in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if other != name)


def test_commands_import_no_hub_library_before_main():
    """The probe works only if nothing has imported transformers, peft or datasets when main() starts."""
    code = ("import sys\n"
            "import kasa.cli.train, kasa.cli.evaluate, kasa.cli.export, kasa.cli.estimate, kasa.cli.inspect\n"
            "print(sorted(m for m in ('transformers', 'peft', 'bitsandbytes', 'datasets', 'torch') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_importing_kasa_quiets_the_optional_kernel_lookup(caplog):
    """bitsandbytes' search for an optional CPU kernel (it falls back to its own code) prints nothing once anything
    of kasa is imported; anything else those loggers say still does."""
    import logging

    with caplog.at_level(logging.WARNING):
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "offline")
        logging.getLogger("kernels._internals.hf_hub").warning(
            "Skipping publisher trust check for 'kernels-community/x' because Hugging Face Hub is in offline mode.")
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_the_training_loop_imports_quietly_offline_and_without_peft():
    """Importing the loop says nothing, and loads neither peft nor bitsandbytes (4-5 s at every start, and
    bitsandbytes's kernel lookup): only a run with a PEFT method or a quantized base imports them. Nor the GLUE
    metrics' libraries, torch's distributed checkpointing and tensors or datasets (~4 s together), which only a GLUE
    evaluation, a checkpoint's save or resume, a model's loading and a data set use."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    heavy = ("peft", "bitsandbytes", "transformers.trainer_utils", "sklearn", "scipy.stats",
             "torch.distributed.checkpoint", "torch.distributed.tensor", "torch.distributed.fsdp", "datasets")
    code = f"import sys, kasa.training.loop; print([m for m in {heavy} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         env=env)
    assert out.stderr == "" and out.stdout.strip() == "[]"


@pytest.mark.parametrize("gpu", [False, True])
def test_deepspeeds_cpu_fallback_notice_shows_only_where_there_is_a_gpu(monkeypatch, gpu):
    """DeepSpeed says it found no GPU whenever a run saves; said on a machine with a GPU, it is news and stays."""
    import logging

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    hub.quiet_kernel_lookup()
    logger = logging.getLogger("DeepSpeed")
    record = logger.makeRecord("DeepSpeed", logging.WARNING, "real_accelerator.py", 213,
                               "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to "
                               "detect it.", (), None)
    assert bool(logger.filter(record)) is gpu
