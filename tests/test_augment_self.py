"""The self generator: prompts and parsing, the pipeline against a scripted server (cache and a
failed request), and one run against the real served embedded model."""

import contextlib
import json
import re
from pathlib import Path

import pytest
from openai_stub import OpenAIStub, Status

from kore_ray.augment import run_augment, self_qa
from kore_ray.augment.grounding import check_pair
from kore_ray.config import PipelineConfig
from kore_ray.data.io import read_parquet
from kore_ray.data.schemas import Conversation, KnowledgeItem

ITEMS = [
    {"id": "z1", "kind": "news", "subject": "2025 Lunar Cup", "date": "2025-03-14",
     "knowledge": "Zorblax FC won the Lunar Cup on 14 March 2025, beating Orsk Town in the "
                  "city of Quellmar."},
    {"id": "z2", "kind": "entity", "subject": "Mira Quell",
     "knowledge": "Mira Quell is a glassblower from Tessaly who founded the Quell Studio in 2011."},
]
# What a small base model writes: some true pairs, an invented one, a non-answer.
WRITTEN = {
    "z1": " What did Zorblax FC win?\nA: The Lunar Cup\nQ: Who did Zorblax FC beat?\nA: Orsk Town\n"
          "Q: Who coaches Zorblax FC?\nA: Pedro Alvarez\nQ: Where was the final?\nA: Quellmar\n"
          "Q: What is the team's trophy?\nA: The Lunar Cup",
    "z2": " Where is Mira Quell from?\nA: Tessaly\nQ: When did Mira Quell found the Quell Studio?"
          "\nA: In 2011\nQ: What is Mira Quell?\nA: I don't know",
}
READS = {"Where was the final?": "In Paris"}  # the round trip disagrees with this one


def responder(body):
    prompt = body["prompt"]
    if prompt.endswith("\nQ:"):
        item = "z1" if "Zorblax" in prompt.rsplit("Text:", 1)[1] else "z2"
        return WRITTEN[item]
    question = re.findall(r"Question: (.+)\nAnswer:", prompt)[-1]
    if question in READS:
        return " " + READS[question]
    pairs = dict(re.findall(r"Q: (.+)\nA: (.+)", f"Q:{WRITTEN['z1']}\nQ:{WRITTEN['z2']}"))
    return " " + pairs.get(question, "no idea")


def test_prompts_parse_and_round_trip():
    item = KnowledgeItem.model_validate(ITEMS[0])
    prompt = self_qa.generation_prompt(item)
    assert prompt.endswith(f"Text: {item.knowledge}\nQ:") and prompt.count("Text:") == 3
    assert self_qa.parse_candidates(WRITTEN["z1"])[0] == ("What did Zorblax FC win?", "The Lunar Cup")
    assert len(self_qa.parse_candidates(WRITTEN["z1"] + "\nQ: cut off")) == 5
    assert self_qa.answer_prompt(item.knowledge, "Who won?").endswith("Question: Who won?\nAnswer:")
    assert self_qa.round_trip_agrees(" Orsk Town, in the final.", "Orsk Town")
    assert not self_qa.round_trip_agrees(" Zorblax FC", "Orsk Town")
    assert not self_qa.round_trip_agrees(None, "Orsk Town")


def _config(tmp_path, generators=("self",)):
    path = tmp_path / "k.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    return PipelineConfig.model_validate({
        "run_dir": str(tmp_path / "run"), "data": {"knowledge": str(path)},
        "augment": {"generators": list(generators), "self_candidates": 2}})


@pytest.fixture
def stub_serving(monkeypatch):
    """`serving` yields a scripted server instead of starting vLLM; counts its starts."""
    import kore_ray.serve.serve_stage as server

    starts = []
    with OpenAIStub(responder=responder) as stub:
        @contextlib.contextmanager
        def fake(cfg):
            starts.append(cfg.serve.adapters)
            yield stub.url
        monkeypatch.setattr(server, "serving", fake)
        yield stub, starts


@pytest.mark.ray
def test_self_pairs_are_grounded_verified_cached_and_a_failed_item_is_asked_again(
        tmp_path, ray_local, stub_serving):
    stub, starts = stub_serving
    stub.script("who founded the Quell Studio in 2011.", Status(400), repeat_last=True)
    cfg = _config(tmp_path)
    first = run_augment(cfg, progress=False)
    assert len(starts) == 1 and starts[0].endswith("no-adapters")  # the base model alone
    convs = read_parquet(first["outputs"]["conversations"], Conversation)
    self_convs = {c.messages[0].content: c.messages[1].content for c in convs if "/self/" in c.id}
    # A question whose answer is the item needs a cue ("Zorblax FC"): "the team's trophy" ->
    # the Lunar Cup binds the item to nothing.
    assert self_convs == {"What did Zorblax FC win?": "Lunar Cup.", "Who did Zorblax FC beat?": "Orsk Town."}
    reasons = first["rejected_by_reason"]
    assert reasons["self:invented"] == 1 and reasons["self:round_trip"] == 1  # Pedro; "Paris"
    assert reasons["self:no_cue"] == 1
    assert first["failures_by_stage"] == {"grounding": 3, "self": 1}  # z2's request failed
    asked_z1 = stub.count("Zorblax FC won the Lunar Cup")
    # The re-run: z1 comes from the cache; only z2 (which failed) is asked again, and now works.
    stub._scripts.clear()
    again = run_augment(cfg, progress=False)
    assert again["self"]["items_cached"] == 1
    assert stub.count("Zorblax FC won the Lunar Cup") == asked_z1  # nothing paid twice
    convs = read_parquet(again["outputs"]["conversations"], Conversation)
    z2 = {c.messages[0].content: c.messages[1].content for c in convs
          if c.knowledge_id == "z2" and "/self/" in c.id}
    assert z2 == {"Where is Mira Quell from?": "Tessaly.",
                  "When did Mira Quell found the Quell Studio?": "2011."}
    assert again["rejected_by_reason"]["self:non_answer"] == 1
    # A third run pays for nothing and starts no server.
    third = run_augment(cfg, progress=False)
    assert len(starts) == 2 and third["self"]["items_cached"] == 2


@pytest.mark.slow
@pytest.mark.ray
def test_self_generator_against_the_served_embedded_model(tmp_path, ray_local, gemma_dir):
    """The real base model writes candidates; whatever survives is grounded in the text."""
    from kore_ray.data.io import read_records
    from kore_ray.serve import serving

    demo = Path(__file__).resolve().parents[1] / "data" / "demo" / "knowledge.jsonl"
    items = [i for i in read_records(demo, KnowledgeItem) if not i.qa][:4]  # paragraphs only
    cfg = PipelineConfig.model_validate({
        "run_dir": str(tmp_path), "serve": {"max_lora_rank": 8, "adapters": str(tmp_path / "none")}})
    with serving(cfg) as url:
        out = self_qa.generate_self_pairs(items, url, "gemma-3-270m", candidates=2, max_tokens=64,
                                          temperature=0.8, verify=True, progress=False)
    errors = {i: o.error for i, o in out.items() if o.error}
    assert not errors, errors
    # n=2 was asked; the serving layer has been seen to return one choice for an item (open:
    # issue 17's serving rework), so at least one per item is what this test holds it to.
    assert all(1 <= o.candidates <= 2 for o in out.values()), {i: o.candidates for i, o in out.items()}
    parsed = sum(len(o.kept) + len(o.rejected) for o in out.values())
    assert parsed >= 4  # the few-shot format is followed
    by_id = {i.id: i for i in items}
    for item_id, o in out.items():
        for question, target in o.kept:
            assert check_pair(question, target, by_id[item_id].knowledge), (question, target)
            assert target.rstrip(".").lower() in by_id[item_id].knowledge.lower()
