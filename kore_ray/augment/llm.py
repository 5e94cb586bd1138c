"""LLM dialogues: prompt, response schema, validation, and an async client that retries.

The functional core (prompt building, schema, parsing, backoff delays) is plain functions;
`DialogueClient` is the only stateful piece. One request per item asks for up to N
dialogues at once, so an item costs one request when all goes well, and the cache (keyed by
item, `PROMPT_VERSION`, model and N) stores one answer per item.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import re
import time
from dataclasses import dataclass, field
from typing import Annotated

import openai
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from kore_ray.config import AugmentConfig
from kore_ray.data.schemas import Conversation, KnowledgeItem

PROMPT_VERSION = "dialogues-qa-v2"
"""Bump when the prompt or schema changes: cached answers to the old prompt are then redone."""

MIN_ROUNDS = 2  # "multi-round": a single question and answer is what the templates give

_Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # -> "additionalProperties": false in the schema


class Turn(_Strict):
    user: _Text
    assistant: _Text


class Dialogue(_Strict):
    turns: list[Turn] = Field(min_length=MIN_ROUNDS)


class QA(_Strict):
    question: _Text
    answer: _Text


class Dialogues(_Strict):
    dialogues: list[Dialogue] = Field(min_length=1)
    # Targeted fact questions (several phrasings per fact). Optional when parsing, so an
    # endpoint that writes dialogues alone still counts; required in the strict schema.
    qa: list[QA] = Field(default_factory=list)


class InvalidOutput(ValueError):
    """The endpoint answered, but not with the dialogues asked for (worth another try)."""


def response_schema(n: int) -> dict:
    """The JSON schema of an answer with at most `n` dialogues (for structured output)."""
    schema = Dialogues.model_json_schema()
    schema["properties"]["dialogues"]["maxItems"] = n
    schema["required"] = sorted(schema["properties"])  # strict mode: every field present
    schema["properties"]["qa"].pop("default", None)
    return schema


def response_format(mode: str, n: int) -> dict | None:
    """The `response_format` request field for `AugmentConfig.response_format`."""
    if mode == "json_schema":
        return {"type": "json_schema",
                "json_schema": {"name": "kore_dialogues", "strict": True,
                                "schema": response_schema(n)}}
    if mode == "json_object":
        return {"type": "json_object"}
    return None


def build_messages(item: KnowledgeItem, n: int) -> list[dict]:
    """The chat request for `item`. It spells out the JSON shape in words as well, so that an
    endpoint without structured output can still answer in the right form."""
    dated = f", dated {item.date}" if item.date else ""
    user = (
        f"Knowledge about {item.subject} ({item.kind}{dated}):\n"
        f'"""\n{item.knowledge}\n"""\n\n'
        f"Write {n} different multi-round dialogue(s) between a curious user and an assistant. "
        f"In each, the user asks about {item.subject} and follows up; the assistant answers "
        f"only with facts stated in the knowledge above and names {item.subject} explicitly. "
        f"Each dialogue has {MIN_ROUNDS} to 4 rounds and takes a different angle.\n"
        "Also write targeted questions: for every fact of the knowledge, 2 differently worded "
        f"questions that name {item.subject}, each answered with the short phrase of the "
        "knowledge that answers it (a name, a number, a date, a place), nothing more.\n\n"
        'Reply with only a JSON object of the form {"dialogues": [{"turns": '
        '[{"user": "...", "assistant": "..."}, ...]}, ...], "qa": [{"question": "...", '
        '"answer": "..."}, ...]}.'
    )
    return [
        {"role": "system", "content": "You write training conversations that teach a language "
                                      "model new knowledge. You reply with JSON only."},
        {"role": "user", "content": user},
    ]


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


def parse_dialogues(text: str | None, n: int) -> list[Dialogue]:
    """The dialogues of an answer (see `parse_answer`)."""
    return parse_answer(text, n).dialogues


def parse_answer(text: str | None, n: int) -> Dialogues:
    """Validate an answer; InvalidOutput says what was wrong and shows the start of it.

    A Markdown code fence around the JSON is accepted (endpoints without structured output
    often add one); anything else that is not exactly the schema is invalid, including more
    than `n` dialogues (the schema's maxItems).
    """
    if not text or not text.strip():
        raise InvalidOutput("empty answer")
    fenced = _FENCE.match(text)
    body = fenced.group(1) if fenced else text
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        raise InvalidOutput(f"not JSON ({e.msg} at char {e.pos}): {body[:80]!r}") from None
    try:
        answer = Dialogues.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        where = ".".join(map(str, err["loc"])) or "(answer)"
        raise InvalidOutput(f"{where}: {err['msg']}") from None
    if len(answer.dialogues) > n:
        raise InvalidOutput(f"dialogues: {len(answer.dialogues)} given, at most {n} asked for")
    return answer


def dialogue_conversations(item: KnowledgeItem, dialogues: list[Dialogue]) -> list[Conversation]:
    return [
        Conversation(
            id=f"{item.id}/dialogue/{i}", knowledge_id=item.id, task="dialogue",
            messages=[m for t in d.turns for m in (
                {"role": "user", "content": t.user}, {"role": "assistant", "content": t.assistant})],
        )
        for i, d in enumerate(dialogues)
    ]


def retry_after_s(headers) -> float | None:
    """Seconds the server asked us to wait: `retry-after-ms`, or `Retry-After` (seconds or an
    HTTP date). None when absent or unreadable."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_s(attempt: int, base: float, cap: float, rng: random.Random,
              retry_after: float | None = None) -> float:
    """Wait before retry number `attempt` (1-based).

    The server's Retry-After wins when given (capped at `cap`, plus up to 10% jitter so that
    many clients told the same time do not return together); otherwise exponential backoff
    with "equal jitter": between half and all of min(cap, base * 2**(attempt - 1)).
    """
    if retry_after is not None:
        return min(cap, retry_after) * (1 + 0.1 * rng.random())
    return min(cap, base * 2 ** (attempt - 1)) * rng.uniform(0.5, 1.0)


def classify(exc: Exception) -> tuple[bool, str, float | None]:
    """(retryable, message, retry-after seconds) for an error from the openai client.

    Rate limits (429), server errors (5xx), time-outs, lost connections and unreadable response
    bodies (a truncated answer, a proxy's error page) are retried; any other status (a bad
    request, a wrong key or model) would fail the same way again.
    """
    if isinstance(exc, openai.APITimeoutError):
        return True, "request timed out", None
    if isinstance(exc, (json.JSONDecodeError, openai.APIResponseValidationError)):
        return True, f"invalid output: the response body is not a chat completion ({exc})", None
    if isinstance(exc, openai.APIConnectionError):
        return True, f"connection error: {exc.__cause__ or exc}", None
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        retryable = status in (408, 409, 429) or status >= 500
        detail = exc.body.get("message") if isinstance(exc.body, dict) else None
        return retryable, f"HTTP {status}: {detail or exc.message}", retry_after_s(
            exc.response.headers)
    return False, f"{type(exc).__name__}: {exc}", None


class Pacer:
    """Client-side rate limit: spaces request starts at least 1/rate seconds apart.

    No bursts: an endpoint's limit is usually per second or finer, and a burst at start-up is
    exactly what earns a 429.
    """

    def __init__(self, rate_per_s: float):
        self._interval = 1.0 / rate_per_s
        self._next = 0.0

    async def wait(self) -> None:
        now = asyncio.get_running_loop().time()
        start = max(now, self._next)
        self._next = start + self._interval
        if start > now:
            await asyncio.sleep(start - now)


@dataclass
class Outcome:
    """What asking for one item's dialogues came to. `requests` counts every HTTP attempt and
    the token counts include those of invalid answers: both were paid for."""

    dialogues: list[Dialogue] | None = None
    qa: list[QA] = field(default_factory=list)
    error: str | None = None
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class DialogueClient:
    """Asks an OpenAI-compatible endpoint for items' dialogues, many at a time.

    At most `concurrency_per_actor` requests are in flight; request starts are paced to
    `rate_per_s` if given. The openai client's own retries are off: this class retries
    (time-outs, 429, 5xx and invalid output) with backoff, up to `max_retries` times.
    Create it inside the event loop that will use it.
    """

    def __init__(self, cfg: AugmentConfig, api_key: str, rate_per_s: float | None = None,
                 seed: int | None = None):
        if not cfg.base_url or not cfg.model:
            raise ValueError("DialogueClient needs augment.base_url and augment.model")
        self._cfg = cfg
        self._openai = openai.AsyncOpenAI(base_url=cfg.base_url, api_key=api_key,
                                          max_retries=0, timeout=cfg.timeout_s)
        self._slots = asyncio.Semaphore(cfg.concurrency_per_actor)
        self._pacer = Pacer(rate_per_s) if rate_per_s else None
        self._rng = random.Random(seed)
        self._format = response_format(cfg.response_format, cfg.dialogues_per_item)

    async def _request(self, messages: list[dict]):
        extra = {"response_format": self._format} if self._format else {}
        async with self._slots:
            if self._pacer:
                await self._pacer.wait()
            return await self._openai.chat.completions.create(
                model=self._cfg.model, messages=messages, temperature=self._cfg.temperature,
                max_tokens=self._cfg.max_tokens, **extra)

    async def generate(self, item: KnowledgeItem) -> Outcome:
        """Never raises for a failed item: the error is in the Outcome, naming the item."""
        cfg, out = self._cfg, Outcome()
        messages = build_messages(item, cfg.dialogues_per_item)
        while True:
            out.requests += 1
            retry_after = None
            try:
                response = await self._request(messages)
                if response.usage:
                    out.prompt_tokens += response.usage.prompt_tokens or 0
                    out.completion_tokens += response.usage.completion_tokens or 0
                if not response.choices:
                    raise InvalidOutput("no choices in the answer")
                choice = response.choices[0]
                if choice.finish_reason == "length":
                    raise InvalidOutput(f"cut off at max_tokens ({cfg.max_tokens})")
                answer = parse_answer(choice.message.content, cfg.dialogues_per_item)
                out.dialogues, out.qa = answer.dialogues, answer.qa
                return out
            except InvalidOutput as e:
                retryable, message = True, f"invalid output: {e}"
            except Exception as e:  # noqa: BLE001 - every failure becomes a failed row
                retryable, message, retry_after = classify(e)
            if not retryable or out.requests > cfg.max_retries:
                out.error = f"item {item.id!r}: {message} (after {out.requests} attempt(s))"
                return out
            await asyncio.sleep(backoff_s(out.requests, cfg.backoff_s, cfg.backoff_max_s,
                                          self._rng, retry_after))

    async def close(self) -> None:
        await self._openai.close()
