"""The demo dataset under data/demo/: schemas, sizes and the links between the files (no model)."""

import re
from pathlib import Path

import pytest

from kore_ray.data.io import read_records
from kore_ray.data.schemas import EvalQuestion, KnowledgeItem, RetentionProbe
from kore_ray.evaluate.metrics import cover_exact_match as contains  # the evaluation's own rule
from kore_ray.evaluate.metrics import normalize_answer as norm

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"

_STOP = {"a", "an", "the", "of", "is", "in", "was", "for", "by", "to", "and", "on", "at", "as"}


@pytest.fixture(scope="module")
def items():
    return read_records(DEMO / "knowledge.jsonl", KnowledgeItem)


@pytest.fixture(scope="module")
def questions():
    return read_records(DEMO / "eval_questions.jsonl", EvalQuestion)


@pytest.fixture(scope="module")
def retention_eval():
    return read_records(DEMO / "retention_eval.jsonl", RetentionProbe)


@pytest.fixture(scope="module")
def covariance():
    return read_records(DEMO / "retention_covariance.jsonl", RetentionProbe)


def test_sizes(items, questions, retention_eval, covariance):
    assert len(items) >= 50
    assert len(questions) >= 2 * len(items)
    assert len(retention_eval) >= 100
    assert len(covariance) >= 150


def test_half_the_items_bring_short_qa_and_half_are_only_a_paragraph(items):
    """Items with hand-written qa, and as many as users bring them: a paragraph, no qa."""
    kinds = {item.kind for item in items}
    assert kinds == {"news", "entity"}
    with_qa = [item for item in items if item.qa]
    assert len(with_qa) == len(items) // 2
    for item in items:
        assert re.fullmatch(r"k\d{3}", item.id)
        assert item.qa is None or 2 <= len(item.qa) <= 3, item.id
        if item.kind == "news":
            assert item.date is not None and item.date[:4] in {"2026", "2027"}, item.id
        for pair in item.qa or []:
            assert len(pair.answer.split()) <= 3, (item.id, pair.answer)
            assert contains(item.knowledge, pair.answer), (item.id, pair.answer)
            assert not contains(pair.question, pair.answer), (item.id, pair.question)
    assert len({item.subject for item in items}) == len(items)


def test_every_item_has_held_out_questions(items, questions):
    by_id = {item.id: item for item in items}
    asked = {q.knowledge_id for q in questions}
    assert asked <= by_id.keys(), asked - by_id.keys()
    assert asked == by_id.keys(), by_id.keys() - asked


def test_eval_questions_are_paraphrases_not_copies(items, questions):
    by_id = {item.id: item for item in items}
    for q in questions:
        item = by_id[q.knowledge_id]
        assert norm(q.question) not in {norm(p.question) for p in item.qa or []}, q.id
        assert not contains(q.question, q.answer), q.id  # the answer is not given away


def test_eval_answers_are_taught_by_their_item(items, questions):
    by_id = {item.id: item for item in items}
    for q in questions:
        assert contains(by_id[q.knowledge_id].knowledge, q.answer), (q.id, q.answer)


def test_retention_probes_are_completion_prompts(retention_eval, covariance):
    for probe in [*retention_eval, *covariance]:
        assert probe.prompt is not None and probe.question is None, probe.id
        assert len(probe.answer.split()) <= 3, probe.id
        assert not contains(probe.prompt, probe.answer), probe.id


def test_retention_eval_and_covariance_are_disjoint(retention_eval, covariance):
    assert not {p.id for p in retention_eval} & {p.id for p in covariance}
    eval_prompts = {norm(p.prompt) for p in retention_eval}
    assert not eval_prompts & {norm(p.prompt) for p in covariance}
    assert len(eval_prompts) == len(retention_eval)

    # No fact reworded across the sets: same answer and mostly the same content words.
    def words(probe):
        return set(norm(probe.prompt).split()) - _STOP

    for e in retention_eval:
        for c in covariance:
            if norm(e.answer) == norm(c.answer):
                a, b = words(e), words(c)
                overlap = len(a & b) / len(a | b)
                assert overlap < 0.5, (e.prompt, c.prompt)
