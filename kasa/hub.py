"""Whether the Hugging Face Hub can be reached, asked once per process with one short TCP connect.

Without network huggingface_hub retries every request with backoff: a minute and more per model file, and 20-80 s
just to import peft (it imports bitsandbytes, whose CPU backend asks the Hub for a kernel). This module imports
nothing heavy, so a command can ask before any of those libraries is imported."""

from __future__ import annotations

import functools
import logging
import os
import socket
import urllib.parse

HUB_PROBE_SECONDS = 5.0
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
# Importing peft makes bitsandbytes ask the Hub (through `kernels`) for an optional CPU kernel; when it cannot have it
# (offline, or `kernels` refusing an unverified repository) it falls back to its own CPU code, but these loggers print
# lines about it at every command's start. DeepSpeed, imported by Accelerate when a run saves, says at WARNING level
# that it found no GPU: on a machine without one that is no news.
KERNEL_LOOKUP_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub", "DeepSpeed")


class _DropKernelLookupNotice(logging.Filter):
    """Drops exactly the kernel-lookup notices (and DeepSpeed's CPU fallback notice when torch sees no GPU);
    anything else these loggers say still reaches the user."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("Setting accelerator to CPU"):
            import torch  # already imported: DeepSpeed is asking which accelerator torch has

            return torch.cuda.is_available()
        return not (message.startswith("Failed to load CPU gemm_4bit_forward") or "kernels-community/" in message
                    or message.startswith("Skipping publisher trust check"))


_KERNEL_LOOKUP_FILTER = _DropKernelLookupNotice()


def quiet_kernel_lookup() -> None:
    """Keep bitsandbytes' kernel-lookup notices off the console (idempotent: one filter object per logger)."""
    for name in KERNEL_LOOKUP_LOGGERS:
        logging.getLogger(name).addFilter(_KERNEL_LOOKUP_FILTER)


@functools.cache
def hub_reachable() -> bool:
    """Whether the Hub's endpoint accepts a connection within HUB_PROBE_SECONDS. Behind a proxy (HTTPS_PROXY /
    ALL_PROXY) the endpoint is not probed: only the proxy can reach it."""
    from huggingface_hub import constants  # light: reads environment variables only

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=HUB_PROBE_SECONDS).close()
        return True
    except OSError:
        return False


def offline_without_hub() -> None:
    """Put this process in the Hub's offline mode (the local cache only) when the Hub cannot be reached. Call it
    before anything imports transformers, peft or datasets: they read these variables when imported. A choice the
    user made (any of the variables set, TRANSFORMERS_OFFLINE included) is left as it is, and nothing is probed."""
    from huggingface_hub import constants  # light; reads the variables when first imported

    if not any(name in os.environ for name in (*OFFLINE_VARIABLES, "TRANSFORMERS_OFFLINE")) and not hub_reachable():
        for name in OFFLINE_VARIABLES:
            os.environ[name] = "1"
        constants.HF_HUB_OFFLINE = True  # already imported, before the variable was set
