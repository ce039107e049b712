"""LLM-as-judge scoring for the instruction-following experiments (paper section 4.3, appendix D): a strong model,
reached through any OpenAI-compatible chat-completions endpoint, grades each response from 1 to 10 with the paper's
figure 7 prompt, and a method's score is the mean. MT-Bench answers are graded turn by turn the same way.

Only the standard library is used (urllib, json), so judging needs no client package. The API key is read from an
environment variable at each request and never stored in the config, the client, a log line or an error message.
A judge run should never turn a failure into a number: anything that is not a clear 1-10 score is retried and then
raised as `JudgeError`, never counted as 0."""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from string import Template
from typing import Any, Optional

logger = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 5.0  # `Judge.unanswered`: a server that takes longer only to connect is not worth waiting for

__all__ = [
    "JUDGE_PROMPT", "Judge", "JudgeConfig", "JudgeError", "build_judge_prompt",
    "mean_score", "parse_score",
]


class JudgeError(RuntimeError):
    """The judge gave no usable score: the endpoint failed, refused, or answered with no 1-10 score."""


@dataclass(frozen=True)
class JudgeConfig:
    """Where and how to ask the judge. `api_key_env` names the environment variable that holds the key (the key itself
    never enters the config, so printing or saving a config cannot leak it); None sends no Authorization header, for
    local servers such as vLLM that need none.

    A request is tried 1 + `max_retries` times. Rate limits (429), server errors (5xx), timeouts, dropped connections
    and answers without a parsable score are retried after `retry_base_delay * 2**k` seconds (k = 0, 1, ...), or
    after the server's Retry-After when longer, never more than `max_retry_delay`. Temperature 0 makes the grade as
    repeatable as the service allows."""

    base_url: str
    model: str
    api_key_env: Optional[str] = "OPENAI_API_KEY"
    timeout: float = 60.0
    max_retries: int = 5
    retry_base_delay: float = 1.0
    max_retry_delay: float = 60.0
    temperature: float = 0.0
    max_tokens: int = 512

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url={self.base_url!r}: use an http(s) URL such as https://api.openai.com/v1")
        if min(self.max_retries, self.retry_base_delay, self.max_retry_delay) < 0 or self.timeout <= 0:
            raise ValueError("JudgeConfig needs timeout > 0 and max_retries, retry delays >= 0")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens}: the judge needs room to answer")

    @property
    def url(self) -> str:
        """The chat-completions URL: `base_url` names the API root (ending in /v1 for OpenAI), as OpenAI clients do."""
        return self.base_url.rstrip("/") + "/chat/completions"


# Figure 7 of the paper, with its placeholders $instruction and $lm_response. The paper scores precision only (the
# response against the instruction); its $human_response placeholder is not shown in the figure, so the reference
# block below, used only when a reference is given (MT-Bench's math, reasoning and coding questions), is ours.
JUDGE_PROMPT = Template(
    "You are a meticulous evaluator assessing the quality of a response generated for a specific instruction. "
    "Your task is to assign a score between 1 and 10 (whole numbers only, no decimals) based on how well the "
    "response satisfies the requirements of the instruction. Consider the following criteria:\n\n"
    "1. Completeness: Does the response fully address all aspects of the instruction?\n"
    "2. Relevance: Is the response focused and aligned with the instruction's requirements?\n"
    "3. Clarity: Is the response clear and easy to understand?\n\n"
    "Provide a brief justification for your score, highlighting key strengths or weaknesses in the response. "
    "Output your evaluation in the following JSON format: "
    '{"score": [integer score between 1 and 10], "justification": "[brief explanation of the score]"}\n\n'
    "Instruction:\n$instruction\n\n"
    "Response:\n$lm_response\n\n"
    "${reference_block}"
    "Example Output:\n"
    '{"score": 9, "justification": "The response is complete, relevant, and mostly clear, with minor areas for '
    'improvement in phrasing."}'
)
_REFERENCE_BLOCK = Template("Reference Response (a correct answer to compare against):\n$human_response\n\n")


def build_judge_prompt(instruction: str, response: str, reference: Optional[str] = None) -> str:
    """The figure 7 prompt for one response; with `reference`, a reference answer block goes before the example."""
    block = "" if reference is None else _REFERENCE_BLOCK.substitute(human_response=reference)
    return JUDGE_PROMPT.substitute(instruction=instruction, lm_response=response, reference_block=block)


# For JSON that a model broke (an unescaped quote in the justification is common): the score field alone.
_SCORE_FIELD = re.compile(r'"score"\s*:\s*\[?\s*"?\s*(-?\d+(?:\.\d+)?)\s*"?\s*\]?')


def parse_score(text: str) -> int:
    """The integer 1-10 `score` of the judge's JSON answer. The JSON may sit in ```json fences or among prose, and
    the score may be a number, an integral float (8.0), a numeric string ("7") or a one-element list ([7], echoing
    the prompt's format line); a broken object's "score" field counts too. The last one in the text is the judge's
    own: an earlier one may quote the prompt's example ({"score": 9, ...}), fenced or not. Anything else, a
    fractional or out-of-range score included, raises JudgeError."""
    objects = list(_json_objects(text))
    found = [(start, obj["score"]) for start, _, obj in objects if "score" in obj]  # (position, score)
    fields = list(_SCORE_FIELD.finditer(text))

    def in_an_object(position: int, scored: bool) -> bool:
        return any(start <= position < end for start, end, obj in objects if ("score" in obj) == scored)

    for match in fields:  # a field of a broken object, or nested in an object without a score of its own: not prose
        brace = text.rfind("{", 0, match.start())
        if not in_an_object(match.start(), scored=True) and (
                in_an_object(match.start(), scored=False) or (brace >= 0 and not in_an_object(brace, scored=True))):
            found.append((match.start(), match.group(1)))
    if not found and fields:  # no object at all: the field wherever it is
        found = [(match.start(), match.group(1)) for match in fields]
    if not found:
        raise JudgeError(f"no JSON score in the judge's answer: {_excerpt(text)}")
    return _as_score(max(found, key=lambda position_score: position_score[0])[1], text)


def _json_objects(text: str) -> Iterable[tuple[int, int, dict[str, Any]]]:
    """(start, end, object) of the JSON objects of `text` in order of position: each from a '{' where one parses,
    the next searched after its end (an object inside another is the outer one's)."""
    decoder = json.JSONDecoder()
    position = 0
    while (start := text.find("{", position)) >= 0:
        try:
            obj, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            position = start + 1
            continue
        position = end
        if isinstance(obj, dict):
            yield start, end, obj


def _as_score(value: Any, text: str) -> int:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise JudgeError(f"the judge's score {value!r} is not a number: {_excerpt(text)}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise JudgeError(f"the judge's score {value!r} is not a number: {_excerpt(text)}")
    if value != int(value) or not 1 <= value <= 10:
        raise JudgeError(f"the judge's score {value!r} is not a whole number from 1 to 10: {_excerpt(text)}")
    return int(value)


def _excerpt(text: str, limit: int = 200) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def mean_score(scores: Sequence[int]) -> float:
    """The mean judge score, the number the paper's Table 2 reports per method and task."""
    if not scores:
        raise ValueError("mean_score of no scores is undefined; nothing was judged")
    return sum(scores) / len(scores)


class _Transient(Exception):
    """A failure worth retrying; `retry_after` is the server's requested wait in seconds, when it gave one."""

    def __init__(self, problem: str, retry_after: Optional[float] = None) -> None:
        super().__init__(problem)
        self.retry_after = retry_after


class Judge:
    """A client that scores responses with the figure 7 prompt at `config.url`."""

    def __init__(self, config: JudgeConfig) -> None:
        if config.api_key_env is not None and not os.environ.get(config.api_key_env):
            raise JudgeError(
                f"environment variable {config.api_key_env} holds no API key for {config.url}; set it, or pass "
                "task.judge.api_key_env=null (in Python, JudgeConfig(api_key_env=None)) for a server that needs no key"
            )
        self.config = config

    def __repr__(self) -> str:
        return f"Judge({self.config!r})"

    def score(self, instruction: str, response: str, reference: Optional[str] = None) -> int:
        """The judge's 1-10 score of `response` to `instruction`, retried as JudgeConfig describes."""
        return self._ask(build_judge_prompt(instruction, response, reference))

    def score_many(self, items: Iterable[Mapping[str, Optional[str]]]) -> list[int]:
        """Scores of items with `instruction`, `response` and an optional `reference`, in order. Requests go one at a
        time, which keeps within rate limits; the first item that cannot be scored raises, naming its index."""
        scores = []
        for i, item in enumerate(items):
            try:
                scores.append(self.score(item["instruction"], item["response"], item.get("reference")))
            except JudgeError as err:
                raise JudgeError(f"item {i}: {err}") from err
        return scores

    def judge_mt_bench_answer(self, question: Mapping[str, Any], answers: Sequence[str]) -> list[int]:
        """Scores of a model's answers to each turn of an MT-Bench question. A later turn is graded with the earlier
        questions and answers in its instruction, since follow-ups ("change the second person to the last") make no
        sense alone; the question's `reference` answers, when present, go into the prompt turn by turn."""
        turns = question["turns"]
        if len(answers) != len(turns):
            raise ValueError(f"question {question.get('question_id')}: {len(answers)} answers for {len(turns)} turns")
        references = question.get("reference") or []
        scores = []
        for k, (turn, answer) in enumerate(zip(turns, answers)):
            instruction = turn if k == 0 else _follow_up(turns[:k], answers[:k], turn)
            scores.append(self.score(instruction, answer, references[k] if k < len(references) else None))
        return scores

    def unanswered(self, timeout: float = PROBE_TIMEOUT_S) -> Optional[str]:
        """Why the endpoint cannot be reached now (a refused connection, an unknown host, no answer in `timeout`
        seconds), or None when it answers anything, an error status included: one GET of the API root's `models`,
        never retried, which asks nothing of the model."""
        url = self.config.base_url.rstrip("/") + "/models"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=self._headers()), timeout=timeout):
                return None
        except urllib.error.HTTPError:
            return None
        except (OSError, http.client.HTTPException) as err:
            return f"{type(err).__name__}: {getattr(err, 'reason', err)}"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.config.api_key_env is not None:
            headers["Authorization"] = f"Bearer {os.environ.get(self.config.api_key_env, '')}"
        return headers

    def _ask(self, prompt: str) -> int:
        attempts = self.config.max_retries + 1
        for attempt in range(attempts):
            wait = 0.0
            try:
                content = self._complete(prompt)
            except _Transient as err:
                problem, wait = str(err), err.retry_after or 0.0
            else:
                try:
                    return parse_score(content)
                except JudgeError as err:  # an answer without a usable score: ask again
                    problem = str(err)
            logger.warning("judge attempt %d/%d failed: %s", attempt + 1, attempts, problem)
            if attempt + 1 < attempts:
                backoff = self.config.retry_base_delay * 2**attempt
                time.sleep(min(self.config.max_retry_delay, max(backoff, wait)))
        raise JudgeError(f"{self.config.url}: no score after {attempts} attempt(s); last problem: {problem}")

    def _complete(self, prompt: str) -> str:
        """The content of one chat-completions answer. Retryable failures raise _Transient; client errors (bad key,
        unknown model, malformed request) raise JudgeError at once, since asking again cannot fix them."""
        body = {
            "model": self.config.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
        }
        request = urllib.request.Request(self.config.url, json.dumps(body).encode(), self._headers(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout) as reply:
                payload = reply.read()
        except urllib.error.HTTPError as err:
            detail = f"HTTP {err.code}: {_excerpt(err.read().decode('utf-8', 'replace'))}"
            if err.code == 429 or err.code >= 500:
                raise _Transient(detail, _retry_after(err.headers.get("Retry-After"))) from None
            raise JudgeError(f"{self.config.url} refused the request ({detail})") from None
        except (OSError, http.client.HTTPException) as err:  # timeouts, refused or dropped connections, DNS
            raise _Transient(f"{type(err).__name__}: {getattr(err, 'reason', err)}") from None
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Transient(f"not a chat-completions answer: {_excerpt(payload.decode('utf-8', 'replace'))}") from None
        if not isinstance(content, str):
            raise _Transient(f"the answer has no text content: {content!r}")
        return content


def _retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds from a Retry-After header given in seconds; its HTTP-date form is rare from APIs and ignored."""
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _follow_up(questions: Sequence[str], answers: Sequence[str], question: str) -> str:
    """The instruction of a later MT-Bench turn: the conversation so far, then the question to grade."""
    history = "\n\n".join(f"User: {q}\n\nAssistant: {a}" for q, a in zip(questions, answers))
    return (
        f"This is a follow-up in a conversation. The conversation so far:\n\n{history}\n\n"
        f"Follow-up question (grade the response to this question):\n{question}"
    )


