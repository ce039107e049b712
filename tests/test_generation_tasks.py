"""The generation tasks end to end through the real commands: kasa-train then kasa-eval for E2E (a tiny GPT-2 with
KaSA on q and v of its fused c_attn, data in the official CSV layout), commonsense (a tiny LLaMA, two test sets in
the LLM-Adapters layout) and instruction following (the tiny LLaMA with a chat template, judged by a real
chat-completions server started here on 127.0.0.1; kasa-eval also answers MT-Bench-style two-turn questions).
Models and tokenizers are built from configs, data is written by the tests: offline.

The CLI runs are slow to start (torch, the METEOR jar for E2E), so the three trainings run at once, then the
evaluations, all from one module fixture; the tests below only read what they wrote. Fast in-process checks of the
pieces (loss, data files, prompts) follow."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from chat_server import ChatServer, answer, closed_base_url, error
from cli_helpers import run_cli
from kasa.data.errors import DataError
from kasa.data.prompts import IGNORE_INDEX, generation_prompt, prompt_text, reference_answer, styled_prompt
from kasa.data.sources import find_split_file, local_split_file, split_label

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
KEY_ENV = "KASA_TEST_GENERATION_JUDGE_KEY"
REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-generation-tasks-test"
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the E2E metrics (METEOR) need Java")

# ---------------------------------------------------------------------------------------------------------------
# Data the tests write

E2E_ROWS = [
    ("name[The Eagle], eatType[coffee shop], food[French]", "The Eagle is a coffee shop serving French food."),
    ("name[The Eagle], eatType[coffee shop], food[French]", "French food is served at The Eagle coffee shop."),
    ("name[The Mill], area[riverside], priceRange[cheap]", "The Mill is a cheap place by the riverside."),
    ("name[The Mill], area[riverside], priceRange[cheap]", "By the riverside, The Mill offers cheap meals."),
    ("name[Aromi], eatType[pub], customer rating[high]", "Aromi is a pub with a high customer rating."),
    ("name[Zizzi], food[Italian], area[city centre]", "Zizzi serves Italian food in the city centre."),
]
E2E_TEST = [
    ("name[The Eagle], eatType[pub], food[Italian]", "The Eagle is a pub serving Italian food."),
    ("name[The Eagle], eatType[pub], food[Italian]", "Italian food is served at The Eagle pub."),
    ("name[Aromi], area[riverside], priceRange[cheap]", "Aromi is a cheap place by the riverside."),
]


def commonsense_row(task: str, question: str, answer: str) -> dict[str, str]:
    choices = {"boolq": "true/false", "piqa": "solution1/solution2"}[task]
    return {"instruction": f"Please answer the following question with {choices}.\n\nQuestion: {question}\n\n"
                           f"Answer format: {choices}",
            "input": "", "output": f"the correct answer is {answer}", "answer": answer}


BOOLQ = [commonsense_row("boolq", q, "true") for q in ("is the sky blue", "is water wet", "do birds fly",
                                                         "is fire hot", "is ice cold", "is grass green")]
PIQA = [commonsense_row("piqa", q, "solution1") for q in ("to open a jar, solution1: twist the lid "
                                                          "solution2: eat the lid", "to dry hands, solution1: "
                                                          "use a towel solution2: use water")]

INSTRUCTION_TRAIN = [
    {"instruction": "Summarize the text.", "input": "The cat sat on the mat all day.", "output": "A cat rested."},
    {"instruction": "Classify the sentiment: I love it.", "output": "positive"},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Write a Python function that adds two numbers."},
                  {"role": "assistant", "content": "def add(a, b):\n    return a + b"}]},
    {"messages": [{"role": "user", "content": "What colour is the sky?"},
                  {"role": "assistant", "content": "Blue."}]},
]
INSTRUCTION_TEST = [
    {"instruction": "Summarize the text.", "input": "Dogs bark at night.", "output": "Dogs are loud."},
    {"messages": [{"role": "user", "content": "Classify the sentiment: I hate rain."}]},  # prompt only
]
MT_BENCH = [
    {"question_id": 81, "category": "writing", "turns": ["Write a short poem about tea.", "Now make it rhyme."]},
    {"question_id": 111, "category": "math", "turns": ["What is 2 + 2?", "And times 3?"],
     "reference": ["4", "12"]},
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def corpus() -> list[str]:
    texts = [f"{mr} || {ref}" for mr, ref in E2E_ROWS + E2E_TEST]
    texts += [r["instruction"] + " " + r["output"] for r in BOOLQ + PIQA]
    texts += [json.dumps(r) for r in INSTRUCTION_TRAIN + INSTRUCTION_TEST + MT_BENCH]
    texts.append("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request. ### Instruction: ### Input: ### Response:")
    # the commonsense task's LLM-Adapters prompts, so that their runs of indentation become single tokens
    texts += [styled_prompt("llm_adapters", r["instruction"], training=training) for r in BOOLQ for training in
              (True, False)]
    return texts * 3


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, quoting=csv.QUOTE_ALL)
        writer.writerow(["mr", "ref"])
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------------------------------
# Tiny models and tokenizers, built from configs


def build_tokenizer(eos: str, bos: str | None = None, chat_template: str | None = None):
    """A byte-level BPE tokenizer trained on the tests' own text (so tokens are not all single bytes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<s>", "</s>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, bos_token=bos)
    if chat_template:
        fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = build_tokenizer(eos="<|endoftext|>")  # like GPT-2: no pad token (the task pads with EOS)
    tokenizer.save_pretrained(folder)
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer(eos="</s>", bos="<s>", chat_template=CHAT_TEMPLATE)
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("generation-data")
    e2e = root / "e2e"
    e2e.mkdir()
    write_csv(e2e / "devset.csv", E2E_ROWS)  # trained on with task.train_split=devset, as the shared data has no train
    write_csv(e2e / "testset_w_refs.csv", E2E_TEST)
    commonsense = root / "commonsense"
    for name, rows in (("boolq", BOOLQ), ("piqa", PIQA)):
        (commonsense / name).mkdir(parents=True)
        (commonsense / name / "test.json").write_text(json.dumps(rows[:3]))
    (commonsense / "commonsense_170k.json").write_text(json.dumps(BOOLQ + PIQA))
    instruction = root / "instruction"
    instruction.mkdir()
    (instruction / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in INSTRUCTION_TRAIN))
    (instruction / "test.json").write_text(json.dumps(INSTRUCTION_TEST))
    (instruction / "mt_bench").mkdir()  # the shipped recipes' layout: task.eval_split=mt_bench/question.jsonl
    (instruction / "mt_bench" / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in MT_BENCH))
    return {"e2e": e2e, "commonsense": commonsense, "instruction": instruction}


# ---------------------------------------------------------------------------------------------------------------
# The judge: a chat-completions endpoint on 127.0.0.1 whose score is a function of the prompt


def scripted_score(prompt: str) -> int:
    return 1 + sum(prompt.encode()) % 10


def scripted_answer(number: int, body: dict) -> dict:
    return answer(json.dumps({"score": scripted_score(body["messages"][-1]["content"]), "justification": "scripted"}))


# ---------------------------------------------------------------------------------------------------------------
# The CLI runs


def common_args(run_dir: Path) -> list[str]:
    return [f"hydra.run.dir={run_dir}", "method.svd_cache_dir=null", "logging.progress=false", "trainer.log_every=1",
            "trainer.max_length=96", "trainer.batch_size=4", "trainer.warmup_steps=0", "trainer.warmup_ratio=0.0"]


def run_all(commands: dict[str, list[str]], env: dict[str, str]) -> dict[str, subprocess.CompletedProcess]:
    """Run the commands in-process, one after the other; their results by name."""
    return {name: run_cli(*args, env=env) for name, args in commands.items()}


@pytest.fixture(scope="module")
def runs(tiny_gpt2, tiny_llama, data, tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("generation-runs")
    judge = ChatServer(scripted_answer)
    env = {**ENV, KEY_ENV: SECRET}
    judge_args = [f"task.judge.base_url={judge.base_url}", "task.judge.model=scripted-judge",
                  f"task.judge.api_key_env={KEY_ENV}", "task.judge.max_retries=0"]
    dirs = {name: root / name for name in ("e2e", "commonsense", "instruction")}
    train = {
        "e2e": ["kasa.cli.train", "model=gpt2_medium", "task=e2e", f"model.path={tiny_gpt2}",
                f"task.data_dir={data['e2e']}", "task.train_split=devset", "method.rank=4", "method.alpha=32",
                "method.dropout=0.1", "trainer.epochs=2", "trainer.lr=1e-2", "trainer.label_smoothing=0.1",
                "trainer.evaluate_every_epoch=false", "task.generation.num_beams=2",
                "task.generation.max_new_tokens=12", *common_args(dirs["e2e"])],
        "commonsense": ["kasa.cli.train", "model=llama2_7b", "task=commonsense", f"model.path={tiny_llama}",
                        "model.dtype=float32", "model.gradient_checkpointing=false",
                        "model.target_modules=[q_proj,k_proj,v_proj,up_proj,down_proj]",
                        f"task.data_dir={data['commonsense']}", "task.eval_sets=[boolq,piqa]", "method.rank=4",
                        "method.alpha=8", "trainer.epochs=2", "trainer.lr=2e-2", "task.generation.num_beams=1",
                        "task.generation.max_new_tokens=8", *common_args(dirs["commonsense"])],
        "instruction": ["kasa.cli.train", "model=llama3_8b", "task=instruction/coding", f"model.path={tiny_llama}",
                        "model.dtype=float32", "model.gradient_checkpointing=true",
                        f"task.data_dir={data['instruction']}",
                        "task.train_split=train", "task.eval_split=test", "method.rank=4", "trainer.epochs=1",
                        "trainer.lr=1e-2", "task.generation.num_beams=2", "task.generation.num_return_sequences=2",
                        "task.generation.max_new_tokens=6", "task.generation.no_repeat_ngram_size=0",
                        *judge_args, *common_args(dirs["instruction"])],
    }
    try:
        trained = run_all(train, env)
        # kasa-eval on each checkpoint; the instruction one answers the MT-Bench-style question file instead.
        evaluate = {name: ["kasa.cli.evaluate", f"checkpoint={dirs[name]}"] for name in ("e2e", "commonsense")}
        evaluate["mt_bench"] = ["kasa.cli.evaluate", f"checkpoint={dirs['instruction']}",
                                "split=mt_bench/question.jsonl"]
        evaluated = run_all(evaluate, env)
    finally:
        judge.stop()
    return {"dirs": dirs, "train": trained, "eval": evaluated, "judge": judge}


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-4000:]


def summary_of(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def eval_report(result: subprocess.CompletedProcess) -> dict[str, Any]:
    ok(result)
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# End-to-end tests


@needs_java
def test_e2e_trains_generates_and_scores(runs):
    ok(runs["train"]["e2e"])
    run_dir = runs["dirs"]["e2e"]
    summary = summary_of(run_dir)
    assert summary["task"] == "e2e" and summary["metric"] == "BLEU" and summary["method"] == "kasa"
    # r = 4 KaSA blocks on q and v (32 x 32 slices of the fused c_attn) in 2 layers: 4 * (2 * 32 * 4 + 4)
    assert summary["trainable_params_without_head"] == 4 * (2 * 32 * 4 + 4)
    assert summary["epochs_run"] == 2 and summary["steps"] == 4  # 6 pairs, batch 4: 2 steps an epoch
    [evaluation] = summary["eval_history"]  # evaluate_every_epoch=false: once, after the last epoch
    assert {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"} <= set(evaluation) and evaluation["split"] == "test"
    assert summary["best"] == pytest.approx(evaluation["BLEU"]) and 0.0 <= summary["best"] <= 1.0
    generations = run_dir / "generations" / "epoch-2"  # each evaluation's outputs kept, named by its epoch
    predictions = (generations / "e2e-test-predictions.txt").read_text().splitlines()
    assert len(predictions) == 2  # one output per distinct MR
    references = (generations / "e2e-test-references.txt").read_text().strip().split("\n\n")
    assert [group.splitlines() for group in references] == [[E2E_TEST[0][1], E2E_TEST[1][1]], [E2E_TEST[2][1]]]
    assert (generations / "e2e-test-mrs.txt").read_text().splitlines() == [E2E_TEST[0][0], E2E_TEST[2][0]]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["task_loss"] < 50 and r["l3"] >= 0 for r in records if r["type"] == "train")
    assert (run_dir / "checkpoints" / "best" / "adapter_model.safetensors").is_file()


@needs_java
def test_e2e_kasa_eval_reproduces_the_score(runs):
    report = eval_report(runs["eval"]["e2e"])
    summary = summary_of(runs["dirs"]["e2e"])
    assert report["split"] == "test" and report["metric"] == "BLEU"
    assert report["score"] == pytest.approx(summary["best"], abs=1e-9)
    assert report["metrics"]["CIDEr"] == pytest.approx(summary["eval_history"][0]["CIDEr"], abs=1e-9)
    checkpoint = runs["dirs"]["e2e"] / "checkpoints" / "best"
    assert (checkpoint / "eval_test.json").is_file()
    assert (checkpoint / "generations" / "e2e-test-predictions.txt").read_text() == (
        runs["dirs"]["e2e"] / "generations" / "epoch-2" / "e2e-test-predictions.txt").read_text()


def test_commonsense_trains_and_scores_every_set(runs):
    ok(runs["train"]["commonsense"])
    run_dir = runs["dirs"]["commonsense"]
    summary = summary_of(run_dir)
    assert summary["metric"] == "average"
    # KaSA r = 4 on q (32x32), k and v (16x32: 2 KV heads of 8), up (64x32) and down (32x64), 2 layers:
    # each block r * (n + m + 1)
    per_layer = sum(4 * (n + m + 1) for n, m in ((32, 32), (16, 32), (16, 32), (64, 32), (32, 64)))
    assert summary["trainable_params_without_head"] == 2 * per_layer
    assert [r["epoch"] for r in summary["eval_history"]] == [1, 2]  # evaluate_every_epoch: true by default
    last = summary["eval_history"][-1]
    assert set(last) >= {"boolq", "piqa", "average"}
    assert last["average"] == pytest.approx((last["boolq"] + last["piqa"]) / 2)
    for name, rows in (("boolq", BOOLQ[:3]), ("piqa", PIQA[:3])):
        lines = (run_dir / "generations" / "epoch-2" / f"commonsense-{name}-test.jsonl").read_text().splitlines()
        saved = [json.loads(line) for line in lines]
        assert [s["answer"] for s in saved] == [r["answer"] for r in rows]
        assert all(set(s) == {"instruction", "generation", "predicted", "answer", "correct"} for s in saved)
        assert last[name] == pytest.approx(sum(s["correct"] for s in saved) / len(saved))
    table = (run_dir / "generations" / "epoch-2" / "commonsense-test-table.md").read_text()
    assert (run_dir / "generations" / "epoch-1" / "commonsense-test-table.md").is_file()  # epoch 1's kept
    assert "| BoolQ | PIQA | Average |" in table


def test_commonsense_kasa_eval_reproduces_the_score(runs):
    report = eval_report(runs["eval"]["commonsense"])
    summary = summary_of(runs["dirs"]["commonsense"])
    assert report["metric"] == "average" and report["score"] == pytest.approx(summary["best"], abs=1e-9)
    assert report["reported_in_training"] == pytest.approx(summary["best"], abs=1e-9)


def test_instruction_trains_and_is_judged(runs):
    ok(runs["train"]["instruction"])
    run_dir = runs["dirs"]["instruction"]
    summary = summary_of(run_dir)
    assert summary["metric"] == "judge_score" and 1.0 <= summary["best"] <= 10.0
    saved = run_dir / "generations" / "epoch-1" / "instruction-test.jsonl"
    records = [json.loads(line) for line in saved.read_text().splitlines()]
    assert len(records) == 2 and all(len(r["responses"]) == 2 and len(r["scores"]) == 2 for r in records)
    assert records[0]["instruction"] == "Summarize the text.\n\nDogs bark at night."
    assert records[0]["reference"] == "Dogs are loud." and records[1]["reference"] is None
    assert records[1]["instruction"] == "Classify the sentiment: I hate rain."
    scores = [s for r in records for s in r["scores"]]
    assert summary["best"] == pytest.approx(sum(scores) / len(scores))
    # The judge saw the figure 7 prompt with each response, and the key from the environment.
    judged = [r for r in runs["judge"].requests if r["body"]["model"] == "scripted-judge"]
    assert all(r["path"] == "/v1/chat/completions" and r["headers"]["Authorization"] == f"Bearer {SECRET}"
               for r in judged)
    prompts = [r["body"]["messages"][0]["content"] for r in judged]
    for record in records:
        for response, score in zip(record["responses"], record["scores"]):
            shown = f"Instruction:\n{record['instruction']}\n\nResponse:\n{response}\n\n"
            matching = [p for p in prompts if shown in p]
            assert matching and score == scripted_score(matching[0])


def test_instruction_kasa_eval_answers_mt_bench(runs):
    mt_bench = eval_report(runs["eval"]["mt_bench"])
    assert mt_bench["split"] == "mt_bench/question.jsonl" and mt_bench["metric"] == "judge_score"
    assert 1.0 <= mt_bench["score"] <= 10.0
    # a split given as a path is filed under one name beside the others (it was pasted into a path: lost outputs)
    best = runs["dirs"]["instruction"] / "checkpoints" / "best"
    assert json.loads((best / "eval_mt_bench-question.json").read_text())["score"] == mt_bench["score"]
    saved = best / "generations" / "instruction-mt_bench-question.jsonl"
    records = [json.loads(line) for line in saved.read_text().splitlines()]
    assert [r["question_id"] for r in records] == [81, 111]
    assert all(len(r["responses"]) == 2 and len(r["scores"]) == 2 for r in records)
    assert mt_bench["score"] == pytest.approx(sum(sum(r["scores"]) for r in records) / 4)
    # The second turn was judged with the conversation so far; math got its reference answer.
    prompts = [r["body"]["messages"][0]["content"] for r in runs["judge"].requests]
    assert any("This is a follow-up in a conversation" in p and "Now make it rhyme." in p for p in prompts)
    assert any("Reference Response" in p and "And times 3?" in p and "\n12\n" in p for p in prompts)


def judge_failing_at(request: int) -> ChatServer:
    """The scripted judge, but its `request`-th request (counted from 1) gets an HTTP 500."""
    return ChatServer(lambda number, body: error(500) if number == request else scripted_answer(number, body))


def saved_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_kasa_eval_keeps_what_judging_did_and_its_rerun_judges_only_the_rest(runs, tmp_path):
    """Judging fails at the third of four requests (two rows, two responses each): the responses and the first
    row's scores stay saved; kasa-eval run again reuses them, generating nothing, and asks only for the rest."""
    run_dir = tmp_path / "run"
    shutil.copytree(runs["dirs"]["instruction"], run_dir)
    judge = judge_failing_at(3)
    args = [f"checkpoint={run_dir}", f"task.judge.base_url={judge.base_url}", "task.judge.concurrency=1"]
    env = {**ENV, KEY_ENV: SECRET}
    try:
        failed = run_cli("kasa.cli.evaluate", *args, env=env)
        step = json.loads((run_dir / "checkpoints" / "best" / "trainer_state.json").read_text())["step"]
        saved = run_dir / "evaluations" / f"best-step-{step:08d}" / "test" / "generations" / "instruction-test.jsonl"
        assert failed.returncode == 2
        assert failed.stderr.strip().splitlines()[-1].startswith(
            f"error: judging failed (the responses are in {saved}): row 1: item 0: ")
        records = saved_records(saved)
        assert len(records) == len(INSTRUCTION_TEST) and all(len(r["responses"]) == 2 for r in records)
        assert len(records[0]["scores"]) == 2 and "scores" not in records[1]

        again = run_cli("kasa.cli.evaluate", *args, env=env)
    finally:
        judge.stop()
    report = eval_report(again)
    assert f"reusing the responses in {saved}" in again.stdout
    assert len(judge.requests) == 5  # 2 + the failed one, then only the second row's 2
    rerun = saved_records(run_dir / "checkpoints" / "best" / "generations" / "instruction-test.jsonl")
    assert [r["responses"] for r in rerun] == [r["responses"] for r in records]
    assert rerun[0]["scores"] == records[0]["scores"]
    assert report["score"] == pytest.approx(summary_of(run_dir)["best"])  # the training run's own evaluation


@pytest.mark.parametrize("concurrency", [1, 2])
def test_the_judge_scores_rows_concurrently(runs, tmp_path, concurrency):
    """task.judge.concurrency rows are judged at once (a row's responses one after the other), and the scores do not
    depend on it."""
    lock, in_flight, most = threading.Lock(), [0], [0]

    def slow_answer(number: int, body: dict) -> dict:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.3)  # long enough for the other row's request to arrive meanwhile
        with lock:
            in_flight[0] -= 1
        return scripted_answer(number, body)

    run_dir = tmp_path / "run"
    shutil.copytree(runs["dirs"]["instruction"], run_dir)
    judge = ChatServer(slow_answer)
    try:
        report = eval_report(run_cli("kasa.cli.evaluate", f"checkpoint={run_dir}",
                                     f"task.judge.base_url={judge.base_url}", f"task.judge.concurrency={concurrency}",
                                     env={**ENV, KEY_ENV: SECRET}))
    finally:
        judge.stop()
    assert most[0] == concurrency and len(judge.requests) == 4
    assert report["score"] == pytest.approx(summary_of(run_dir)["best"])


def test_no_row_is_sent_after_a_row_failed(data, monkeypatch):
    """A worker whose row failed used to take the next queued row before the main thread cancelled the queue: one
    more request per failure. The judge fails at its first request; with one worker, nothing else is sent."""
    from kasa.config import RunConfig
    from kasa.tasks import build_task

    monkeypatch.setenv(KEY_ENV, SECRET)
    judge = judge_failing_at(1)
    cfg = RunConfig()
    cfg.task.kind, cfg.task.data_dir = "instruction", str(data["instruction"])
    cfg.task.judge.base_url, cfg.task.judge.api_key_env = judge.base_url, KEY_ENV
    cfg.task.judge.max_retries, cfg.task.judge.concurrency = 0, 1
    records = [{"instruction": f"say {i}", "responses": [f"{i}"]} for i in range(6)]
    try:
        with pytest.raises(ValueError, match="judging failed: row 0"):
            build_task(cfg)._judge_all(records, None)
    finally:
        judge.stop()
    assert len(judge.requests) == 1 and not any("scores" in r for r in records)


def test_a_judge_concurrency_below_one_is_refused_at_start(runs):
    result = run_cli("kasa.cli.evaluate", f"checkpoint={runs['dirs']['instruction']}", "task.judge.concurrency=0",
                     env={**ENV, KEY_ENV: SECRET})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: task.judge.concurrency=0 is not allowed: it must be an integer >= 1")


def instruction_run_args(tiny_llama: Path, data: dict[str, Path], run_dir: Path, judge: ChatServer) -> list[str]:
    return ["model=llama3_8b", "task=instruction/coding", f"model.path={tiny_llama}", "model.dtype=float32",
            f"task.data_dir={data['instruction']}", "task.train_split=train", "task.eval_split=test",
            "method.rank=4", "trainer.epochs=1", "task.generation.num_beams=2",
            "task.generation.num_return_sequences=2", "task.generation.max_new_tokens=6",
            f"task.judge.base_url={judge.base_url}", "task.judge.model=scripted-judge",
            f"task.judge.api_key_env={KEY_ENV}", "task.judge.max_retries=0", "task.judge.concurrency=1",
            *common_args(run_dir)]


def two_processes(module: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`accelerate launch` of `module` with 2 DDP processes on the CPU (gloo)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "configs" / "accelerate" / "multi_gpu.json"), "--num_processes", "2", "--num_machines", "1",
              "--main_process_port", "0", "-m", module, *args]
    return subprocess.run(launch, capture_output=True, text=True, timeout=600,
                          env={**env, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("processes", [1, 2])
def test_a_run_whose_judging_failed_resumes_without_generating_again(tiny_llama, data, tmp_path, processes):
    """In training, on one process or two: judging fails at its third request, the run keeps a resumable checkpoint
    with its evaluation due (two processes too: the judge's failure reaches every process alike), and resume=auto
    evaluates it from the saved responses and scores, asking the judge only for the rest."""
    run_dir = tmp_path / "run"
    judge = judge_failing_at(3)
    args = instruction_run_args(tiny_llama, data, run_dir, judge)
    env = {**ENV, KEY_ENV: SECRET}
    run = (lambda *more: run_cli("kasa.cli.train", *args, *more, env=env)) if processes == 1 else (
        lambda *more: two_processes("kasa.cli.train", *args, *more, env=env))
    saved = run_dir / "generations" / "epoch-1" / "instruction-test.jsonl"
    try:
        failed = run()
        assert failed.returncode != 0
        kept = run_dir / "checkpoints" / "step-00000001"
        assert f"what was trained is kept in {kept}" in failed.stdout + failed.stderr
        errors = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith("error: judging failed"), errors  # one line, not one a rank
        records = saved_records(saved)
        assert len(records[0]["scores"]) == 2 and "scores" not in records[1]
        resumed = run("resume=auto")
    finally:
        judge.stop()
    ok(resumed)
    assert f"reusing the responses in {saved}" in resumed.stdout
    assert len(judge.requests) == 5
    rerun = saved_records(saved)
    assert [r["responses"] for r in rerun] == [r["responses"] for r in records]
    scores = [s for r in rerun for s in r["scores"]]
    assert summary_of(run_dir)["best"] == pytest.approx(sum(scores) / len(scores))


def test_missing_judge_key_fails_before_the_model_loads(tiny_llama, data, monkeypatch):
    """What kasa-train and kasa-eval check before loading; building the task alone (kasa-export, kasa-inspect,
    which never ask the judge) needs neither the endpoint nor the key."""
    from kasa.config import RunConfig
    from kasa.tasks import build_task

    monkeypatch.delenv("KASA_TEST_UNSET_KEY", raising=False)
    cfg = RunConfig()
    cfg.task.kind, cfg.task.data_dir = "instruction", str(data["instruction"])
    cfg.task.judge.base_url, cfg.task.judge.api_key_env = "http://127.0.0.1:9/v1", "KASA_TEST_UNSET_KEY"
    with pytest.raises(ValueError, match="KASA_TEST_UNSET_KEY holds no API key"):
        build_task(cfg).check_evaluation("test")
    cfg.task.judge.base_url = None
    with pytest.raises(ValueError, match="task.judge.base_url"):
        build_task(cfg).check_evaluation("test")


def test_a_judge_that_does_not_answer_at_start_is_a_warning(tiny_llama, data, monkeypatch, capsys):
    """kasa-train and kasa-eval go on (the judge may start after the training) but say so, once per launch."""
    from kasa.config import RunConfig
    from kasa.tasks import build_task

    monkeypatch.setenv(KEY_ENV, SECRET)
    url = closed_base_url()
    cfg = RunConfig()
    cfg.task.kind, cfg.task.data_dir, cfg.task.judge.base_url = "instruction", str(data["instruction"]), url
    cfg.task.judge.api_key_env = KEY_ENV
    for rank, warned in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        build_task(cfg).check_evaluation("test")
        lines = capsys.readouterr().err.splitlines()
        assert lines == ([f"warning: the judge at {url} does not answer now (URLError: [Errno 111] Connection refused): "
                          "start it before the evaluation; if it is still down then, the responses are kept, and "
                          "resume=auto (or kasa-eval) judges them later"] if warned else []), lines


def test_a_malformed_instruction_row_is_named_by_its_index(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    from kasa.config import RunConfig
    from kasa.tasks import build_task

    rows = [dict(row) for row in INSTRUCTION_TRAIN[:2]] * 2
    rows[2] = {"instruction": "Say hello."}
    (tmp_path / "train.json").write_text(json.dumps(rows))
    (tmp_path / "test.json").write_text(json.dumps(INSTRUCTION_TEST))
    cfg = RunConfig()
    cfg.task.kind, cfg.task.data_dir, cfg.task.eval_split = "instruction", str(tmp_path), "test"
    with pytest.raises(DataError, match=rf"^split 'train' \({tmp_path / 'train.json'}\), row 2: example has no "
                                        "string 'output'"):
        build_task(cfg).train_dataset(AutoTokenizer.from_pretrained(tiny_llama))


def test_a_malformed_evaluation_row_is_refused_before_the_training(tiny_llama, tmp_path, monkeypatch):
    """check_evaluation (kasa-train and kasa-eval, before the model loads) reads every evaluated row: a row without
    an instruction failed only when the evaluation ran, after the training, naming no file and no row."""
    from kasa.config import RunConfig
    from kasa.tasks import build_task

    monkeypatch.setenv(KEY_ENV, SECRET)
    rows = [dict(row) for row in INSTRUCTION_TEST] + [{"prompt": "Say bye."}]
    (tmp_path / "test.json").write_text(json.dumps(rows))
    cfg = RunConfig()
    cfg.task.kind, cfg.task.data_dir, cfg.task.eval_split = "instruction", str(tmp_path), "test"
    cfg.task.judge.base_url, cfg.task.judge.api_key_env = closed_base_url(), KEY_ENV
    with pytest.raises(DataError, match=rf"^split 'test' \({tmp_path / 'test.json'}\), row {len(rows) - 1}: example "
                                        "has no string 'instruction'"):
        build_task(cfg).check_evaluation("test")
    cfg.task.max_eval_samples = len(rows) - 1  # the rows evaluated only
    build_task(cfg).check_evaluation("test")
    (tmp_path / "test.json").write_text(json.dumps({"data": rows}))
    with pytest.raises(DataError, match="holds a JSON object whose 'data' holds the examples: write the list itself"):
        build_task(cfg).check_evaluation("test")


def test_an_instruction_run_exports_without_the_judges_key(runs, tmp_path):
    """kasa-export refused with the judge's missing key, which it never uses."""
    env = {k: v for k, v in ENV.items() if k != KEY_ENV}
    exported = run_cli("kasa.cli.export", f"checkpoint={runs['dirs']['instruction']}", f"output={tmp_path / 'merged'}",
                       env=env)
    ok(exported)
    assert (tmp_path / "merged" / "config.json").is_file()


# ---------------------------------------------------------------------------------------------------------------
# The pieces, in process


def test_split_files(tmp_path):
    (tmp_path / "devset.csv").write_text("mr,ref\n")
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "train.json").write_text("[]")
    assert find_split_file(tmp_path, "validation", ("devset.csv",)) == tmp_path / "devset.csv"
    assert find_split_file(tmp_path, "devset", ("devset.csv.csv",)) == tmp_path / "devset.csv"  # extension added
    assert find_split_file(tmp_path, "boolq/train", ()) == tmp_path / "boolq" / "train.json"
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_text("{}\n")
    assert find_split_file(tmp_path / "boolq", str(elsewhere), ()) == elsewhere  # a path anywhere
    with pytest.raises(DataError, match="no file for split 'nope'"):
        find_split_file(tmp_path, "nope", ("nope.csv",))
    assert local_split_file(None, str(elsewhere), ()) == elsewhere
    assert local_split_file(None, "train_sft_gpt4o", ()) is None  # a Hub split
    with pytest.raises(DataError, match="does not exist"):
        local_split_file(None, "mt_bench/question.jsonl", ())
    (tmp_path / "dev.tsv").mkdir()  # a folder where the file should be is said to be one
    with pytest.raises(DataError, match="dev.tsv is a folder, not a data file"):
        find_split_file(tmp_path, "validation", ("dev.tsv",))


def test_a_missing_split_lists_only_the_files_its_task_reads(tmp_path):
    from kasa.config import RunConfig
    from kasa.tasks import build_task

    (tmp_path / "notes.tsv").write_text("a\n")
    for kind, names in (("e2e", "nope.csv, nope.txt, nope;"), ("instruction", "nope.json, nope.jsonl, nope;")):
        cfg = RunConfig()
        cfg.task.kind, cfg.task.data_dir = kind, str(tmp_path)
        with pytest.raises(DataError, match=f"no file for split 'nope' in {tmp_path} \\(looked for {names} found "
                                            "\\['notes.tsv'\\]\\)"):
            build_task(cfg).check_evaluation("nope")


def test_split_labels_name_one_file():
    assert split_label("validation") == "validation" and split_label("boolq") == "boolq"
    assert split_label("mt_bench/question.jsonl") == "mt_bench-question"
    assert split_label("/data/e2e/testset_w_refs.csv") == "data-e2e-testset_w_refs"
    assert split_label("../shared/data/stsb/dev.TSV") == "shared-data-stsb-dev"
    assert "/" not in split_label("/" + "long/" * 100 + "dev.tsv") and len(split_label("/" + "x/" * 200)) <= 150


def test_prompt_only_rows_and_judge_texts():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, "<unk>")),
                                    eos_token="<unk>")
    row = {"messages": [{"role": "user", "content": "Name a colour."}]}
    prompt, special = generation_prompt(row, plain)
    assert prompt.endswith("### Instruction:\nName a colour.\n\n### Response:\n") and special
    with_answer = {"messages": [*row["messages"], {"role": "assistant", "content": "Red."}]}
    assert generation_prompt(with_answer, plain) == (prompt, True)
    assert prompt_text(row) == "Name a colour." and reference_answer(row) is None
    assert reference_answer(with_answer) == "Red."
    plain.chat_template = CHAT_TEMPLATE
    assert generation_prompt(row, plain) == ("<|user|>\nName a colour.</s>\n<|assistant|>\n", False)
    assert prompt_text({"instruction": "Add.", "input": "1 2"}) == "Add.\n\n1 2"
    assert reference_answer({"instruction": "Add.", "output": ""}) is None


def test_loss_is_the_mean_over_response_tokens_and_unlabelled_rows_are_dropped(capsys):
    from types import SimpleNamespace

    from kasa.tasks.causal_lm import CausalLMTask, PadCollator, training_dataset

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)

    class Model(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(logits=logits)

    rows = [{"input_ids": [1, 2, 3, 4, 5], "attention_mask": [1] * 5, "labels": [-100, -100, 3, 4, 5]},
            {"input_ids": [6, 7, 8], "attention_mask": [1] * 3, "labels": [-100, 7, 8]}]
    batch = PadCollator(pad_token_id=0)(rows)
    assert batch["labels"].tolist()[1] == [-100, 7, 8, IGNORE_INDEX, IGNORE_INDEX]
    task = CausalLMTask.__new__(CausalLMTask)
    task.cfg = SimpleNamespace(trainer=SimpleNamespace(label_smoothing=0.0, compile=False))
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), batch["labels"][:, 1:].reshape(-1),
                                                 ignore_index=IGNORE_INDEX)
    assert task.loss(Model(), batch).item() == pytest.approx(expected.item(), rel=1e-6)
    kept = training_dataset([rows[0], {"input_ids": [1], "attention_mask": [1], "labels": [-100]}], 5)
    assert len(kept) == 1
    assert capsys.readouterr().err == (  # it was left out without a word
        "warning: 1 of 2 training examples have no response token within trainer.max_length=5 (the prompt fills it) "
        "and are left out: raise trainer.max_length to train on them\n")
    with pytest.raises(DataError, match="trainer.max_length=5"):
        training_dataset([{"input_ids": [1], "attention_mask": [1], "labels": [-100]}], 5)


def test_loss_runs_the_head_only_where_labels_are_and_matches_the_full_loss():
    from types import SimpleNamespace

    from transformers import GPT2Config, GPT2LMHeadModel

    from kasa.tasks.causal_lm import CausalLMTask, PadCollator

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2)).eval()
    rows = [{"input_ids": list(range(1, 10)), "attention_mask": [1] * 9, "labels": [-100] * 6 + [7, 8, 9]},
            {"input_ids": list(range(11, 16)), "attention_mask": [1] * 5, "labels": [-100] * 3 + [14, 15]}]
    batch = PadCollator(pad_token_id=0)(rows)
    seen = []
    model.lm_head.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))  # before kasa's hook
    task = CausalLMTask.__new__(CausalLMTask)
    task.cfg = SimpleNamespace(trainer=SimpleNamespace(label_smoothing=0.1, compile=False))
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, 50), batch["labels"][:, 1:].reshape(-1),
                                                     ignore_index=IGNORE_INDEX, label_smoothing=0.1)
        got = task.loss(model, batch)
    assert seen[-1] == 5  # the columns that predict a labelled token in some row: 2, 3 (second row), 5, 6, 7
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_more_responses_than_beams_is_refused_at_start():
    from kasa.config import RunConfig
    from kasa.tasks.causal_lm import CausalLMTask

    cfg = RunConfig()
    cfg.task.generation.num_return_sequences, cfg.task.generation.num_beams = 4, 2
    with pytest.raises(ValueError, match="num_beams >= that"):
        CausalLMTask(cfg)
    cfg.task.generation.do_sample = True
    CausalLMTask(cfg)


def test_accumulated_micro_batches_train_as_one_batch(tiny_llama, tmp_path, monkeypatch):
    """Responses of very different lengths, one optimiser step of 4 examples as 1 batch of 4, 2 x 2 and 4 x 1 (plain
    SGD, so that the update is the gradient itself, and no dropout): the same update. The loss is the mean over the
    step's labelled tokens; a mean of the micro-batches' own means weighed the short responses' tokens more (walk W:
    the update of 2 x 4 against 8 x 1 on BoolQ rows differed by 20%). The logged loss is that step's, too, not the
    last micro-batch's (walk Z)."""
    import kasa.training.loop as loop
    from safetensors.torch import load_file

    def sgd(model, cfg):
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.trainer.lr)

    monkeypatch.setattr(loop, "build_optimizer", sgd)
    data = tmp_path / "commonsense"
    (data / "boolq").mkdir(parents=True)
    rows = [commonsense_row("boolq", f"is question {i} true", "true" + " because it is so" * (1 + 6 * (i % 3)))
            for i in range(8)]
    (data / "commonsense_170k.json").write_text(json.dumps(rows))
    (data / "boolq" / "test.json").write_text(json.dumps(BOOLQ[:1]))

    def adapter_after_one_step(name: str, batch_size: int, grad_accum: int, lr: float = 0.5) -> dict:
        run_dir = tmp_path / name
        result = run_cli("kasa.cli.train", "model=llama2_7b", "task=commonsense", f"model.path={tiny_llama}",
                         "model.dtype=float32", "model.gradient_checkpointing=false", f"task.data_dir={data}",
                         "task.eval_sets=[boolq]", "task.generation.max_new_tokens=2", "method.dropout=0",
                         "trainer.max_steps=1", f"trainer.lr={lr}", f"trainer.grad_accum={grad_accum}",
                         *common_args(run_dir), f"trainer.batch_size={batch_size}")
        assert result.returncode == 0, result.stderr[-3000:]
        logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses = next((r["loss"], r["task_loss"]) for r in logged if r["type"] == "train")
        return load_file(str(run_dir / "checkpoints" / "last" / "adapter_model.safetensors")), losses

    start, _ = adapter_after_one_step("start", 4, 1, lr=1e-12)
    whole, whole_losses = adapter_after_one_step("4x1", 4, 1)
    update = max((whole[k] - start[k]).abs().max().item() for k in whole)
    assert update > 1e-3
    for batch_size, grad_accum in ((2, 2), (1, 4)):
        accumulated, losses = adapter_after_one_step(f"{batch_size}x{grad_accum}", batch_size, grad_accum)
        assert max((accumulated[k] - whole[k]).abs().max().item() for k in whole) < 1e-4 * update
        assert losses == pytest.approx(whole_losses, rel=1e-5)


def test_kasa_eval_draws_sampled_generations_from_the_runs_seed(runs, tmp_path):
    """kasa-eval set no seed: the same command with sampled decoding generated other outputs each time, into one
    folder, and seed= changed nothing (walk AD)."""
    run_dir = Path(shutil.copytree(runs["dirs"]["commonsense"], tmp_path / "run"))
    sampled = ["kasa.cli.evaluate", f"checkpoint={run_dir}", "task.eval_sets=[boolq]",
               "task.generation.do_sample=true", "task.generation.temperature=5.0"]
    outputs = []
    for seed in ("0", "0", "1"):
        report = eval_report(run_cli(*sampled, f"seed={seed}"))
        generations = sorted(Path(report["output_dir"]).rglob("*.jsonl"))
        outputs.append([json.loads(line)["generation"] for path in generations
                        for line in path.read_text().splitlines()])
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]
