"""Shared fixtures: tiny randomly initialised Hugging Face models built from configs (never the Hub), fixed inputs,
and helpers that put random values into adapter parameters. Everything is seeded and runs on the CPU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: nothing in the tests may touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import transformers

import kasa
from cli_helpers import checkpointed_args, make_tiny_bert, run_cli, write_sentiment_data, write_similarity_data
from kasa.adapters.layer import AdaptedLayer


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _roberta_config(**overrides) -> transformers.RobertaConfig:
    settings = dict(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=40, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    settings.update(overrides)
    return transformers.RobertaConfig(**settings)


def build_roberta(seed: int = 0, **overrides) -> transformers.RobertaForSequenceClassification:
    """A tiny RoBERTa classifier (hidden 32, 2 layers); the same seed gives the same weights."""
    torch.manual_seed(seed)
    model = transformers.RobertaForSequenceClassification(_roberta_config(**overrides))
    _random_biases(model, seed)
    return model.eval()


def build_gpt2(seed: int = 0, **overrides) -> transformers.GPT2LMHeadModel:
    """A tiny GPT-2 (n_embd 24, 2 layers) whose attention and MLP projections are Conv1D layers."""
    settings = dict(vocab_size=100, n_positions=32, n_embd=24, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**settings))
    _random_biases(model, seed)
    return model.eval()


def _random_biases(model: torch.nn.Module, seed: int) -> None:
    """Hugging Face initialises biases to zero, which would hide a dropped bias: give them random values."""
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)


@pytest.fixture
def make_roberta():
    return build_roberta


@pytest.fixture
def make_gpt2():
    return build_gpt2


@pytest.fixture
def roberta_inputs():
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 100, (3, 11), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -3:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture
def gpt2_inputs():
    g = torch.Generator().manual_seed(2)
    return {"input_ids": torch.randint(0, 100, (2, 9), generator=g)}


def randomize_adapters(model: torch.nn.Module, seed: int = 123, scale: float = 0.1) -> None:
    """Give every adapter parameter (and nothing else) random values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in kasa.adapted_layers(model):
            for param in layer.adapters.parameters():
                param.copy_(torch.randn(param.shape, generator=g) * scale)


def randomize_trainable(model: torch.nn.Module, seed: int = 321, scale: float = 0.05) -> None:
    """A train-like perturbation: every trainable parameter (adapters, heads, biases) moves by a random amount."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * scale)


def outputs(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The logits and the last hidden states, flattened into one vector (the hidden states are far more sensitive to
    a weight change than the logits of a random classifier head)."""
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    return torch.cat([out.logits.flatten(), out.hidden_states[-1].flatten()])


def first_adapted(model: torch.nn.Module) -> AdaptedLayer:
    return next(iter(kasa.adapted_layers(model)))[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random BERT classifier saved as a model folder, for the command-line tests."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def sentiment_dir(tmp_path_factory):
    return write_sentiment_data(tmp_path_factory.mktemp("sentiment"))


@pytest.fixture(scope="session")
def similarity_dir(tmp_path_factory):
    return write_similarity_data(tmp_path_factory.mktemp("stsb"))


@pytest.fixture(scope="session")
def uninterrupted(tiny_model, sentiment_dir, tmp_path_factory):
    """The checkpointed tiny run (cli_helpers.checkpointed_args) trained without a stop: what a stopped, killed or
    held run must end as. Shared by the resume and run-safety tests; tests copy it before changing anything."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_cli("kasa.cli.train", *checkpointed_args(tiny_model, sentiment_dir, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir
