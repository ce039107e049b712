"""Calibration statistics for the activation basis of the truncation: C = E[x x^T], the second moment of each
adapted module's input over calibration examples (padding tokens excluded), gathered with forward hooks on the
frozen model and accumulated in float64.

Modules that read the very same input tensor (q, k, v of an attention block; gate and up of an MLP) share one
matrix: a hook recognises the tensor object it saw earlier in the same forward pass.

Memory stays bounded for 7-8B models: the modules are taken in the order they run, in groups whose matrices fit
`memory_gib` (each distinct input costs 2 m^2 float64 values while it is in use: C and its Cholesky factor), one
pass over the calibration batches per group, and each pass stops as soon as the group's last module has seen its
input. The matrices live on the device of the module that reads them (the GPU when the model is there), and a
group's matrices are freed before the next group is gathered.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

Batch = dict[str, torch.Tensor]
# Cholesky attempts: the damping grows tenfold after each failure.
_FACTOR_ATTEMPTS = 12


@dataclass(eq=False)
class InputMoments:
    """E[x x^T] (m x m, float64) of one input over `tokens` calibration tokens, shared by the modules reading it."""

    second_moment: torch.Tensor
    tokens: int
    _digest: str | None = field(default=None, repr=False)
    _factor: tuple[float, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def dim(self) -> int:
        return self.second_moment.shape[0]

    def digest(self) -> str:
        """A hash of the statistics (part of the SVD cache key)."""
        if self._digest is None:
            data = self.second_moment.detach().contiguous().cpu()
            hasher = hashlib.blake2b(digest_size=20)
            hasher.update(f"{tuple(data.shape)}|{self.tokens}".encode())
            hasher.update(data.view(torch.uint8).numpy().data)
            self._digest = hasher.hexdigest()
        return self._digest

    def factor(self, damping: float) -> torch.Tensor:
        """L (lower triangular, float64) with L L^T = C + delta I, delta = damping * mean(diag C).

        C is singular when there are fewer calibration tokens than input features or when channels are dead, and
        nearly so with a few dominant (outlier) channels; without damping, L^{-1} would blow up along directions the
        calibration inputs never visit. If the factorisation still fails, delta grows tenfold until it succeeds
        (a larger delta moves the basis towards the weight basis, which C = I gives)."""
        if self._factor is not None and self._factor[0] == damping:
            return self._factor[1]
        c = self.second_moment
        scale = float(c.diagonal().mean())
        if not scale > 0 or not torch.isfinite(c).all():
            raise ValueError("the calibration inputs of a module are all zero or not finite: check the calibration "
                             "data (every example padding?) or use method.truncation_basis=weight")
        delta = damping * scale
        for _ in range(_FACTOR_ATTEMPTS):
            damped = c.clone()  # one m x m temporary (no identity matrix): 1.5 GiB for a 14336-wide input
            damped.diagonal().add_(delta)
            factor, info = torch.linalg.cholesky_ex(damped)
            del damped
            if int(info) == 0:
                self._factor = (damping, factor)
                return factor
            delta = max(delta * 10, 1e-12 * scale)
        raise ValueError(f"cannot factorise the calibration second moment even with damping {delta / scale:.1e}")


class _StopForward(Exception):
    """Raised by a hook once every module of the current group has seen its input: the rest of the model is not
    needed for this pass."""


class _InputHooks:
    """Forward pre-hooks that accumulate x^T x of the non-padding rows of each hooked module's input."""

    def __init__(self, modules: dict[str, nn.Module], accumulate: bool) -> None:
        self.accumulate = accumulate
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.owner: dict[str, str] = {}  # module -> the module whose matrix it shares (itself if none)
        self.order: list[str] = []  # the order in which the modules ran (first batch)
        self.mask: torch.Tensor | None = None
        self._seen: dict[int, tuple[weakref.ref, str]] = {}
        self._fired: set[str] = set()
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]
        self._names = set(modules)

    def start_batch(self, mask: torch.Tensor) -> None:
        self.mask, self._seen, self._fired = mask, {}, set()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if name in self._fired or not args or not torch.is_tensor(args[0]):
                return
            x = args[0]
            self._fired.add(name)
            if name not in self.owner:
                self.order.append(name)
            seen = self._seen.get(id(x))
            if seen is not None and seen[0]() is x:  # the same tensor object: the same input as that module's
                self.owner[name] = seen[1]
            else:
                self._seen[id(x)] = (weakref.ref(x), name)
                self.owner[name] = name
                if self.accumulate:
                    self._add(name, x)
            if self._fired == self._names:
                raise _StopForward

        return hook

    def _add(self, name: str, x: torch.Tensor) -> None:
        mask = self.mask.to(x.device)
        if tuple(x.shape[:-1]) != tuple(mask.shape):
            raise ValueError(f"module {name!r} reads an input of shape {tuple(x.shape)} that does not line up with "
                             f"the attention mask {tuple(mask.shape)} (not one row per token: a pooler's, say): "
                             "leave it out of target_modules (name the modules meant more fully, so that it no "
                             "longer matches), or use method.truncation_basis=weight")
        rows = x[mask].to(torch.float64)
        if name not in self.sums:
            self.sums[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
            self.tokens[name] = 0
        self.sums[name].addmm_(rows.T, rows)
        self.tokens[name] += rows.shape[0]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


ModelInputs = Callable[[Batch], Batch]
# what a calibration batch gives the model by default; its other keys (labels, where the loss lies) are the loss's
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def batch_inputs(batch: Batch) -> Batch:
    """The model's inputs in a batch, as they are: its input_ids, attention_mask, token_type_ids and position_ids."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS}


def forward_batches(model: nn.Module, batches: Iterable[Batch], start_batch: Callable[[torch.Tensor], None],
                    model_inputs: ModelInputs = batch_inputs) -> None:
    """Forward passes of `model` over `batches` in eval mode without gradients (its training mode restored after),
    calling `start_batch(attention_mask)` before each, for hooks that read the non-padding tokens (a batch's 2-D
    attention_mask marks them); a hook may end a pass early by raising _StopForward. `model_inputs` makes the model's
    inputs of a batch moved to the model's device: kasa's tasks give theirs, which keep the examples of a packed row
    apart (kasa.tasks.causal_lm)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                if "attention_mask" not in batch:
                    raise ValueError("these batches need an attention_mask (padding is excluded by it)")
                batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
                start_batch(batch["attention_mask"].bool())
                try:
                    model(**model_inputs(batch))
                except _StopForward:
                    pass
    finally:
        model.train(was_training)


def _run(model: nn.Module, hooks: _InputHooks, batches: Iterable[Batch], model_inputs: ModelInputs) -> None:
    try:
        forward_batches(model, batches, hooks.start_batch, model_inputs)
    finally:
        hooks.remove()


def _check_all_ran(modules: dict[str, nn.Module], hooks: _InputHooks) -> None:
    silent = sorted(set(modules) - set(hooks.owner))
    if silent:
        raise ValueError(f"module(s) {silent[:3]} received no input during calibration: they do not run in the "
                         "model's forward; leave them out of target_modules")


def collect_input_moments(model: nn.Module, modules: dict[str, nn.Module], batches: Iterable[Batch],
                          model_inputs: ModelInputs = batch_inputs) -> dict[str, InputMoments]:
    """E[x x^T] of each module's input over the non-padding tokens of `batches`, in one pass; modules that read the
    same tensor share one InputMoments object."""
    hooks = _InputHooks(modules, accumulate=True)
    _run(model, hooks, batches, model_inputs)
    _check_all_ran(modules, hooks)
    shared: dict[str, InputMoments] = {}
    for name in hooks.owner.values():
        if name not in shared:
            if hooks.tokens[name] == 0:
                raise ValueError("the calibration batches hold no token outside padding: check the calibration data")
            shared[name] = InputMoments(hooks.sums.pop(name) / hooks.tokens[name], hooks.tokens[name])
    return {name: shared[hooks.owner[name]] for name in modules}


def moment_groups(model: nn.Module, modules: dict[str, nn.Module], batches: Sequence[Batch],
                  memory_gib: float, model_inputs: ModelInputs = batch_inputs) -> Iterator[dict[str, InputMoments]]:
    """The modules' input moments, group by group in the order the modules run, each group's matrices within
    `memory_gib` (one group always holds at least one input); a group is freed once the caller drops it (`del` it before asking for the next).

    A first forward of one example finds the order and which modules share an input."""
    if not batches:
        raise ValueError("no calibration batch: raise method.calibration_samples or check the training split")
    # its per-token tensors (batch x length), cut to the first row; what else a batch holds is the loss's
    first_example = {k: v[:1] for k, v in batches[0].items() if torch.is_tensor(v) and v.dim() == 2}
    probe = _InputHooks(modules, accumulate=False)  # after what can fail outside _run, which removes its hooks
    _run(model, probe, [first_example], model_inputs)
    _check_all_ran(modules, probe)
    budget = memory_gib * 2**30
    groups, group, used = [], [], 0.0
    for name in probe.order:
        owner = probe.owner[name]
        new_input = owner == name or owner not in group  # an owner in an earlier group: this one gathers its own
        cost = 2 * 8 * _in_features(modules[name]) ** 2 if new_input else 0  # C and its Cholesky factor
        if group and new_input and used + cost > budget:
            groups.append(group)
            group, used = [], 0.0
        group.append(name)
        used += cost
    groups.append(group)
    for names in groups:
        yield collect_input_moments(model, {n: modules[n] for n in names}, batches, model_inputs)


def _in_features(module: nn.Module) -> int:
    """Input size of an nn.Linear (weight out x in) or a GPT-2 Conv1D (weight in x out)."""
    return module.weight.shape[0] if type(module).__name__ == "Conv1D" else module.weight.shape[1]
