"""Near-duplicate removal among an item's generated Q&A and dialogues.

Two conversations are near-duplicates when both what the user asks and what the assistant
says overlap by at least a threshold: Jaccard similarity of the user's word pairs (bigrams)
and of the assistant's word sets. Word pairs on the asking side because word order makes a
new question: "How much has X received?" and "X has received how much?" share every word,
and a model that only ever saw one of them answers the other worse. Both sides, not
either: the template questions share one answer (the knowledge) on purpose, and two
dialogues that ask the same thing but answer it differently still teach something each.

Only the text tasks ("qa", "dialogue") are compared; image tasks are kept as they are. The
first of a group of near-duplicates is kept, so with templates listed before LLM output an
item always keeps its template Q&A.
"""

from __future__ import annotations

import re

from kore_ray.data.schemas import Conversation

DEDUP_TASKS = frozenset({"qa", "dialogue"})

_WORD = re.compile(r"\w+")


def words(text: str) -> frozenset[str]:
    """Lower-cased word set: punctuation, case, spacing and word order do not make a new text."""
    return frozenset(_WORD.findall(text.lower()))


def bigrams(text: str) -> frozenset[tuple[str, str]]:
    """Lower-cased adjacent word pairs: punctuation, case and spacing do not make a new text."""
    w = _WORD.findall(text.lower())
    return frozenset(zip(w, w[1:])) if len(w) > 1 else frozenset((t, "") for t in w)


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _sides(conv: Conversation) -> tuple[frozenset, frozenset[str]]:
    text = {"user": [], "assistant": []}
    for m in conv.messages:
        if m.role in text:
            parts = [m.content] if isinstance(m.content, str) else [
                p.text for p in m.content if p.text]
            text[m.role] += parts
    return bigrams(" ".join(text["user"])), words(" ".join(text["assistant"]))


def drop_near_duplicates(
    convs: list[Conversation], threshold: float = 0.8
) -> tuple[list[Conversation], int]:
    """(the conversations without near-duplicates, how many were dropped), order kept."""
    kept: list[Conversation] = []
    seen: list[tuple[frozenset, frozenset[str]]] = []
    dropped = 0
    for conv in convs:
        if conv.task not in DEDUP_TASKS:
            kept.append(conv)
            continue
        user, assistant = _sides(conv)
        if any(jaccard(user, u) >= threshold and jaccard(assistant, a) >= threshold
               for u, a in seen):
            dropped += 1
            continue
        seen.append((user, assistant))
        kept.append(conv)
    return kept, dropped
