"""What a truncation costs an adapted model, measured on held-out examples (kasa-inspect): the loss with every
adapted module truncated and with each module truncated alone, and per module the share of its input energy that
lies along the removed directions (against a uniform spread) and the relative change of its output.

"Truncated" is the model as training starts (truncated base, adapters at their initial values); "not truncated"
is the module's original weight W0 with its adapter switched off. So the removed directions and the output change
are those of what the module lacks as training starts: an adapter that starts with some of the removed triplets
(PiSSA, MiLoRA, KaSA's `init=principal` or `init=minor`) holds them, and they do not count."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from kasa.adapters import adapted_layers
from kasa.adapters.calibration import ModelInputs, forward_batches
from kasa.adapters.layer import AdaptedLayer, weight_matrix
from kasa.training.calibration import Batch, mean_loss


@dataclass
class ModuleDamage:
    name: str
    loss: float  # held-out loss with this module alone truncated
    energy_share: float  # share of the input energy along the removed (right) directions that the adapter lacks
    uniform_share: float  # the same share if the energy were spread evenly over all directions
    output_change: float  # ||(W_start - W0) x|| / ||W0 x|| over the held-out tokens (root of summed squares)


def _set_truncated(layer: AdaptedLayer, truncated: bool) -> None:
    if truncated and not layer.adapters_enabled:
        layer.truncate_base()
        layer.adapters_enabled = True
    elif not truncated and layer.adapters_enabled:
        layer.restore_base()
        layer.adapters_enabled = False


@contextlib.contextmanager
def untruncated(layers: Sequence[AdaptedLayer]) -> Iterator[None]:
    """The layers compute with W0 alone for the duration, then return to their truncated state."""
    for layer in layers:
        _set_truncated(layer, False)
    try:
        yield
    finally:
        for layer in layers:
            _set_truncated(layer, True)


def measure_damage(model: nn.Module, loss: Callable[[nn.Module, Batch], torch.Tensor], batches: Sequence[Batch],
                   model_inputs: ModelInputs, progress: bool = False) -> tuple[float, list[ModuleDamage]]:
    """(loss with every adapted module truncated, each module's damage) of an adapted model on `batches`, whose
    model inputs `model_inputs` makes (the task's). `progress`: the modules counted on stderr, one loss pass each
    (minutes for an LLM's hundreds of modules): a bar on a terminal, else a line per module (a bar's redraws would
    make one endless line of a log file)."""
    from tqdm.auto import tqdm

    layers = dict(adapted_layers(model))
    truncated_loss = mean_loss(loss, model, batches)
    label = "each module truncated alone"
    bar = progress and sys.stderr.isatty()
    with untruncated(list(layers.values())):
        statistics = _input_statistics(model, layers, batches, model_inputs)
        alone = {}
        for i, (name, layer) in enumerate(tqdm(layers.items(), desc=label, unit="module", disable=not bar)):
            _set_truncated(layer, True)
            alone[name] = mean_loss(loss, model, batches)
            _set_truncated(layer, False)
            if progress and not bar:
                print(f"{label}: {i + 1}/{len(layers)} {name}", file=sys.stderr, flush=True)
    return truncated_loss, [ModuleDamage(name, alone[name], *statistics[name]) for name in layers]


def _input_statistics(model: nn.Module, layers: dict[str, AdaptedLayer], batches: Sequence[Batch],
                      model_inputs: ModelInputs) -> dict[str, tuple[float, float, float]]:
    """Per layer (energy share along the removed directions, uniform share, relative output change), from the
    non-padding tokens of `batches` as they reach the untruncated layers."""
    sums = {name: torch.zeros(4, dtype=torch.float64) for name in layers}  # removed energy, energy, change, output
    bases, changes, weights = {}, {}, {}
    for name, layer in layers.items():
        weights[name] = weight_matrix(layer.base_layer).detach().double()
        bases[name], changes[name] = _lacking_at_start(layer, weights[name])
    mask: list[torch.Tensor] = []

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0]
            rows = x[mask[0].to(x.device)].double() if tuple(x.shape[:-1]) == tuple(mask[0].shape) else \
                x.reshape(-1, x.shape[-1]).double()
            sums[name] += torch.stack([
                (rows @ bases[name]).square().sum(), rows.square().sum(),
                (rows @ changes[name].T).square().sum(), (rows @ weights[name].T).square().sum(),
            ]).cpu()
        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        forward_batches(model, batches, lambda attention_mask: mask.__setitem__(slice(None), [attention_mask]),
                        model_inputs)
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    for name, (removed_energy, energy, change, output) in ((n, s.tolist()) for n, s in sums.items()):
        dim = bases[name].shape[0]
        result[name] = (removed_energy / energy if energy else 0.0, bases[name].shape[1] / dim,
                        (change / output) ** 0.5 if output else 0.0)
    return result


def _lacking_at_start(layer: AdaptedLayer, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(orthonormal basis of the removed input directions that the adapters do not start with, W_start - W0), in
    float64, for a layer computing with W0 (untruncated). A removed triplet (u, s, v) counts as held when the
    adapter's starting update restores it: u^T dW = s v^T (u has orthonormal columns in both truncation bases), so
    the share <u^T dW, v> / (s ||v||^2) is 1 for a triplet the adapter starts with (rounding aside) and 0 for one it
    does not; 1/2 tells them apart in any dtype."""
    lacking, change = [], torch.zeros_like(weight)
    for name, block in layer.adapters.items():
        start, stop = layer.slices[name]
        u, s, v = (t.detach().double().to(weight.device) for t in (block.removed_u, block.removed_s, block.removed_v))
        delta = block.delta_weight().detach().double().to(weight.device)
        restored = ((u.T @ delta) * v.T).sum(1) / (s * v.square().sum(0)).clamp_min(torch.finfo(s.dtype).tiny)
        lacking.append(v[:, restored < 0.5])
        change[start:stop] = delta - (u * s) @ v.T
    right = torch.cat(lacking, dim=1)
    return torch.linalg.qr(right).Q, change
