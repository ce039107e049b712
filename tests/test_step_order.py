"""The loop's step in one process computes KaSA's auxiliary loss before the model's forward pass, so that autograd
runs its backward last: the adapters' gradients then build up layer by layer during the backward pass, instead of all
of them being held from its start, where a step's memory peaks (scripts/bench_llm.py measures the peak)."""

from __future__ import annotations

import dataclasses

from cli_helpers import tiny_run_config


def test_the_auxiliary_loss_backward_runs_after_the_models(tmp_path, monkeypatch):
    from kasa.adapters import adapted_layers
    from kasa.adapters import kasa as kasa_block
    from kasa.training import loop

    events: list[str] = []
    real_aux_loss, real_backward = loop.aux_loss, kasa_block._GroupRegularization.backward

    def note_gradient(module, args, output) -> None:
        if output.requires_grad:  # training, not evaluation
            output.register_hook(lambda grad: events.append("model"))

    def aux_loss(model):
        if not events:  # the first adapted layer's output gradient: the end of the model's backward pass
            next(layer for _, layer in adapted_layers(model)).register_forward_hook(note_gradient)
        events.append("step")
        return real_aux_loss(model)

    def backward(ctx, *grads):
        events.append("aux")
        return real_backward(ctx, *grads)

    monkeypatch.setattr(loop, "aux_loss", aux_loss)
    monkeypatch.setattr(kasa_block._GroupRegularization, "backward", staticmethod(backward))
    cfg = tiny_run_config(tmp_path)
    loop.train(cfg, dataclasses.asdict(cfg))
    steps = " ".join(events).split("step")[1:]
    assert len(steps) == 4 and all(step.split() == ["model", "aux"] for step in steps)
