"""kasa: KaSA (Knowledge-aware Singular-value Adaptation) fine-tuning toolkit.

    import kasa
    model = kasa.apply_adapters(model, kasa.AdapterConfig(method="kasa", rank=8, target_modules=["query", "value"]))
    aux = kasa.aux_loss(model)  # before the forward pass in one process: see kasa.aux_loss_needs_forward
    loss = task_loss(model, batch) + aux.total

The names of kasa.adapters are importable from here; they load on first use, so that `import kasa` (and every
command's --help) does not import torch.
"""

from typing import Any

import kasa.adapters  # light: its names load on first use
from kasa.hub import quiet_kernel_lookup  # light: logging and sockets

__version__ = "0.1.0"

# On every route into the package (a command, `import kasa`, `import kasa.training.loop`), before anything imports
# bitsandbytes (transformers' trainer utilities import it through peft): its kernel-lookup notices stay off the console.
quiet_kernel_lookup()


__all__ = kasa.adapters.__all__  # `from kasa import *`, help(kasa)


def __getattr__(name: str) -> Any:
    if name in kasa.adapters.__all__:
        return getattr(kasa.adapters, name)
    raise AttributeError(f"module 'kasa' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *kasa.adapters.__all__])
