"""`model.gradient_checkpointing`: the loader turns on non-reentrant activation checkpointing without transformers'
deprecation warning, and a checkpointed step computes the loss, KaSA's terms and the gradients of the plain one."""

from __future__ import annotations

import warnings

import torch
import transformers

import kasa
from kasa.config import ModelConfig
from kasa.tasks.models import load_causal_lm


def load(path, checkpointing: bool) -> torch.nn.Module:
    model = load_causal_lm(ModelConfig(name="tiny", path=str(path), gradient_checkpointing=checkpointing))
    torch.manual_seed(1)  # the same adapter initialisation for both models
    kasa.apply_adapters(model, kasa.AdapterConfig(method="kasa", rank=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    return model.train()


def is_checkpointing(model: torch.nn.Module) -> bool:
    # transformers 5.x names the flag is_activation_checkpointing (the old name warns)
    new = hasattr(type(model), "is_activation_checkpointing")
    return model.is_activation_checkpointing if new else model.is_gradient_checkpointing


def step(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    loss = model(input_ids=ids, labels=ids).loss + kasa.aux_loss(model).total
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_checkpointing_is_quiet_and_changes_no_number(tmp_path) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpointed = load(tmp_path / "tiny", checkpointing=True)
    assert is_checkpointing(checkpointed)
    assert not [w for w in caught if "checkpointing" in str(w.message)], [str(w.message) for w in caught]
    plain = load(tmp_path / "tiny", checkpointing=False)
    assert not is_checkpointing(plain)
    (loss, grads), (plain_loss, plain_grads) = step(checkpointed), step(plain)
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=1e-6)
    assert grads.keys() == plain_grads.keys() and len(grads) == 3 * 3 * 2  # dU, dSigma, dV of 3 modules x 2 layers
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_data_fingerprint_sees_a_changed_token_and_a_moved_row_boundary():
    from datasets import Dataset

    from kasa.training.checkpoint import data_fingerprint

    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    fingerprint = data_fingerprint(Dataset.from_list(rows))
    assert data_fingerprint(Dataset.from_list([dict(row) for row in rows])) == fingerprint  # built again
    assert data_fingerprint(Dataset.from_list([rows[0], {"input_ids": [4, 6], "labels": [4, 5]}])) != fingerprint
    moved = [{"input_ids": [1, 2], "labels": [-100, 2]}, {"input_ids": [3, 4, 5], "labels": [3, 4, 5]}]
    assert data_fingerprint(Dataset.from_list(moved)) != fingerprint  # the same tokens, other rows
