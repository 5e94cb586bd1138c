"""Evaluation requests fan out through Ray Data to a real HTTP endpoint (the scripted stub)."""

import json

import pytest
from openai_stub import OpenAIStub, Status

from kore_ray.evaluate.ask import ask


@pytest.mark.ray
def test_ask_fans_out_and_keeps_failures(ray_local):
    def responder(body):  # echo which model was asked and what, so routing is checked
        asked = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
        return f"{body['model']}:{asked}"

    requests = [{"id": f"q{i}", "model": m, "kind": "chat",
                 "prompt": json.dumps([{"role": "user", "content": f"question {i}"}])}
                for i in range(12) for m in ("base", "kore")]
    requests += [{"id": "p1", "model": "kore", "kind": "completion", "prompt": "The capital of France is"}]
    requests += [{"id": "bad", "model": "kore", "kind": "completion", "prompt": "always fails"}]
    with OpenAIStub(responder, latency_s=0.05, max_in_flight=8) as stub:
        stub.script("always fails", Status(400, message="bad adapter"), repeat_last=True)
        out = ask(requests, stub.url, concurrency=8, progress=False)
        assert stub.max_seen_in_flight > 1  # requests really ran concurrently
    assert len(out) == len(requests)
    assert out[("kore", "q3")]["prediction"] == "kore:question 3"
    assert out[("base", "q3")]["prediction"] == "base:question 3"
    assert out[("kore", "p1")]["prediction"] == "kore:The capital of France is"
    assert out[("kore", "bad")]["prediction"] is None and "bad adapter" in out[("kore", "bad")]["error"]
    assert all(r.body["temperature"] == 0.0 for r in stub.requests)  # greedy
