"""The chunked causal-LM loss (kasa.tasks.lm_loss) against the plain one: the same loss and gradients for every
model type it is used for, and the plain way wherever the logits are not exactly the head's."""

import pytest
import torch
import transformers

from kasa.data.prompts import IGNORE_INDEX
from kasa.tasks import lm_loss
from kasa.tasks.lm_loss import PLAIN_HEAD_MODEL_TYPES, chunkable_head, labelled_token_loss, loss_positions

VOCAB = 97
TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
SIZES = {"gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),
         "default": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, max_position_embeddings=64)}


def tiny_model(model_type: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, vocab_size=VOCAB, **SIZES.get(model_type, SIZES["default"]),
                                               **TOKENS, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    for name, param in model.named_parameters():  # a frozen head, as in every kasa run that adapts the body
        param.requires_grad = "embed" not in name and "wte" not in name and "lm_head" not in name
    return model.eval()  # no dropout: the two losses see the same network (gradients flow all the same)


def loss_and_grads(model: torch.nn.Module, chunked: bool, smoothing: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 12), generator=generator)
    labels = ids.clone()
    labels[0, :5], labels[1, :9], labels[2, 7:] = IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX
    model.zero_grad()
    loss = labelled_token_loss(model, {"input_ids": ids}, loss_positions(labels), smoothing, chunked)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("model_type", sorted(PLAIN_HEAD_MODEL_TYPES))
def test_chunked_loss_has_the_plain_loss_and_gradients(model_type: str, monkeypatch) -> None:
    model = tiny_model(model_type)
    assert chunkable_head(model) is model.get_output_embeddings()
    monkeypatch.setattr(lm_loss, "MIN_CHUNK_ROWS", 4)  # 23 labelled tokens: several chunks and a short last one
    for smoothing in (0.0, 0.1):
        plain, plain_grads = loss_and_grads(model, chunked=False, smoothing=smoothing)
        chunked, chunked_grads = loss_and_grads(model, chunked=True, smoothing=smoothing)
        torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
        assert len(chunked_grads) == len(plain_grads) > 0
        for got, expected in zip(chunked_grads, plain_grads):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_chunked_loss_without_gradients_is_the_plain_loss() -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        ids = torch.randint(3, VOCAB, (2, 8))
        plain = labelled_token_loss(model, {"input_ids": ids}, loss_positions(ids), chunked=False)
        chunked = labelled_token_loss(model, {"input_ids": ids}, loss_positions(ids), chunked=True)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)


def test_the_plain_loss_where_the_logits_are_not_just_the_head() -> None:
    softcapped = tiny_model("gemma2", final_logit_softcapping=30.0)
    assert chunkable_head(softcapped) is None  # the chunked loss would drop the soft-capping
    trainable_head = tiny_model("llama")
    trainable_head.lm_head.weight.requires_grad = True
    assert chunkable_head(trainable_head) is None
    assert chunkable_head(torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.Module)) is None


def test_chunk_rows_bound_the_logits_by_the_hidden_states() -> None:
    assert lm_loss.chunk_rows(tokens=8192, hidden_size=4096, vocab_size=128256) == 262
    assert lm_loss.chunk_rows(tokens=100, hidden_size=576, vocab_size=49152) == lm_loss.MIN_CHUNK_ROWS


def test_chunked_loss_under_bfloat16_autocast_is_the_plain_loss() -> None:
    """Accelerate's bf16 mixed precision: the head's matmuls run in bfloat16 on both ways, the softmax in float32."""
    model = tiny_model("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, plain_grads = loss_and_grads(model, chunked=False, smoothing=0.0)
        chunked, chunked_grads = loss_and_grads(model, chunked=True, smoothing=0.0)
    torch.testing.assert_close(chunked, plain, rtol=1e-3, atol=1e-3)
    for got, expected in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=1e-3)
