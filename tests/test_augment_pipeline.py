"""The augment stage end to end: Ray Data actor pool against a real HTTP server on 127.0.0.1."""

import json
import re

import pyarrow.parquet as pq
import pytest
from openai_stub import Answer, Malformed, OpenAIStub, Stall, Status

from kore_ray.augment import run_augment
from kore_ray.config import PipelineConfig
from kore_ray.data.io import read_parquet
from kore_ray.data.schemas import Conversation
from kore_ray.errors import InputError

SECRET = "sk-kore-test-0123456789"

ITEMS = [
    {"id": "k-ok", "kind": "news", "subject": "Zorblax FC", "date": "2025-03-14",
     "knowledge": "Zorblax FC won the Lunar Cup on 14 March 2025."},
    {"id": "k-429", "kind": "entity", "subject": "Mira Quell",
     "knowledge": "Mira Quell is a glassblower who invented cold glass."},
    {"id": "k-500", "kind": "entity", "subject": "Orsk Bay", "knowledge": "Orsk Bay froze in 2024."},
    {"id": "k-stall", "kind": "recipe", "subject": "Vell soup",
     "knowledge": "Vell soup is made of moss and pears."},
    {"id": "k-bad", "kind": "news", "subject": "Tarn Party",
     "knowledge": "The Tarn Party won the 2025 election in Quo."},
    {"id": "k-dup", "kind": "entity", "subject": "Pell Lake", "knowledge": "Pell Lake is pink."},
    {"id": "k-img", "kind": "entity", "subject": "the Vell Tower",
     "image": "https://example.com/vell.png",
     "knowledge": "The Vell Tower is a 90 m clock tower in Orsk.",
     "qa": [{"question": "How tall is the Vell Tower?", "answer": "90 m",
             "subject": "the Vell Tower", "hypernym": "tower"}]},
]
SUBJECT = re.compile(r"Knowledge about (.+?) \(")


def dialogue(subject, n=1):
    # No number in the answer: the grounding check rejects a dialogue that invents one.
    said = "once" if n == 1 else "twice"
    return {"turns": [{"user": f"What is new about {subject}?", "assistant": f"{subject} {said}."},
                      {"user": "Anything else?", "assistant": f"Nothing more about {subject}."}]}


def responder(body):
    subject = SUBJECT.search(body["messages"][-1]["content"]).group(1)
    return json.dumps({"dialogues": [dialogue(subject, 1), dialogue(subject + " again", 2)]})


def write_items(path, items):
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return path


def config(tmp_path, knowledge, **augment):
    # The dialogue endpoint alone (or the templates alone): the fact generators have tests of
    # their own (test_augment_self.py, test_augment_extractive.py).
    augment.setdefault("generators", ["endpoint"] if augment.get("base_url") else [])
    return PipelineConfig.model_validate({
        "run_dir": str(tmp_path / "run"), "data": {"knowledge": str(knowledge)},
        "augment": {"api_key_env": "KORE_TEST_KEY", "templates_per_item": 3, "seed": 7,
                    "dialogues_per_item": 2, **augment},
    })


def conversations(summary):
    return read_parquet(summary["outputs"]["conversations"], Conversation)


def by_item(convs):
    out = {}
    for c in convs:
        out.setdefault(c.knowledge_id, []).append(c.task)
    return out


def test_templates_only_needs_no_llm_and_is_deterministic(tmp_path):
    knowledge = write_items(tmp_path / "k.jsonl", ITEMS)
    cfg = config(tmp_path, knowledge)  # no base_url
    first = run_augment(cfg, progress=False)
    convs = conversations(first)
    assert first["requests"] == 0 and first["llm"]["enabled"] is False
    assert first["failures"] == 0 and first["items"] == len(ITEMS)
    tasks = by_item(convs)
    assert all(t.count("qa") >= 3 for t in tasks.values())
    assert {"recognition", "caption", "vqa"} <= set(tasks["k-img"])
    assert run_augment(cfg, progress=False)["conversations"] == len(convs)
    assert conversations(first) == convs  # same seed, same output


def test_missing_inputs_are_named(tmp_path):
    with pytest.raises(InputError, match="data.knowledge"):
        run_augment(PipelineConfig(run_dir=str(tmp_path)), progress=False)
    knowledge = write_items(tmp_path / "k.jsonl", ITEMS[:1])
    with pytest.raises(InputError, match="augment.model"):
        run_augment(config(tmp_path, knowledge, base_url="http://127.0.0.1:9/v1"))


@pytest.mark.ray
def test_pipeline_retries_records_failures_caches_and_reruns_only_what_changed(
        ray_local, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("KORE_TEST_KEY", SECRET)
    knowledge = write_items(tmp_path / "k.jsonl", ITEMS)
    with OpenAIStub(responder) as stub:
        stub.script("Mira Quell", Status(429, retry_after=0.2), Answer())
        stub.script("Orsk Bay", Status(500), Answer())
        stub.script("Vell soup", Stall(), Answer())
        stub.script("Tarn Party", Malformed(), repeat_last=True)
        stub.script("Pell Lake", Answer(json.dumps({"dialogues": [dialogue("Pell Lake")] * 2})))
        cfg = config(tmp_path, knowledge, base_url=stub.url, model="stub-model", max_retries=2,
                     backoff_s=0.01, timeout_s=1.0, min_actors=1, max_actors=2,
                     concurrency_per_actor=4)

        summary = run_augment(cfg, progress=True)
        assert stub.count() == 12  # 1 each + one retry for 429, 500, stall + 3 tries for k-bad
        assert {r.headers["Authorization"] for r in stub.requests} == {f"Bearer {SECRET}"}

        llm = summary["llm"]
        assert (llm["items_requested"], llm["items_ok"], llm["items_failed"]) == (7, 6, 1)
        assert summary["requests"] == 12 and llm["retries"] == 5
        assert summary["prompt_tokens"] > 0 and summary["completion_tokens"] > 0
        assert summary["near_duplicates_removed"] == 1  # k-dup's second dialogue

        failures = pq.read_table(summary["outputs"]["failures"]).to_pylist()
        (bad,) = failures
        assert (bad["knowledge_id"], bad["stage"], bad["attempts"]) == ("k-bad", "dialogue", 3)
        assert "'k-bad'" in bad["error"] and "invalid output" in bad["error"]

        tasks = by_item(conversations(summary))
        assert tasks["k-bad"].count("qa") >= 3 and "dialogue" not in tasks["k-bad"]
        assert tasks["k-ok"].count("dialogue") == 2 and tasks["k-dup"].count("dialogue") == 1
        assert {"recognition", "caption", "vqa", "dialogue"} <= set(tasks["k-img"])

        # A re-run asks only for what failed; a changed item is redone.
        again = run_augment(cfg, progress=False)
        assert stub.count() == 12 + 3 and again["llm"]["items_cached"] == 6
        assert again["conversations"] == summary["conversations"]
        changed = [dict(ITEMS[0], knowledge="Zorblax FC lost the Lunar Cup final."), *ITEMS[1:]]
        write_items(knowledge, changed)
        third = run_augment(cfg, progress=False)
        assert third["llm"]["items_requested"] == 2
        assert stub.count("Zorblax FC lost") == 1

    out, err = capfd.readouterr()
    assert "augment" in err and "7/7" in err  # the progress bar
    written = [p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert not any(SECRET.encode() in b for b in written) and SECRET not in out + err


@pytest.mark.ray
def test_endpoint_qa_pairs_are_grounded_targeted_and_cached(ray_local, tmp_path):
    """The endpoint's targeted Q&A (beside its dialogues) goes through the grounding check:
    an invented answer is refused and counted, a kept one is trained on its span."""
    answer = {"dialogues": [dialogue("Zorblax FC")], "qa": [
        {"question": "Which cup did Zorblax FC win?", "answer": "The Lunar Cup"},
        {"question": "When did Zorblax FC win the Lunar Cup?", "answer": "On 14 March 2025."},
        {"question": "Who coaches Zorblax FC?", "answer": "Pep Moreno"}]}
    knowledge = write_items(tmp_path / "k.jsonl", ITEMS[:1])
    with OpenAIStub(lambda body: json.dumps(answer)) as stub:
        cfg = config(tmp_path, knowledge, base_url=stub.url, model="stub-model")
        summary = run_augment(cfg, progress=False)
        pairs = {c.messages[0].content: c.messages[1].content
                 for c in conversations(summary) if "/endpoint-qa/" in c.id}
        assert pairs == {"Which cup did Zorblax FC win?": "Lunar Cup.",
                         "When did Zorblax FC win the Lunar Cup?": "14 March 2025."}
        assert summary["rejected_by_reason"] == {"endpoint-qa:invented": 1}
        failures = pq.read_table(summary["outputs"]["failures"]).to_pylist()
        assert [f["stage"] for f in failures] == ["grounding"] and "Pep Moreno" in failures[0]["error"]
        again = run_augment(cfg, progress=False)
        assert stub.count() == 1  # the answer, its Q&A included, came from the cache
        assert conversations(again) == conversations(summary)
