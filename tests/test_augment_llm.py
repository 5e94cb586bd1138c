"""LLM dialogues: schema, parsing, backoff, and the async client against a real HTTP server."""

import asyncio
import json
import random
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from openai_stub import Answer, BrokenBody, Malformed, OpenAIStub, Stall, Status

from kore_ray.augment.llm import (
    DialogueClient,
    InvalidOutput,
    Pacer,
    backoff_s,
    build_messages,
    parse_dialogues,
    response_format,
    retry_after_s,
)
from kore_ray.config import AugmentConfig
from kore_ray.data.schemas import KnowledgeItem

ITEM = KnowledgeItem(id="k1", kind="news", subject="Zorblax FC", date="2025-03-14",
                     knowledge="Zorblax FC won the Lunar Cup.")
TWO_ROUNDS = {"turns": [{"user": "Who won?", "assistant": "Zorblax FC."},
                        {"user": "What?", "assistant": "The Lunar Cup."}]}
VALID = json.dumps({"dialogues": [TWO_ROUNDS]})


def valid(body):
    return VALID


# -- pure functions ---------------------------------------------------------------------------

def test_parse_valid_and_fenced():
    assert parse_dialogues(VALID, 2)[0].turns[1].assistant == "The Lunar Cup."
    assert len(parse_dialogues(f"```json\n{VALID}\n```", 2)) == 1


@pytest.mark.parametrize("text, match", [
    ("", "empty answer"),
    ('{"dialogues": [', "not JSON"),
    (json.dumps({"dialogues": []}), "dialogues: List should have at least 1 item"),
    (json.dumps({"dialogues": [{"turns": TWO_ROUNDS["turns"][:1]}]}), "dialogues.0.turns"),
    (json.dumps({"dialogues": [{"turns": [{"user": "q", "assistant": " "}] * 2}]}),
     "dialogues.0.turns.0.assistant"),
    (json.dumps({"dialogues": [TWO_ROUNDS], "note": "x"}), "note: Extra inputs"),
    (json.dumps({"dialogues": [TWO_ROUNDS] * 3}), "3 given, at most 2"),
])
def test_parse_rejects_what_the_schema_forbids(text, match):
    with pytest.raises(InvalidOutput, match=match):
        parse_dialogues(text, 2)


def test_json_schema_request_is_strict_and_bounded():
    fmt = response_format("json_schema", 3)
    schema = fmt["json_schema"]["schema"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert schema["properties"]["dialogues"]["maxItems"] == 3
    objects = [schema, *schema["$defs"].values()]
    assert all(o["additionalProperties"] is False and set(o["required"]) == set(o["properties"])
               for o in objects)
    assert response_format("json_object", 3) == {"type": "json_object"}
    assert response_format("none", 3) is None


def test_prompt_carries_the_knowledge_and_the_count():
    text = build_messages(ITEM, 3)[-1]["content"]
    assert ITEM.knowledge in text and "Write 3 different" in text and "2025-03-14" in text


def test_retry_after_forms():
    assert retry_after_s({"retry-after": "2"}) == 2.0
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    when = datetime.now(timezone.utc) + timedelta(seconds=30)
    assert 25 < retry_after_s({"retry-after": format_datetime(when, usegmt=True)}) <= 30
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({}) is None


def test_backoff_grows_exponentially_with_jitter_and_caps():
    rng = random.Random(0)
    for attempt in range(1, 6):
        delay = backoff_s(attempt, 0.5, 100, rng)
        assert 0.25 * 2 ** (attempt - 1) <= delay <= 0.5 * 2 ** (attempt - 1)
    assert backoff_s(20, 0.5, 3.0, rng) <= 3.0
    assert 2.0 <= backoff_s(1, 0.5, 30, rng, retry_after=2.0) <= 2.2


def test_pacer_spaces_request_starts():
    async def five():
        pacer = Pacer(20.0)
        await asyncio.gather(*(pacer.wait() for _ in range(5)))

    t = time.perf_counter()
    asyncio.run(five())
    assert time.perf_counter() - t >= 4 / 20 * 0.95


# -- the client against the scripted server ----------------------------------------------------

def items(n):
    return [KnowledgeItem(id=f"k{i}", kind="entity", subject=f"Subject-{i}.",
                          knowledge=f"Subject-{i}. is fictional.") for i in range(n)]


def generate(stub, its, rate=None, **cfg):
    cfg = AugmentConfig(base_url=stub.url, model="stub-model", backoff_s=0.01,
                        **{"max_retries": 2, "timeout_s": 5.0, **cfg})

    async def run():
        client = DialogueClient(cfg, "sk-test-secret", rate_per_s=rate)
        try:
            return await asyncio.gather(*(client.generate(i) for i in its))
        finally:
            await client.close()

    return asyncio.run(run())


def test_success_sends_key_model_and_schema_and_counts_tokens():
    with OpenAIStub(valid) as stub:
        (out,) = generate(stub, [ITEM], dialogues_per_item=2)
    assert out.error is None and out.requests == 1 and len(out.dialogues) == 1
    assert out.prompt_tokens > 0 and out.completion_tokens > 0
    (req,) = stub.requests
    assert req.headers["Authorization"] == "Bearer sk-test-secret"
    assert req.body["model"] == "stub-model"
    assert req.body["response_format"]["json_schema"]["schema"]["properties"]["dialogues"][
        "maxItems"] == 2


def test_retryable_errors_are_retried_and_retry_after_honoured():
    its = items(5)
    with OpenAIStub(valid) as stub:
        stub.script("Subject-0.", Status(429, retry_after=0.4), Answer())
        stub.script("Subject-1.", Status(500), Status(503), Answer())
        stub.script("Subject-2.", Stall(), Answer())
        stub.script("Subject-3.", BrokenBody(), Answer())
        out = generate(stub, its, timeout_s=0.3)
        gap = [r.at for r in stub.requests if "Subject-0." in r.text]
    assert [o.error for o in out] == [None] * 5
    assert [o.requests for o in out] == [2, 3, 2, 2, 1]
    assert gap[1] - gap[0] >= 0.4  # the server's Retry-After, not the 0.01 s backoff


def test_invalid_output_is_retried_then_fails_naming_the_item():
    with OpenAIStub(valid) as stub:
        stub.script("Subject-0.", Malformed(), repeat_last=True)
        (out,) = generate(stub, items(1), max_retries=2)
        assert stub.count() == 3
    assert out.dialogues is None and out.requests == 3 and out.prompt_tokens > 0
    assert out.error.startswith("item 'k0': invalid output: not JSON")
    assert "after 3 attempt(s)" in out.error


def test_client_errors_are_not_retried():
    with OpenAIStub(valid) as stub:
        stub.script("Subject-0.", Status(401, message="bad key"))
        (out,) = generate(stub, items(1), max_retries=4)
    assert out.requests == 1 and "HTTP 401: bad key" in out.error


def test_exhausted_retries_on_timeouts():
    with OpenAIStub(valid) as stub:
        stub.script("Subject-0.", Stall(), repeat_last=True)
        (out,) = generate(stub, items(1), timeout_s=0.2, max_retries=1)
    assert out.requests == 2 and "request timed out" in out.error


def test_concurrency_is_capped_per_client():
    with OpenAIStub(valid, latency_s=0.1) as stub:
        out = generate(stub, items(9), concurrency_per_actor=3)
        assert stub.max_seen_in_flight == 3
    assert all(o.error is None for o in out)


def test_rate_limit_spaces_requests():
    with OpenAIStub(valid) as stub:
        generate(stub, items(5), rate=10.0, concurrency_per_actor=5)
        starts = sorted(r.at for r in stub.requests)
    assert starts[-1] - starts[0] >= 0.4 * 0.95
