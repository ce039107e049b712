"""Instruction-following examples turned into causal-LM training features, with the loss on the response only.

Two prompt formats: the tokenizer's own chat template when it has one (instruct models were trained on it, so
fine-tuning and later prompting should speak it too), and the Stanford Alpaca template otherwise (base models; the
format of the paper's Alpaca and Commonsense170K runs, and of LLM-Adapters).

The prompt and the response are tokenized separately and concatenated. That makes the prompt/response boundary exact
in token space and matches inference, where the prompt is tokenized on its own and the model continues it; tokenizing
the joined text and masking "the first len(prompt) tokens" can be off by one where a merge crosses the boundary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (the prompt): the value Hugging Face causal-LM losses skip."""

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
"""Stanford Alpaca's prompt for examples without an input (LLM-Adapters' text is it with indentation, see below)."""

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
"""Stanford Alpaca's prompt for examples with an input."""


PROMPT_STYLES: tuple[str, ...] = ("clean", "llm_adapters")
"""`task.prompt_style` of the commonsense task: `clean` is the Stanford Alpaca template above, the same text in
training and evaluation; `llm_adapters` is LLM-Adapters' text byte for byte (the templates below), which the paper's
commonsense table follows: the model sees the protocol's exact bytes."""

# LLM-Adapters builds its prompts in indented triple-quoted f-strings, so every line after the first starts with 16
# spaces, the first line ends in spaces, and training (finetune.py `generate_prompt`) and evaluation
# (commonsense_evaluate.py `generate_prompt`) differ: training's blank lines hold the 16 spaces, evaluation's are
# empty, and the trailing spaces after "request." differ. Each ends with the indentation after "### Response:\n",
# which the training text follows directly with the answer. Written with explicit escapes so the bytes stay visible.
_INDENT = " " * 16
LLM_ADAPTERS_TRAIN_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n"
    "\n"
    f"{_INDENT}### Instruction:\n"
    f"{_INDENT}{{instruction}}\n"
    f"{_INDENT}\n"
    f"{_INDENT}### Response:\n"
    f"{_INDENT}"
)
"""LLM-Adapters' training prompt for examples without an input (finetune.py); the answer follows it directly."""

LLM_ADAPTERS_TRAIN_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n"
    "\n"
    f"{_INDENT}### Instruction:\n"
    f"{_INDENT}{{instruction}}\n"
    f"{_INDENT}\n"
    f"{_INDENT}### Input:\n"
    f"{_INDENT}{{input}}\n"
    f"{_INDENT}\n"
    f"{_INDENT}### Response:\n"
    f"{_INDENT}"
)
"""LLM-Adapters' training prompt for examples with an input (finetune.py)."""

LLM_ADAPTERS_EVAL_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n"
    "\n"
    f"{_INDENT}### Instruction:\n"
    f"{_INDENT}{{instruction}}\n"
    "\n"
    f"{_INDENT}### Response:\n"
    f"{_INDENT}"
)
"""LLM-Adapters' evaluation prompt for examples without an input (commonsense_evaluate.py)."""

LLM_ADAPTERS_EVAL_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n"
    "\n"
    f"{_INDENT}### Instruction:\n"
    f"{_INDENT}{{instruction}}\n"
    "\n"
    f"{_INDENT}### Input:\n"
    f"{_INDENT}{{input}}\n"
    "\n"
    f"{_INDENT}### Response:\n"
    f"{_INDENT}"
)
"""LLM-Adapters' evaluation prompt for examples with an input (commonsense_evaluate.py)."""

RESPONSE_MARKER = "### Response:"
"""The line every Alpaca-style prompt ends with before the response."""


def styled_prompt(style: str, instruction: str, input: Optional[str] = None, *, training: bool) -> str:
    """The prompt of `task.prompt_style` `style` for `instruction` (and `input` when non-empty): `clean` is
    `alpaca_prompt` whatever `training` says; `llm_adapters` is LLM-Adapters' training prompt when `training`, its
    evaluation prompt otherwise."""
    if style == "clean":
        return alpaca_prompt(instruction, input)
    if style != "llm_adapters":
        raise ValueError(f"unknown prompt style {style!r}; choose one of: {', '.join(PROMPT_STYLES)}")
    if training:
        template = LLM_ADAPTERS_TRAIN_PROMPT_WITH_INPUT if input else LLM_ADAPTERS_TRAIN_PROMPT
    else:
        template = LLM_ADAPTERS_EVAL_PROMPT_WITH_INPUT if input else LLM_ADAPTERS_EVAL_PROMPT
    return template.format(instruction=instruction, input=input or "")


def alpaca_prompt(instruction: str, input: Optional[str] = None) -> str:
    """The Alpaca prompt for `instruction` (and `input` when it is non-empty), ending in "### Response:\\n" so the
    model's continuation is the response. An empty input uses the no-input template, as Alpaca does."""
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT.format(instruction=instruction)


def prompt_response_features(prompt_ids: list[int], response_ids: list[int], max_length: int,
                             train_on_inputs: bool = False) -> dict[str, list[int]]:
    """`input_ids` (prompt then response, cut to `max_length`), `attention_mask`, and `labels`: the response's ids
    with IGNORE_INDEX on the prompt, or every id with `train_on_inputs` (the loss on the prompt too, as LLM-Adapters'
    finetune.py does by default)."""
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = list(input_ids) if train_on_inputs else ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def format_instruction_example(
    example: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, max_length: int, train_on_inputs: bool = False
) -> dict[str, list[int]]:
    """Training features for one example: `input_ids`, `attention_mask`, and `labels` equal to the input ids on the
    response tokens and IGNORE_INDEX on the prompt tokens (on every token with `train_on_inputs`).

    `example` holds either `instruction`, `output` and an optional `input` (Alpaca, LLM-Adapters), or `messages`, a
    list of {"role", "content"} whose last turn is the assistant's target; earlier turns are context without loss.
    The response ends in the tokenizer's EOS so the model learns to stop. With a chat template, the template's own
    end of turn is kept up to the first EOS (a trailing newline after it is never generated, so it is dropped), and
    EOS is appended only when the template does not emit one.

    Sequences longer than `max_length` are cut at the end: the prompt's start is kept, the response is shortened (and
    loses its EOS, since it did not end there). A prompt of `max_length` tokens or more leaves no labelled token; such
    an example carries no loss and callers may want to drop it."""
    if max_length < 1:
        raise ValueError(f"max_length={max_length}: use a positive number of tokens")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set one so the model can learn where a response ends")
    if tokenizer.chat_template is not None:
        prompt_ids, response_ids = _chat_template_ids(*_chat_turns(example), tokenizer)
        if eos in response_ids:
            response_ids = response_ids[: response_ids.index(eos) + 1]
        else:
            response_ids = response_ids + [eos]
    else:
        prompt, target = _alpaca_turn(example)
        prompt_ids = tokenizer(prompt)["input_ids"]
        response_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [eos]
    return prompt_response_features(prompt_ids, response_ids, max_length, train_on_inputs)


def _chat_turns(example: Mapping[str, Any]) -> tuple[list[dict[str, str]], str]:
    """(context messages, target response) of either layout; an instruction example becomes one user turn holding
    the instruction and, after a blank line, its input."""
    if "messages" in example:
        return _messages(example)
    instruction, input, output = _instruction_fields(example)
    user = f"{instruction}\n\n{input}" if input else instruction
    return [{"role": "user", "content": user}], output


def _alpaca_turn(example: Mapping[str, Any]) -> tuple[str, str]:
    """(Alpaca prompt, target response) of either layout. Alpaca has no slot for system prompts or earlier turns, so
    a chat example must be a single user turn and its answer rather than be flattened in some made-up way."""
    if "messages" not in example:
        instruction, input, output = _instruction_fields(example)
        return alpaca_prompt(instruction, input), output
    context, target = _messages(example)
    if len(context) != 1 or context[0]["role"] != "user":
        roles = [turn["role"] for turn in context]
        raise ValueError(
            f"without a chat template only one user turn before the answer is supported, got roles {roles}; "
            "set tokenizer.chat_template for system prompts and multi-turn conversations"
        )
    return alpaca_prompt(context[0]["content"]), target


def _instruction_fields(example: Mapping[str, Any]) -> tuple[str, str, str]:
    """(instruction, input or "", output) of an Alpaca-layout example, with the types checked."""
    missing = [field for field in ("instruction", "output") if not isinstance(example.get(field), str)]
    if missing:
        raise ValueError(
            f"example has no string {' / '.join(repr(f) for f in missing)}; an instruction example needs "
            "'instruction' and 'output' (and optionally 'input'), a chat example needs 'messages'"
        )
    input = example.get("input") or ""
    if not isinstance(input, str):
        raise ValueError(f"example 'input' must be a string, not {type(input).__name__}")
    return example["instruction"], input, example["output"]


def _messages(example: Mapping[str, Any]) -> tuple[list[dict[str, str]], str]:
    """(context turns, last assistant content) of a chat example, with the layout checked."""
    messages = example["messages"]
    if not isinstance(messages, Sequence) or isinstance(messages, str) or len(messages) < 2:
        raise ValueError("'messages' must be a list of at least two {'role', 'content'} turns")
    for i, turn in enumerate(messages):
        if not isinstance(turn, Mapping) or not all(isinstance(turn.get(key), str) for key in ("role", "content")):
            raise ValueError(f"messages[{i}] must be a mapping with string 'role' and 'content'")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"the last message is the target and must be the assistant's, not '{messages[-1]['role']}'")
    return [{"role": turn["role"], "content": turn["content"]} for turn in messages[:-1]], messages[-1]["content"]


def _chat_template_ids(
    context: list[dict[str, str]], target: str, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    """Prompt and response token ids under the tokenizer's chat template. The prompt is the context rendered with the
    generation prompt (exactly what inference feeds the model); the response is what the full conversation adds to
    it. Templates write their own BOS, so no special tokens are added when tokenizing."""
    prompt = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(context + [{"role": "assistant", "content": target}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(
            "the chat template renders the conversation differently from its generation prompt, so the response "
            "cannot be separated from the prompt; use a template whose rendering extends the generation prompt"
        )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    return prompt_ids, response_ids


def generation_prompt(example: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> tuple[str, bool]:
    """The text a model is prompted with for `example` (the same prompt `format_instruction_example` trains on, its
    response left out), and whether tokenizing it should add special tokens (chat templates write their own).

    Test rows need no response: an instruction row may lack `output`, and a chat row may end with the user's turn
    (then every message is context) as well as with the reference answer (then the last turn is dropped)."""
    context = prompt_messages(example)
    if context is None:
        instruction, input, _ = _instruction_fields({**example, "output": example.get("output") or ""})
        if tokenizer.chat_template is not None:
            user = f"{instruction}\n\n{input}" if input else instruction
            return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                 add_generation_prompt=True), False
        return alpaca_prompt(instruction, input), True
    if tokenizer.chat_template is not None:
        return tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True), False
    if len(context) != 1 or context[0]["role"] != "user":
        raise ValueError(
            f"without a chat template only one user turn is supported as a prompt, got roles "
            f"{[turn['role'] for turn in context]}; set tokenizer.chat_template for system prompts and multi-turn "
            "conversations"
        )
    return alpaca_prompt(context[0]["content"]), True


def prompt_messages(example: Mapping[str, Any]) -> Optional[list[dict[str, str]]]:
    """The context turns of a chat example (`messages` without a final assistant answer), or None for an
    instruction example."""
    if "messages" not in example:
        return None
    messages = example["messages"]
    if isinstance(messages, Sequence) and not isinstance(messages, str) and messages and isinstance(
            messages[-1], Mapping) and messages[-1].get("role") != "assistant":
        messages = [*messages, {"role": "assistant", "content": ""}]  # validated like a training example
    return _messages({"messages": messages})[0]


def prompt_text(example: Mapping[str, Any]) -> str:
    """What a judge is shown as the instruction of `example`: the instruction (and its input after a blank line),
    or the last user turn of a chat example."""
    context = prompt_messages(example)
    if context is None:
        instruction, input, _ = _instruction_fields({**example, "output": example.get("output") or ""})
        return f"{instruction}\n\n{input}" if input else instruction
    users = [turn["content"] for turn in context if turn["role"] == "user"]
    return users[-1] if users else context[-1]["content"]


def reference_answer(example: Mapping[str, Any]) -> Optional[str]:
    """The example's reference response (`output`, or a chat example's final assistant turn), None when absent."""
    if "messages" in example:
        messages = example["messages"]
        last = messages[-1] if isinstance(messages, Sequence) and messages else None
        return last.get("content") if isinstance(last, Mapping) and last.get("role") == "assistant" else None
    output = example.get("output")
    return output if isinstance(output, str) and output else None


def conversation_prompt(turns: Sequence[Mapping[str, str]], tokenizer: PreTrainedTokenizerBase) -> tuple[str, bool]:
    """The prompt for the next assistant turn of a conversation (MT-Bench's second question). Without a chat
    template the earlier exchange goes into the Alpaca prompt's input."""
    if tokenizer.chat_template is not None:
        return tokenizer.apply_chat_template(list(turns), tokenize=False, add_generation_prompt=True), False
    history = "\n\n".join(f"{turn['role']}: {turn['content']}" for turn in turns[:-1])
    return alpaca_prompt(turns[-1]["content"], f"Earlier in this conversation:\n{history}" if history else None), True
