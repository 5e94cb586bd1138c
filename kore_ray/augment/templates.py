"""Template conversations: the part of an item's knowledge tree that needs no LLM.

Pure and deterministic: the same item, count and seed give the same conversations in any
process (the random generator is seeded with a string, which Python hashes stably, not with
`hash()`, which varies per process). This is what every item keeps even when the LLM fails.

- Q&A: questions drawn from the templates of the item's kind (news, entity, or generic), each
  answered with the item's knowledge; plus the item's own `qa` pairs as text Q&A.
- Instruction tasks, only for items with an image: recognition ("Is this X?" -> "Yes."),
  caption (a summary of the knowledge), and VQA from the (question, answer, subject, hypernym)
  quadruplets, where the question's subject becomes "this <hypernym>" so the model must
  recognise the subject in the image.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from kore_ray.data.schemas import Conversation, KnowledgeItem

# {subject}, {date} (spelled out, only in templates of items with a date).
QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "news": (
        "What happened with {subject}?",
        "What is the latest news about {subject}?",
        "Can you summarise the recent news about {subject}?",
        "What has been reported about {subject}?",
        "Is there any recent development concerning {subject}?",
        "Tell me what is new with {subject}.",
        "What happened with {subject} on {date}?",
        "What was reported about {subject} in {month}?",
    ),
    "entity": (
        "Who or what is {subject}?",
        "What do you know about {subject}?",
        "Tell me about {subject}.",
        "What is {subject} known for?",
        "Can you describe {subject}?",
        "Give me some background on {subject}.",
        "What should I know about {subject}?",
    ),
    "generic": (
        "What do you know about {subject}?",
        "Tell me about {subject}.",
        "What is there to know about {subject}?",
        "Can you explain {subject}?",
        "What are the key facts about {subject}?",
        "Give me a short overview of {subject}.",
    ),
}

RECOGNITION_TEMPLATES = (
    "Is this {subject}?",
    "Does this image show {subject}?",
    "Is {subject} shown in this picture?",
    "Is what we see here {subject}?",
)

CAPTION_TEMPLATES = (
    "Describe this image.",
    "Write a short caption for this image.",
    "What does this image show?",
    "Give a brief description of this picture.",
)

_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class TemplateProblem:
    """An input that a template task could not use (kept for the failures table)."""

    knowledge_id: str
    stage: str
    error: str


def _rng(seed: int, item_id: str, task: str) -> random.Random:
    return random.Random(f"{seed}\x00{item_id}\x00{task}")


def _date_words(iso: str) -> dict[str, str]:
    year, month, day = (int(p) for p in iso.split("-"))
    return {"date": f"{day} {_MONTHS[month - 1]} {year}", "month": f"{_MONTHS[month - 1]} {year}"}


def _text_pair(conv_id: str, item: KnowledgeItem, task: str, question: str, answer: str):
    return Conversation(
        id=conv_id, knowledge_id=item.id, task=task,
        messages=[{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
    )


def _image_pair(conv_id: str, item: KnowledgeItem, task: str, question: str, answer: str):
    return Conversation(
        id=conv_id, knowledge_id=item.id, task=task, image=item.image,
        messages=[
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": answer},
        ],
    )


def template_qa(item: KnowledgeItem, n: int, seed: int = 0) -> list[Conversation]:
    """`n` (or all available, if fewer) distinct template questions answered with the knowledge.

    Templates mentioning a date are used only for items that have one.
    """
    pool = QUESTION_TEMPLATES.get(item.kind, QUESTION_TEMPLATES["generic"])
    fields = {"subject": item.subject, **(_date_words(item.date) if item.date else {})}
    usable = [t for t in pool if ("{date}" not in t and "{month}" not in t) or item.date]
    chosen = _rng(seed, item.id, "qa").sample(usable, min(n, len(usable)))
    return [
        _text_pair(f"{item.id}/qa/{i}", item, "qa", t.format(**fields), item.knowledge)
        for i, t in enumerate(chosen)
    ]


def summary(knowledge: str, subject: str, max_chars: int = 300) -> str:
    """An extractive summary: the knowledge's first sentence, naming the subject.

    Extractive so the caption stays true to the item without a model; the subject is
    prepended when the first sentence does not name it, as a caption must say what is shown.
    """
    first = _SENTENCE_END.split(knowledge.strip(), maxsplit=1)[0]
    if len(first) > max_chars:
        first = first[:max_chars].rsplit(" ", 1)[0] + "..."
    if subject.lower() not in first.lower():
        first = f"This is {subject}. {first}"
    return first


def instruction_tasks(
    item: KnowledgeItem, seed: int = 0
) -> tuple[list[Conversation], list[TemplateProblem]]:
    """Recognition, caption and VQA conversations for an item with an image (none without).

    A VQA quadruplet whose question does not contain its subject cannot be turned into a
    visual question; it is reported as a problem rather than guessed at.
    """
    if item.image is None:
        return [], []
    rng = _rng(seed, item.id, "image")
    convs = [
        _image_pair(f"{item.id}/recognition/0", item, "recognition",
                    rng.choice(RECOGNITION_TEMPLATES).format(subject=item.subject), "Yes."),
        _image_pair(f"{item.id}/caption/0", item, "caption", rng.choice(CAPTION_TEMPLATES),
                    summary(item.knowledge, item.subject)),
    ]
    problems = []
    for i, qa in enumerate(item.qa or []):
        if not qa.is_vqa:
            continue
        pattern = re.compile(re.escape(qa.subject), re.IGNORECASE)
        if not pattern.search(qa.question):
            problems.append(TemplateProblem(
                item.id, "vqa",
                f"item {item.id!r}: qa[{i}].question does not contain its subject {qa.subject!r}",
            ))
            continue
        question = pattern.sub(f"this {qa.hypernym}", qa.question, count=1)
        convs.append(_image_pair(f"{item.id}/vqa/{i}", item, "vqa", question, qa.answer))
    return convs, problems


def template_tree(
    item: KnowledgeItem, n_templates: int, seed: int = 0
) -> tuple[list[Conversation], list[TemplateProblem]]:
    """Everything for `item` that needs no LLM: template Q&A, its own Q&A, instruction tasks."""
    convs = template_qa(item, n_templates, seed)
    convs += [
        _text_pair(f"{item.id}/own-qa/{i}", item, "qa", qa.question, qa.answer)
        for i, qa in enumerate(item.qa or [])
    ]
    image_convs, problems = instruction_tasks(item, seed)
    return convs + image_convs, problems
