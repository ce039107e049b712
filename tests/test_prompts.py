"""Instruction-example formatting with a byte-level BPE tokenizer trained here on a few sentences (no Hub): the
prompt/response label boundary, EOS, truncation, chat templates and chat `messages` input."""

from __future__ import annotations

import copy

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from kasa.data.prompts import IGNORE_INDEX, alpaca_prompt, format_instruction_example, styled_prompt

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""A template that closes every turn with EOS and a newline, like ChatML's <|im_end|>\\n."""

CHAT_TEMPLATE_NO_EOS = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)

EXAMPLE = {"instruction": "Name a colour of the sky.", "input": "Answer in one word.", "output": "Blue, mostly."}


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [alpaca_prompt("Name a colour of the sky.", "Answer in one word."), "Blue, mostly. The sky is blue.",
            "Below is an instruction that describes a task. Write a response."]
    tokenizer.train_from_iterator(text * 5, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )  # adds BOS like LLaMA's tokenizer, so the test sees that only the prompt gets it
    return tokenizer


def wrap(trained: Tokenizer, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(trained), bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")
    tokenizer.chat_template = chat_template
    return tokenizer


def split(features: dict[str, list[int]]) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) at the label boundary, checking that labels copy input ids after it."""
    labels, input_ids = features["labels"], features["input_ids"]
    n = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    assert all(label == IGNORE_INDEX for label in labels[:n])
    assert labels[n:] == input_ids[n:]
    assert features["attention_mask"] == [1] * len(input_ids)
    return input_ids[:n], input_ids[n:]


def test_alpaca_boundary_and_eos(trained):
    tokenizer = wrap(trained)
    features = format_instruction_example(EXAMPLE, tokenizer, max_length=512)
    prompt_ids, response_ids = split(features)
    assert prompt_ids == tokenizer(alpaca_prompt(EXAMPLE["instruction"], EXAMPLE["input"]))["input_ids"]
    assert prompt_ids[0] == tokenizer.bos_token_id and features["input_ids"].count(tokenizer.bos_token_id) == 1
    assert response_ids == tokenizer(EXAMPLE["output"], add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id]
    assert tokenizer.decode(response_ids) == "Blue, mostly.</s>"


def test_missing_input_uses_the_no_input_prompt(trained):
    tokenizer = wrap(trained)
    example = {"instruction": "Name a colour.", "output": "Blue."}
    prompt_ids, _ = split(format_instruction_example({**example, "input": ""}, tokenizer, 512))
    assert prompt_ids == tokenizer(alpaca_prompt("Name a colour."))["input_ids"]
    assert split(format_instruction_example(example, tokenizer, 512))[0] == prompt_ids


def test_truncation_keeps_the_prompt_start(trained):
    tokenizer = wrap(trained)
    full = format_instruction_example(EXAMPLE, tokenizer, max_length=512)
    n_prompt = len(split(full)[0])
    cut = format_instruction_example(EXAMPLE, tokenizer, max_length=n_prompt + 2)
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 2] and cut["labels"] == full["labels"][: n_prompt + 2]
    assert tokenizer.eos_token_id not in cut["input_ids"]
    prompt_only = format_instruction_example(EXAMPLE, tokenizer, max_length=n_prompt - 3)
    assert prompt_only["input_ids"] == full["input_ids"][: n_prompt - 3]
    assert set(prompt_only["labels"]) == {IGNORE_INDEX}


def test_chat_template_boundary_stops_at_the_template_eos(trained):
    tokenizer = wrap(trained, CHAT_TEMPLATE)
    features = format_instruction_example(EXAMPLE, tokenizer, max_length=512)
    prompt_ids, response_ids = split(features)
    user = f"{EXAMPLE['instruction']}\n\n{EXAMPLE['input']}"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == f"<|user|>\n{user}</s>\n<|assistant|>\n"
    assert prompt_ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(response_ids) == "Blue, mostly.</s>"  # the template's "\n" after EOS is dropped
    assert response_ids.count(tokenizer.eos_token_id) == 1 and tokenizer.bos_token_id not in features["input_ids"]


def test_chat_template_without_eos_gets_one_appended(trained):
    tokenizer = wrap(trained, CHAT_TEMPLATE_NO_EOS)
    _, response_ids = split(format_instruction_example(EXAMPLE, tokenizer, max_length=512))
    assert tokenizer.decode(response_ids) == "Blue, mostly.\n</s>"


def test_chat_messages_only_the_last_assistant_turn_is_learned(trained):
    tokenizer = wrap(trained, CHAT_TEMPLATE)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Sky colour?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And at night?"},
        {"role": "assistant", "content": "Black, mostly."},
    ]
    prompt_ids, response_ids = split(format_instruction_example({"messages": messages}, tokenizer, 512))
    prompt = tokenizer.decode(prompt_ids)
    assert prompt == ("<|system|>\nBe brief.</s>\n<|user|>\nSky colour?</s>\n<|assistant|>\nBlue.</s>\n"
                      "<|user|>\nAnd at night?</s>\n<|assistant|>\n")
    assert tokenizer.decode(response_ids) == "Black, mostly.</s>"


def test_chat_messages_without_template_use_alpaca(trained):
    tokenizer = wrap(trained)
    pair = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    assert format_instruction_example({"messages": pair}, tokenizer, 512) == format_instruction_example(
        {"instruction": "Name a colour.", "output": "Blue."}, tokenizer, 512)
    with pytest.raises(ValueError, match="chat template"):
        format_instruction_example({"messages": [{"role": "system", "content": "Be brief."}] + pair}, tokenizer, 512)


@pytest.mark.parametrize("example, message", [
    ({"instruction": "Do it."}, "'output'"),
    ({"input": "x", "output": "y"}, "'instruction'"),
    ({"instruction": "Do it.", "input": 3, "output": "y"}, "'input'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "at least two"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "hi"}]}, "assistant"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "hi"}]}, r"messages\[0\]"),
])
def test_bad_examples(trained, example, message):
    with pytest.raises(ValueError, match=message):
        format_instruction_example(example, wrap(trained), 512)


@pytest.mark.parametrize("chat_template", [None, CHAT_TEMPLATE])
def test_train_on_inputs_labels_the_prompt_too(trained, chat_template):
    """task.train_on_inputs: every token labelled (LLM-Adapters' finetune.py default), the same ids and cut."""
    from kasa.tasks.causal_lm import encode_prompt_response

    tokenizer = wrap(trained, chat_template)
    for max_length in (512, 9):
        response_only = format_instruction_example(EXAMPLE, tokenizer, max_length)
        everything = format_instruction_example(EXAMPLE, tokenizer, max_length, train_on_inputs=True)
        assert everything["input_ids"] == response_only["input_ids"] == everything["labels"]
        assert response_only["labels"] != everything["labels"]
    prompt = alpaca_prompt(EXAMPLE["instruction"])
    encoded = encode_prompt_response(tokenizer, prompt, EXAMPLE["output"], 512, train_on_inputs=True)
    assert encoded["labels"] == encoded["input_ids"] and encoded["input_ids"][-1] == tokenizer.eos_token_id
    assert split(encode_prompt_response(tokenizer, prompt, EXAMPLE["output"], 512))[0] == encoded["input_ids"][
        :len(tokenizer(prompt)["input_ids"])]


def test_bad_settings(trained):
    with pytest.raises(ValueError, match="max_length"):
        format_instruction_example(EXAMPLE, wrap(trained), 0)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(trained))
    with pytest.raises(ValueError, match="eos_token"):
        format_instruction_example(EXAMPLE, tokenizer, 512)


# LLM-Adapters' prompts, written out byte for byte from its finetune.py (training) and commonsense_evaluate.py
# (evaluation) `generate_prompt`: 16 spaces of indentation on every line after the first, the training prompt's
# blank lines hold those spaces, the evaluation prompt's are empty, and the first lines end in spaces ("request.  "
# for training without an input, "request. " for training with one and for evaluation without one, "request." for
# evaluation with one).
LLM_ADAPTERS_TRAIN = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n"
    "\n"
    "                ### Instruction:\n"
    "                Pick {one}.\n"
    "                \n"
    "                ### Response:\n"
    "                "
)
LLM_ADAPTERS_TRAIN_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request. \n"
    "\n"
    "                ### Instruction:\n"
    "                Pick {one}.\n"
    "                \n"
    "                ### Input:\n"
    "                a or b\n"
    "                \n"
    "                ### Response:\n"
    "                "
)
LLM_ADAPTERS_EVAL = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n"
    "\n"
    "                ### Instruction:\n"
    "                Pick {one}.\n"
    "\n"
    "                ### Response:\n"
    "                "
)
LLM_ADAPTERS_EVAL_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n"
    "\n"
    "                ### Instruction:\n"
    "                Pick {one}.\n"
    "\n"
    "                ### Input:\n"
    "                a or b\n"
    "\n"
    "                ### Response:\n"
    "                "
)


def test_llm_adapters_prompts_byte_for_byte():
    # an instruction with braces checks that it is inserted as text, never read as a template
    assert styled_prompt("llm_adapters", "Pick {one}.", training=True) == LLM_ADAPTERS_TRAIN
    assert styled_prompt("llm_adapters", "Pick {one}.", "", training=True) == LLM_ADAPTERS_TRAIN
    assert styled_prompt("llm_adapters", "Pick {one}.", "a or b", training=True) == LLM_ADAPTERS_TRAIN_WITH_INPUT
    assert styled_prompt("llm_adapters", "Pick {one}.", training=False) == LLM_ADAPTERS_EVAL
    assert styled_prompt("llm_adapters", "Pick {one}.", "a or b", training=False) == LLM_ADAPTERS_EVAL_WITH_INPUT
    # stripped line by line, each is the clean Alpaca prompt (its blank lines included)
    for text, input in ((LLM_ADAPTERS_TRAIN, None), (LLM_ADAPTERS_EVAL_WITH_INPUT, "a or b")):
        stripped = "\n".join(line.strip() for line in text.split("\n"))
        assert stripped == alpaca_prompt("Pick {one}.", input)


def test_clean_style_is_the_alpaca_prompt_in_training_and_evaluation():
    for training in (True, False):
        assert styled_prompt("clean", "Pick one.", training=training) == alpaca_prompt("Pick one.")
        assert styled_prompt("clean", "Pick one.", "a", training=training) == alpaca_prompt("Pick one.", "a")
    with pytest.raises(ValueError, match="unknown prompt style 'alpaca'; choose one of: clean, llm_adapters"):
        styled_prompt("alpaca", "Pick one.", training=True)
