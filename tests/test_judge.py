"""The LLM-as-judge client against a real chat-completions server started here on 127.0.0.1 (an ephemeral port,
stopped at teardown), scripted to answer well, badly, slowly or with HTTP errors."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from chat_server import ChatServer, answer, closed_base_url, error
from kasa.data.errors import DataError
from kasa.data.files import load_mt_bench_questions
from kasa.evaluation.judge import (
    Judge,
    JudgeConfig,
    JudgeError,
    build_judge_prompt,
    mean_score,
    parse_score,
)

KEY_ENV = "KASA_TEST_JUDGE_KEY"
SECRET = "sk-test-0123456789-do-not-leak"


GOOD = answer('{"score": 8, "justification": "Complete and clear."}')
MALFORMED = answer("I would rate this response quite highly overall.")


@pytest.fixture
def serve(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    servers: list[ChatServer] = []

    def start(script: list[dict]) -> ChatServer:
        """The n-th request gets the n-th scripted action (the last one repeats)."""
        servers.append(ChatServer(lambda n, body: script[min(n, len(script)) - 1]))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def make_judge(server: ChatServer, **overrides: Any) -> Judge:
    settings = dict(base_url=server.base_url, model="judge-model", api_key_env=KEY_ENV, timeout=2.0, max_retries=2,
                    retry_base_delay=0.001)
    settings.update(overrides)
    return Judge(JudgeConfig(**settings))


def test_good_answer_posts_the_figure7_prompt_with_the_env_key(serve):
    server = serve([GOOD])
    assert make_judge(server).score("Summarize the text.", "A summary.") == 8
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert request["body"]["model"] == "judge-model"
    assert request["body"]["temperature"] == 0
    assert request["body"]["messages"] == [
        {"role": "user", "content": build_judge_prompt("Summarize the text.", "A summary.")}
    ]


@pytest.mark.parametrize("content, expected", [
    ('```json\n{"score": 7, "justification": "Good."}\n```', 7),
    ('Here is my evaluation.\n{"score": 6, "justification": "Some gaps."}\nI hope this helps.', 6),
    ('{"score": "7", "justification": "Fine."}', 7),
])
def test_fenced_prose_wrapped_and_string_scores(serve, content, expected):
    server = serve([answer(content)])
    assert make_judge(server).score("Do it.", "Done.") == expected
    assert len(server.requests) == 1


@pytest.mark.parametrize("first", [MALFORMED, error(500), error(429), answer(None), {"status": 200, "body": {"x": 1}}])
def test_one_failure_then_good_is_retried(serve, first):
    server = serve([first, GOOD])
    assert make_judge(server).score("Do it.", "Done.") == 8
    assert len(server.requests) == 2


def test_always_malformed_raises_after_all_attempts(serve):
    server = serve([MALFORMED])
    with pytest.raises(JudgeError) as raised:
        make_judge(server, max_retries=3).score("Do it.", "Done.")
    assert len(server.requests) == 4  # the first try and 3 retries
    message = str(raised.value)
    assert server.base_url + "/chat/completions" in message and "no JSON score" in message


def test_always_500_raises_naming_url_and_status(serve):
    server = serve([error(500)])
    with pytest.raises(JudgeError, match=r"HTTP 500") as raised:
        make_judge(server).score("Do it.", "Done.")
    assert len(server.requests) == 3
    assert server.base_url in str(raised.value) and SECRET not in str(raised.value)


def test_client_errors_are_not_retried(serve):
    server = serve([error(401)])
    with pytest.raises(JudgeError, match="HTTP 401"):
        make_judge(server).score("Do it.", "Done.")
    assert len(server.requests) == 1


def test_timeout_is_retried(serve):
    server = serve([{**GOOD, "sleep": 1.0}, GOOD])
    assert make_judge(server, timeout=0.2).score("Do it.", "Done.") == 8
    assert len(server.requests) == 2


def test_retry_after_is_honoured(serve):
    server = serve([error(429, {"Retry-After": "0.3"}), GOOD])
    start = time.monotonic()
    assert make_judge(server).score("Do it.", "Done.") == 8
    assert time.monotonic() - start >= 0.3


def test_key_never_in_config_or_judge_text(serve):
    server = serve([GOOD])
    judge = make_judge(server)
    for text in (repr(judge.config), str(judge.config), repr(judge), str(judge)):
        assert SECRET not in text and KEY_ENV in repr(judge.config)


def test_missing_key_fails_early_naming_the_variable(serve, monkeypatch):
    server = serve([GOOD])
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(JudgeError, match=KEY_ENV):
        make_judge(server)
    assert server.requests == []


def test_no_key_env_sends_no_authorization(serve, monkeypatch):
    server = serve([GOOD])
    assert make_judge(server, api_key_env=None).score("Do it.", "Done.") == 8
    assert "Authorization" not in server.requests[0]["headers"]


def test_score_many_and_mean(serve):
    server = serve([GOOD, answer('{"score": 4}'), answer('{"score": 9, "justification": "x"}')])
    items = [{"instruction": "a", "response": "b"}, {"instruction": "c", "response": "d", "reference": "e"},
             {"instruction": "f", "response": "g"}]
    scores = make_judge(server).score_many(items)
    assert scores == [8, 4, 9] and mean_score(scores) == pytest.approx(7.0)
    assert "Reference Response" in server.requests[1]["body"]["messages"][0]["content"]
    with pytest.raises(ValueError):
        mean_score([])


def test_prompt_wording():
    prompt = build_judge_prompt("List three colours.", "Red, green, blue.")
    assert prompt.startswith("You are a meticulous evaluator assessing the quality of a response generated for a "
                             "specific instruction. Your task is to assign a score between 1 and 10 (whole numbers "
                             "only, no decimals)")
    for line in ("1. Completeness: Does the response fully address all aspects of the instruction?",
                 "2. Relevance: Is the response focused and aligned with the instruction's requirements?",
                 "3. Clarity: Is the response clear and easy to understand?",
                 '{"score": [integer score between 1 and 10], "justification": "[brief explanation of the score]"}',
                 "Instruction:\nList three colours.\n\nResponse:\nRed, green, blue.\n\nExample Output:\n"):
        assert line in prompt
    assert "Reference" not in prompt
    assert parse_score(prompt.split("Example Output:\n")[1]) == 9
    with_reference = build_judge_prompt("Add 2 and $2.", "4", reference="4 {exactly}")
    assert "Instruction:\nAdd 2 and $2." in with_reference and "\n4 {exactly}\n\nExample Output:" in with_reference


@pytest.mark.parametrize("text, expected", [
    ('{"score": 10, "justification": "Perfect."}', 10),
    ('{"score": 1}', 1),
    ('{"score": 8.0}', 8),
    ('{"score": [7], "justification": "Echoes the format line."}', 7),
    ('```\n{"justification": "ok", "score": 5}\n```', 5),
    ('{"score": 6, "justification": "The "best" answer, unescaped quotes."}', 6),
    # the prompt's example quoted before the judge's own answer (walk AD: the 9 was taken)
    ('As in {"score": 9, "justification": "..."}, my verdict: {"score": 2, "justification": "Wrong."}', 2),
    ('{"score": 3, "detail": {"score": 8}}', 3),  # the outer object's
    # the example quoted, then the judge's own answer broken by unescaped quotes; the example fenced, the answer not
    # (walk AP: the 9 was taken in both)
    ('The format {"score": 9, "justification": "..."}, mine:\n{"score": 2, "justification": "says "hi" only"}', 2),
    ('```json\n{"score": 9, "justification": "example"}\n```\nMy score: {"score": 4, "justification": "x"}', 4),
    ('{"evaluation": {"score": 7, "note": "nested"}}', 7),
    # a whole answer, then prose that mentions a score (walk AR: the 10 was taken)
    ('{"justification": "Correct.", "score": 7}\n\nNote: a "score": 10 would need an example.', 7),
    ('My verdict, "score": 6, as asked.', 6),  # no object at all: the field wherever it is
])
def test_parse_score_accepts(text, expected):
    assert parse_score(text) == expected


@pytest.mark.parametrize("text", [
    "", "Score: 8", "8", '{"score": 0}', '{"score": 11}', '{"score": 7.5}', '{"score": "seven"}',
    '{"score": true}', '{"score": null}', '{"rating": 8}', '{"score": [7, 8]}',
])
def test_parse_score_rejects(text):
    with pytest.raises(JudgeError):
        parse_score(text)


def write_questions(path: Path, rows: list[Any]) -> Path:
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return path


def test_mt_bench_turns_are_judged_with_context(serve, tmp_path):
    questions = load_mt_bench_questions(write_questions(tmp_path / "question.jsonl", [
        {"question_id": 101, "category": "reasoning", "turns": ["Overtake the second person: your position?",
                                                                "And if it were the last person?"],
         "reference": ["You are in second place.", "Uncertain."]},
        {"question_id": 81, "category": "writing", "turns": ["Write a travel blog post.", "Rewrite it with A."]},
    ]))
    assert [q["question_id"] for q in questions] == [101, 81]
    server = serve([GOOD, answer('{"score": 3}')])
    judge = make_judge(server)
    assert judge.judge_mt_bench_answer(questions[0], ["Second place.", "Last place."]) == [8, 3]
    first, second = (r["body"]["messages"][0]["content"] for r in server.requests)
    assert "Instruction:\nOvertake the second person: your position?\n\nResponse:\nSecond place." in first
    assert "You are in second place." in first and "Uncertain." not in first
    assert "Overtake the second person" in second and "Second place." in second
    assert "And if it were the last person?" in second and "Response:\nLast place." in second
    assert "Uncertain." in second
    with pytest.raises(ValueError, match="1 answers for 2 turns"):
        judge.judge_mt_bench_answer(questions[1], ["only one"])


def test_mt_bench_loader_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_mt_bench_questions(tmp_path / "missing.jsonl")
    bad_json = write_questions(tmp_path / "a.jsonl", [{"question_id": 1, "category": "x", "turns": ["q"]}, "{oops"])
    with pytest.raises(DataError, match=r"a\.jsonl:2"):
        load_mt_bench_questions(bad_json)
    with pytest.raises(DataError, match="turns"):
        load_mt_bench_questions(write_questions(tmp_path / "b.jsonl", [{"question_id": 1, "category": "x",
                                                                       "turns": "q"}]))


def test_unanswered_tells_a_closed_port_from_a_server_that_answers_anything(serve):
    """kasa-train's start probe: a server that answers at all (here 501, it serves no GET) is there, asked nothing
    of its model; a port nobody listens on is named at once, without retries."""
    server = serve([GOOD])
    assert make_judge(server).unanswered() is None
    assert server.requests == []  # the probe is not a chat request
    start = time.monotonic()
    problem = make_judge(server, base_url=closed_base_url()).unanswered()
    assert problem is not None and "refused" in problem.lower() and time.monotonic() - start < 2
