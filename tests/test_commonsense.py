"""The LLM-Adapters commonsense protocol: answer extraction, accuracy, prompt, file loading and the results table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kasa.data.errors import DataError
from kasa.data.files import load_commonsense_file
from kasa.data.prompts import styled_prompt
from kasa.evaluation.commonsense import (
    COMMONSENSE_TASKS,
    accuracy,
    alpaca_prompt,
    extract_answer,
    llm_adapters_response,
    results_table,
)

SHARED_COMMONSENSE = Path(__file__).resolve().parents[2] / "shared" / "data" / "commonsense"


@pytest.mark.parametrize("task, text, expected", [
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "false. It is not true that ...", "false"),  # first mention wins
    ("boolq", "The correct answer is True", None),  # case-sensitive, as LLM-Adapters
    ("boolq", "yes", None),
    ("piqa", "the correct answer is solution2", "solution2"),
    ("piqa", "Solution1 looks right but solution2 is", "solution2"),
    ("social_i_qa", "the correct answer is answer3", "answer3"),
    ("social_i_qa", "answer2 or answer1", "answer2"),
    ("hellaswag", "the correct answer is ending4", "ending4"),
    ("hellaswag", "the correct answer is ending5", None),
    ("winogrande", "the correct answer is option1", "option1"),
    ("winogrande", "the correct answer is option3", None),
    ("ARC-Easy", "the correct answer is answer5", "answer5"),
    ("ARC-Challenge", "Answer4 ... so answer1", "answer1"),
    ("openbookqa", "I am not sure.", None),
    ("openbookqa", "the correct answer isanswer2!", "answer2"),  # unanchored, as LLM-Adapters
])
def test_extract_answer(task, text, expected):
    assert extract_answer(task, text) == expected


def test_tasks_and_unknown_task():
    assert COMMONSENSE_TASKS == ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy",
                                 "ARC-Challenge", "openbookqa")
    with pytest.raises(ValueError, match="unknown commonsense task 'arc_easy'"):
        extract_answer("arc_easy", "answer1")


def test_accuracy_counts_no_match_as_wrong():
    generations = ["the correct answer is answer1", "answer2", "no idea", "Answer3", "answer4 answer3"]
    answers = ["answer1", "answer2", "answer3", "answer3", "answer3"]
    assert accuracy("ARC-Easy", generations, answers) == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="2 generations for 1 answers"):
        accuracy("boolq", ["true", "false"], ["true"])
    with pytest.raises(ValueError, match="empty"):
        accuracy("boolq", [], [])


def test_alpaca_prompt_text():
    assert alpaca_prompt("Pick one.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nPick one.\n\n### Response:\n"
    )
    assert alpaca_prompt("Pick one.", "") == alpaca_prompt("Pick one.")
    assert alpaca_prompt("Pick one {x}.", "a or b") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\nPick one {x}.\n\n### Input:\na or b"
        "\n\n### Response:\n"
    )


def test_load_commonsense_file(tmp_path):
    rows = [
        {"instruction": "Q1? Answer format: true/false", "input": "", "output": "the correct answer is true",
         "answer": "true"},
        {"instruction": "Q2? Answer format: true/false", "output": "the correct answer is false", "answer": "false"},
    ]
    path = tmp_path / "test.json"
    path.write_text(json.dumps(rows))
    loaded = load_commonsense_file(path)
    assert [row["answer"] for row in loaded] == ["true", "false"] and loaded[1]["input"] == ""
    assert accuracy("boolq", [row["output"] for row in loaded], [row["answer"] for row in loaded]) == 1.0


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[]", "non-empty JSON list"),
    ('{"instruction": "q"}', "non-empty JSON list"),
    ('["q"]', "row 0 is a str"),
    ('[{"instruction": "q", "output": "o", "answer": "a"}, {"instruction": "q", "output": "o"}]', "row 1 .*answer"),
    ('[{"instruction": "q", "output": "o", "answer": "a", "input": 3}]', "non-string 'input'"),
    ('{"instruction": "q", "output": "o", "answer": "a"}\n{"instruction": "r", "output": "o", "answer": "a"}\n',
     "it looks like JSON lines, one object per line: write one JSON list"),
    ("", "the file is empty: an LLM-Adapters file is one JSON list"),
])
def test_load_commonsense_file_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_commonsense_file(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_commonsense_file(tmp_path / "boolq" / "test.json")


def test_results_table():
    table = results_table({"piqa": 0.8, "boolq": 0.7, "openbookqa": 0.9})
    assert table.splitlines() == [
        "| BoolQ | PIQA | OBQA | Average |",
        "|---:|---:|---:|---:|",
        "| 70.0 | 80.0 | 90.0 | 80.0 |",
    ]
    full = results_table({task: 0.5 for task in COMMONSENSE_TASKS})
    assert full.splitlines()[0] == (
        "| BoolQ | PIQA | SIQA | HellaSwag | WinoGrande | ARC-e | ARC-c | OBQA | Average |"
    )
    with pytest.raises(ValueError, match="fractions"):
        results_table({"boolq": 73.6})
    with pytest.raises(ValueError, match="unknown"):
        results_table({"mmlu": 0.5})
    with pytest.raises(ValueError):
        results_table({})


@pytest.mark.skipif(not SHARED_COMMONSENSE.is_dir(), reason="shared commonsense data not available")
def test_gold_outputs_contain_their_answers():
    """The gold outputs ("the correct answer is answer3") must extract to the gold answer: checks the patterns
    against every real test row of the LLM-Adapters files."""
    checked = 0
    for task in COMMONSENSE_TASKS:
        path = SHARED_COMMONSENSE / task / "test.json"
        if not path.is_file():
            continue
        rows = load_commonsense_file(path)
        hits = sum(extract_answer(task, row["output"]) == row["answer"] for row in rows)
        assert hits >= 0.99 * len(rows), f"{task}: {hits}/{len(rows)}"
        checked += 1
    assert checked >= 7


def test_llm_adapters_response_keeps_what_follows_the_prompts_marker():
    # LLM-Adapters: decode prompt + generation, keep text.split("### Response:")[1].strip()
    prompt = styled_prompt("llm_adapters", "Is it? Answer format: true/false", training=False)
    assert llm_adapters_response(prompt, "the correct answer is true") == "the correct answer is true"
    # a marker the model generates ends the answer: "false" after it is not read
    generation = "the correct answer is true\n\n### Instruction:\nAgain?\n\n### Response:\nfalse"
    assert llm_adapters_response(prompt, generation) == "the correct answer is true\n\n### Instruction:\nAgain?"
    assert extract_answer("boolq", llm_adapters_response(prompt, "### Response: false")) is None
    assert extract_answer("boolq", "### Response: false") == "false"  # what the clean style reads


def byte_tokenizer():
    """A byte-level tokenizer that decodes back to the exact text (spaces and newlines included), with EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(["the correct answer is true"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="</s>")


@pytest.mark.parametrize("style", ["llm_adapters", "clean"])
def test_commonsense_task_trains_and_evaluates_in_its_prompt_style(tmp_path, style):
    from types import SimpleNamespace

    from kasa.config import ModelConfig, RunConfig, TaskConfig
    from kasa.tasks.commonsense import CommonsenseTask

    row = {"instruction": "Is it? Answer format: true/false", "input": "", "output": "the correct answer is true",
           "answer": "true"}
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "test.json").write_text(json.dumps([row, {**row, "answer": "false"}]))
    (tmp_path / "train.json").write_text(json.dumps([row]))
    cfg = RunConfig(model=ModelConfig(name="tiny"), output_dir=str(tmp_path / "run"), task=TaskConfig(
        name="commonsense", kind="commonsense", data_dir=str(tmp_path), train_split="train", eval_split="test",
        metric="average", eval_sets=["boolq"], prompt_style=style))
    task, tokenizer = CommonsenseTask(cfg), byte_tokenizer()

    features = task.train_dataset(tokenizer)[0]
    train_prompt = styled_prompt(style, row["instruction"], training=True)
    # the model is trained on the training prompt's bytes followed directly by the answer and EOS, loss on the answer
    assert tokenizer.decode(features["input_ids"]) == train_prompt + row["output"] + "</s>"
    answer_ids = [t for t, label in zip(features["input_ids"], features["labels"]) if label != -100]
    assert tokenizer.decode(answer_ids) == row["output"] + "</s>"
    cfg.task.train_on_inputs = True  # the loss on the prompt too, as LLM-Adapters' finetune.py by default
    every = CommonsenseTask(cfg).train_dataset(tokenizer)[0]
    assert every["input_ids"] == features["input_ids"] == every["labels"]

    seen = []

    def generate(model, accelerator, tokenizer, prompts):
        seen.extend(prompts)
        return [["I think\n\n### Response:\nthe correct answer is false"] for _ in prompts]

    task.generate = generate
    metrics = task.evaluate(None, SimpleNamespace(is_main_process=True), tokenizer, "test", None)
    assert seen == [styled_prompt(style, row["instruction"], training=False)] * 2
    if style == "llm_adapters":
        assert seen[0] == LLM_ADAPTERS_EVAL_PROMPT  # the evaluation prompt, not the training one
        assert metrics == {"boolq": 0.0, "average": 0.0}  # "I think": cut at the generated marker, no keyword
    else:
        assert seen[0] == alpaca_prompt(row["instruction"])
        assert metrics == {"boolq": 0.5, "average": 0.5}  # the whole generation: "false", right for row 2


LLM_ADAPTERS_EVAL_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n"
    "\n"
    "                ### Instruction:\n"
    "                Is it? Answer format: true/false\n"
    "\n"
    "                ### Response:\n"
    "                "
)


def test_an_answer_outside_the_tasks_keywords_is_refused():
    """A test row answered "Yes" for boolq was taken and could never be scored correct."""
    from kasa.data.errors import DataError
    from kasa.evaluation.commonsense import check_answers

    check_answers("boolq", ["true", "false"], "boolq/test.json")
    check_answers("ARC-Easy", ["answer1", "answer5"], "ARC-Easy/test.json")
    with pytest.raises(DataError, match=r"boolq/test.json: row 1 has answer 'Yes', which is none of boolq's answers "
                                        r"\(true, false\)"):
        check_answers("boolq", ["true", "Yes"], "boolq/test.json")
    with pytest.raises(DataError, match="row 0 has answer 'solution1 '"):
        check_answers("piqa", ["solution1 "], "piqa/test.json")


def test_the_evaluated_files_are_named_with_the_setting_that_chose_them(tmp_path):
    """A data_dir that is a file, and an eval split without its file: named as the settings the user wrote."""
    from kasa.config import RunConfig
    from kasa.tasks import build_task

    cfg = RunConfig()
    cfg.task.kind, cfg.task.eval_sets = "commonsense", ["boolq"]
    cfg.task.data_dir = str(tmp_path / "a-file.json")
    (tmp_path / "a-file.json").write_text("[]")
    with pytest.raises(DataError, match=r"task.data_dir=.*a-file.json is not a folder"):
        build_task(cfg).check_evaluation("test")
    cfg.task.data_dir = str(tmp_path)
    with pytest.raises(DataError, match=r"boolq/nosuch.json does not exist: the evaluated split is 'nosuch' "
                                        r"\(task.eval_split, kasa-eval's split=\)"):
        build_task(cfg).check_evaluation("nosuch")
