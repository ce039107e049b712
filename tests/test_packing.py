"""Packing and length grouping for causal-LM training, and length-ordered generation: a packed batch gives the same
loss and gradients as the same examples padded, under SDPA and eager attention, for LLaMA and GPT-2."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import transformers
from accelerate import Accelerator

from cli_helpers import tiny_run_config
from kasa.config import RunConfig
from kasa.data.prompts import IGNORE_INDEX
from kasa.tasks.batching import (
    LengthGroupedSampler,
    PackedCollator,
    block_causal_mask,
    pack_examples,
    packed_row,
)
from kasa.tasks.causal_lm import CausalLMTask, PadCollator, training_dataset

VOCAB = 40


def tiny_causal_lm(kind: str, attention: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                                          attn_implementation=attention)
        return transformers.LlamaForCausalLM(config)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, attn_implementation=attention)
    return transformers.GPT2LMHeadModel(config)


def examples(count: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Prompt/response rows like encode_prompt_response's: labels IGNORE_INDEX on the prompt."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        prompt, response = rng.randint(1, 6), rng.randint(1, 8)
        ids = [rng.randrange(3, VOCAB) for _ in range(prompt + response)]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                     "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def task_for(attention: str, packing: bool) -> CausalLMTask:
    cfg = RunConfig()
    cfg.model.attn_implementation = attention
    cfg.trainer.packing = packing
    return CausalLMTask(cfg)


def loss_and_grads(model: torch.nn.Module, task: CausalLMTask, batch: dict) -> tuple[float, dict]:
    model.zero_grad()
    loss = task.loss(model, batch)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_batch_has_the_loss_and_gradients_of_the_padded_one(kind: str, attention: str) -> None:
    rows = examples(9)
    model = tiny_causal_lm(kind, attention)
    padded = PadCollator(pad_token_id=0)(rows)
    packed_rows = list(training_dataset(rows, max_length=24, packing=True))
    packed = PackedCollator(pad_token_id=0, one_row=False)(packed_rows)
    assert len(packed_rows) < len(rows)  # several examples share a row
    assert int(packed["attention_mask"].sum()) == int(padded["attention_mask"].sum())  # the same real tokens
    padded_loss, padded_grads = loss_and_grads(model, task_for(attention, packing=False), padded)
    packed_loss, packed_grads = loss_and_grads(model, task_for(attention, packing=True), packed)
    assert packed_loss == pytest.approx(padded_loss, abs=1e-5)
    assert padded_grads.keys() == packed_grads.keys()
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_position_ids_alone_would_let_examples_attend_to_each_other() -> None:
    """Why the 4-D mask: without it the second example's logits change (so the equality above is not free)."""
    model = tiny_causal_lm("llama", "sdpa").eval()
    first, second = [5, 6, 7, 8], [9, 10, 11]
    alone = model(input_ids=torch.tensor([second])).logits
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    packed = torch.tensor([first + second])
    leaky = model(input_ids=packed, position_ids=position_ids).logits[:, 4:]
    isolated = model(input_ids=packed, position_ids=position_ids,
                     attention_mask=block_causal_mask(position_ids)).logits[:, 4:]
    assert (leaky - alone).abs().max() > 1e-3
    torch.testing.assert_close(isolated, alone, atol=1e-5, rtol=1e-5)


def test_pack_examples_fills_rows_without_splitting_examples() -> None:
    lengths = [random.Random(i).randint(1, 50) for i in range(500)]
    groups = pack_examples(lengths, 64)
    assert sorted(i for group in groups for i in group) == list(range(500))
    assert all(sum(lengths[i] for i in group) <= 64 for group in groups)
    assert len(groups) <= 1.1 * sum(lengths) / 64 + 1  # best-fit decreasing leaves little room unused
    with pytest.raises(ValueError, match="max_length=64"):
        pack_examples([65], 64)


def test_packed_row_restarts_positions_and_never_predicts_across_examples() -> None:
    a = {"input_ids": [5, 6, 7], "labels": [5, 6, 7]}
    b = {"input_ids": [8, 9], "labels": [IGNORE_INDEX, 9]}
    row = packed_row([a, b])
    assert row["input_ids"] == [5, 6, 7, 8, 9]
    assert row["position_ids"] == [0, 1, 2, 0, 1]
    assert row["labels"] == [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]


def test_flash_attention_batches_are_one_row_without_padding() -> None:
    rows = [packed_row(examples(3, seed)) for seed in range(3)]
    batch = PackedCollator(pad_token_id=0, one_row=True)(rows)
    total = sum(len(row["input_ids"]) for row in rows)
    assert batch["input_ids"].shape == (1, total) and int(batch["attention_mask"].sum()) == total
    assert int((batch["position_ids"] == 0).sum()) == 9  # nine examples, each starting at position 0
    inputs = task_for("flash_attention_2", packing=True).model_inputs(batch)
    assert "attention_mask" not in inputs  # the varlen kernel splits the row where the positions restart


def test_length_grouped_batches_need_less_padding_and_are_reproducible() -> None:
    lengths = [random.Random(i).randint(1, 200) for i in range(1000)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(1000))
    assert list(sampler) == order  # same seed and epoch: the same batches (exact resume)
    sampler.set_epoch(1)
    assert list(sampler) != order

    def padding(indices: list[int]) -> int:
        batches = [indices[i:i + 8] for i in range(0, len(indices), 8)]
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(order) < 0.1 * padding(torch.randperm(1000, generator=torch.Generator().manual_seed(0)).tolist())


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")


def test_generation_in_length_order_returns_outputs_in_prompt_order() -> None:
    tokenizer = word_tokenizer()
    model = tiny_causal_lm("llama", "sdpa")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    rng = random.Random(0)
    prompts = [" ".join(f"w{rng.randrange(VOCAB - 4)}" for _ in range(n)) for n in (2, 9, 4, 12, 1, 6, 3)]
    task = task_for("sdpa", packing=False)
    task.cfg.task.generation.max_new_tokens = 4
    task.cfg.task.generation.batch_size = 1
    accelerator = Accelerator(cpu=True)
    one_by_one = task.generate(model, accelerator, tokenizer, prompts)
    task.cfg.task.generation.batch_size = 3
    assert task.generate(model, accelerator, tokenizer, prompts) == one_by_one
    assert len({texts[0] for texts in one_by_one}) > 1  # the prompts get different answers: the order is tested


def test_the_loop_groups_by_length_and_compiles_when_asked(tmp_path) -> None:
    from kasa.training.loop import TrainingRecipe

    cfg = tiny_run_config(tmp_path)
    cfg.trainer.group_by_length = cfg.trainer.compile = True
    recipe = TrainingRecipe(cfg, dataclasses.asdict(cfg))
    recipe.setup()  # torch.compile is lazy: nothing compiles before the first forward
    assert isinstance(recipe.train_loader.batch_sampler.sampler, LengthGroupedSampler)
    model = recipe.accelerator.unwrap_model(recipe.model)
    assert model._compiled_call_impl is not None  # compiled in place (nn.Module.compile) ...
    assert not any(name.startswith("_orig_mod") for name, _ in model.named_parameters())  # ... names unchanged
    recipe.accelerator.end_training()


# ops whose result the host must read from the device before it can go on (a data-dependent size or a value)
HOST_READS = {"aten.nonzero.default", "aten.masked_select.default", "aten._local_scalar_dense.default",
              "aten.index.Tensor_bool"}


class HostReadsByKasa(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops of HOST_READS that kasa's own code calls (the nearest caller outside torch is in kasa/);
    a model's own reads, e.g. transformers checking its attention mask, are not kasa's to remove."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        bool_index = func is torch.ops.aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if str(func) in HOST_READS or bool_index:
            import traceback
            callers = [f for f in traceback.extract_stack() if "/torch/" not in f.filename and f.filename != __file__]
            if callers and "/kasa/" in callers[-1].filename:
                self.calls.append(f"{func} at {callers[-1].filename}:{callers[-1].lineno}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("chunked", [True, False])
def test_the_causal_lm_loss_never_waits_for_the_device(packing, chunked, monkeypatch):
    """The collators find where the loss lies while the labels are on the host, so a training step's loss (forward
    and backward) has no host-device sync of kasa's: no nonzero, boolean mask or .item() on device tensors."""
    model = tiny_causal_lm("llama", "sdpa")
    rows = examples(6)
    task = task_for("sdpa", packing)
    task.cfg.trainer.compile = not chunked  # the plain loss (a torch.compile'd model takes it)
    if packing:
        batch = PackedCollator(pad_token_id=0, one_row=False)(
            [packed_row([rows[i] for i in group]) for group in pack_examples([len(r["input_ids"]) for r in rows], 24)])
    else:
        batch = PadCollator(pad_token_id=0)(rows)
    with HostReadsByKasa() as reads:
        task.loss(model, batch).backward()
    assert reads.calls == []


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_calibration_of_packed_rows_keeps_the_examples_apart(attention):
    """The activation basis's statistics of packed rows are those of the same examples padded: the calibration
    passes give the model the task's inputs (the block-diagonal mask), not the rows' 2-D mask, under which each
    example would attend to the ones before it in its row (the second moments then differed by 19% here)."""
    from kasa.adapters.calibration import collect_input_moments

    model = tiny_causal_lm("llama", attention).eval()
    rows = examples(8)
    modules = {"v": model.model.layers[1].self_attn.v_proj, "down": model.model.layers[1].mlp.down_proj}
    padded = PadCollator(pad_token_id=0)(rows)
    groups = pack_examples([len(r["input_ids"]) for r in rows], 24)
    packed = PackedCollator(pad_token_id=0, one_row=False)([packed_row([rows[i] for i in g]) for g in groups])
    assert len(groups) < len(rows)  # rows hold several examples
    expected = collect_input_moments(model, modules, [padded], task_for(attention, False).model_inputs)
    got = collect_input_moments(model, modules, [packed], task_for(attention, True).model_inputs)
    for name in modules:
        assert got[name].tokens == expected[name].tokens
        torch.testing.assert_close(got[name].second_moment, expected[name].second_moment, rtol=1e-4, atol=1e-6)
