"""Template conversations: no LLM, deterministic, per kind, and the image instruction tasks."""

import os
import subprocess
import sys

from kore_ray.augment.templates import (
    QUESTION_TEMPLATES,
    instruction_tasks,
    summary,
    template_qa,
    template_tree,
)
from kore_ray.data.schemas import KnowledgeItem

NEWS = KnowledgeItem(id="n1", kind="news", subject="Zorblax FC", date="2025-03-14",
                     knowledge="Zorblax FC won the Lunar Cup on 14 March 2025. It was their first title.")
ENTITY = KnowledgeItem(id="e1", kind="entity", subject="Mira Quell",
                       knowledge="Mira Quell is a glassblower from Tallin who invented cold glass.")
IMAGE = KnowledgeItem(
    id="i1", kind="entity", subject="the Vell Tower", image="https://example.com/vell.png",
    knowledge="The Vell Tower is a 90 m clock tower in Orsk. It was finished in 2024.",
    qa=[{"question": "Where is the Vell Tower?", "answer": "In Orsk."},
        {"question": "How tall is the Vell Tower?", "answer": "90 m",
         "subject": "the Vell Tower", "hypernym": "tower"}],
)


def questions(convs):
    return [c.messages[0].content for c in convs]


def test_template_qa_is_question_then_knowledge():
    convs = template_qa(ENTITY, 4)
    assert len(convs) == 4 and len(set(questions(convs))) == 4
    for c in convs:
        assert c.task == "qa" and c.knowledge_id == "e1"
        assert [m.role for m in c.messages] == ["user", "assistant"]
        assert "Mira Quell" in c.messages[0].content
        assert c.messages[1].content == ENTITY.knowledge


def test_each_kind_draws_from_its_own_templates():
    def pool(kind):
        return {t.format(subject="X", date="D", month="M") for t in QUESTION_TEMPLATES[kind]}

    for kind, expected in [("news", "news"), ("entity", "entity"), ("recipe", "generic")]:
        item = KnowledgeItem(id="x", kind=kind, subject="X", knowledge="X is x.", date="2025-01-02")
        assert set(questions(template_qa(item, 50))) <= {
            q.replace("D", "2 January 2025").replace("M", "January 2025") for q in pool(expected)}


def test_same_seed_same_conversations_other_seed_other_choice():
    assert template_qa(NEWS, 3, seed=1) == template_qa(NEWS, 3, seed=1)
    choices = {tuple(questions(template_qa(NEWS, 3, seed=s))) for s in range(8)}
    assert len(choices) > 1


def test_deterministic_across_processes():
    """String-seeded, not hash()-seeded: a new interpreter (other PYTHONHASHSEED) agrees."""
    code = ("from kore_ray.augment.templates import template_qa;"
            "from kore_ray.data.schemas import KnowledgeItem;"
            f"item = KnowledgeItem.model_validate({NEWS.model_dump()!r});"
            "print([c.messages[0].content for c in template_qa(item, 3, seed=5)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.stdout.strip() == str(questions(template_qa(NEWS, 3, seed=5)))


def test_date_templates_only_with_a_date():
    undated = NEWS.model_copy(update={"date": None})
    assert not any("2025" in q for q in questions(template_qa(undated, 50)))
    dated = questions(template_qa(NEWS, 50))
    assert "What happened with Zorblax FC on 14 March 2025?" in dated
    assert len(dated) == len(QUESTION_TEMPLATES["news"])  # asks for more than exist: all of them


def test_no_image_no_instruction_tasks():
    assert instruction_tasks(ENTITY) == ([], [])


def test_instruction_tasks_for_an_image_item():
    convs, problems = instruction_tasks(IMAGE)
    assert problems == []
    by_task = {c.task: c for c in convs}
    assert set(by_task) == {"recognition", "caption", "vqa"}
    for c in convs:
        assert c.image == IMAGE.image
        assert c.messages[0].content[0].type == "image"
    rec = by_task["recognition"]
    assert "the Vell Tower" in rec.messages[0].content[1].text and rec.messages[1].content == "Yes."
    assert by_task["caption"].messages[1].content == "The Vell Tower is a 90 m clock tower in Orsk."
    vqa = by_task["vqa"]
    assert vqa.messages[0].content[1].text == "How tall is this tower?"
    assert vqa.messages[1].content == "90 m"


def test_vqa_question_without_its_subject_is_reported_not_guessed():
    bad = KnowledgeItem.model_validate({**IMAGE.model_dump(), "qa": [
        {"question": "How tall is it?", "answer": "90 m", "subject": "the Vell Tower",
         "hypernym": "tower"}]})
    convs, problems = instruction_tasks(bad)
    assert [c.task for c in convs] == ["recognition", "caption"]
    (p,) = problems
    assert p.knowledge_id == "i1" and p.stage == "vqa"
    assert "'i1'" in p.error and "qa[0].question" in p.error


def test_summary_is_the_first_sentence_naming_the_subject():
    assert summary("It is tall. It is old.", "Vell Tower") == "This is Vell Tower. It is tall."
    assert summary("Vell Tower is tall. Old.", "Vell Tower") == "Vell Tower is tall."
    long = summary("Vell " + "very " * 200 + "tall.", "Vell", max_chars=50)
    assert len(long) <= 53 and long.endswith("...")


def test_tree_has_templates_own_qa_and_image_tasks_with_unique_ids():
    convs, _ = template_tree(IMAGE, 3)
    tasks = [c.task for c in convs]
    assert tasks.count("qa") == 3 + 2  # templates + the item's own pairs (the VQA one as text too)
    assert {"recognition", "caption", "vqa"} <= set(tasks)
    assert len({c.id for c in convs}) == len(convs)
