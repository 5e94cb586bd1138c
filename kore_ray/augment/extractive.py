"""The extractive generator: fact-level questions whose answers are spans of the text, no model.

For every fact span of every sentence (a name, date, year, number, amount; `spans.py`) it asks
about that span in two phrasings: a wh-question made from the sentence (the span replaced by a
wh-phrase that fits its kind: "which astronomer", "in which year", "how many metres", "where")
and a cloze about the item's topic. The answer is the span itself, in a short sentence that leads
with it, so a model trained on it answers instead of reciting. Pronouns and "the <noun>" that
stand for the item's topic are replaced by the topic's name, so every question names what it is
about. Deterministic and always available: the floor when the model generators fail.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kore_ray.augment.spans import Span, fact_spans, sentences
from kore_ray.data.schemas import KnowledgeItem

# The last word of a name that says what kind of thing it is ("the Tarrowin Spaceport" ->
# "which spaceport"); other names become "who" (people) or "where" after a place preposition.
THING_HEADS = frozenset("""
institute university college school academy laboratory labs lab systems company corporation
group industries holdings bank fund agency council party union league association society
foundation museum gallery library hospital clinic station spaceport airport port harbour
harbor stadium arena park bridge tunnel tower dam canal railway line road highway river lake
sea strait bay gulf ocean island islands mountains mountain highlands valley delta desert
forest cave glacier city town village county province region state republic kingdom district
street square cup trophy prize award medal championship tournament festival games marathon
series telescope satellite probe rover mission ship vessel train aircraft engine reactor
protocol treaty accord act law programme program project prize index
""".split())
PLACE_PREPOSITIONS = frozenset({"in", "at", "from", "near", "to", "across", "into", "off",
                                "outside", "inside", "above", "below", "beneath", "over"})
_PRONOUN_START = re.compile(r"^(?:It|He|She|They)\b(?!\s+(?:is|was)\s+(?:also|not)\b)")
_POSSESSIVE_START = re.compile(r"^(?:Its|His|Her|Their)\b")
_CLAUSE = re.compile(r",\s+(?:and|but|while|whereas)\s+|;\s+")
# "the astronomer X", "its chief executive X": an article, then one or two lower-case nouns.
_DESCRIPTOR = re.compile(r"\b(?:[Tt]he|[Aa]n?|[Ii]ts|[Hh]is|[Hh]er|[Tt]heir)\s+"
                         r"\b((?:[a-z][a-z-]+\s+)?[a-z][a-z-]+)\s+$")
_CALLED = re.compile(r"\b(?:called|named|known as|dubbed)\s+$")


@dataclass(frozen=True)
class FactPair:
    """One generated question and its short answer, with where the answer came from."""

    question: str
    answer: str
    span: str  # the answer's span, verbatim from the text
    kind: str  # the span's kind (name, date, quantity, ...)
    style: str  # "wh" or "cloze"


def topic_of(item: KnowledgeItem) -> str:
    """The name the item is about: an entity's subject, or the first name of the text that the
    subject contains ("Launch of the Quessar Orbital Telescope" -> "Quessar Orbital Telescope")."""
    if item.kind != "news":
        return item.subject
    for sentence in sentences(item.knowledge):
        for span in fact_spans(sentence):
            if span.kind == "name" and span.text.lower() in item.subject.lower():
                return span.text
    return item.subject


def resolve(sentence: str, topic: str) -> str:
    """Replace a leading pronoun, possessive or "The <topic's head noun>" by the topic."""
    if topic.lower() in sentence.lower():
        return sentence
    head = topic.split()[-1].lower()
    the_head = re.match(rf"^The\s+{re.escape(head)}\b", sentence, re.IGNORECASE)
    if the_head:
        name = topic if topic.lower().startswith("the ") else f"the {topic}"
        return name[0].upper() + name[1:] + sentence[the_head.end():]
    if _POSSESSIVE_START.match(sentence):
        return _POSSESSIVE_START.sub(f"{topic}'s", sentence, count=1)
    if _PRONOUN_START.match(sentence):
        return _PRONOUN_START.sub(topic, sentence, count=1)
    return sentence


def clause_of(sentence: str, span: Span) -> tuple[str, int]:
    """The clause holding `span` (a sentence "A, and B" asks about B without A), and the
    clause's offset in the sentence."""
    start = 0
    for m in _CLAUSE.finditer(sentence):
        if m.end() <= span.start:
            start = m.end()
        elif m.start() >= span.end:
            return sentence[start:m.start()], start
    return sentence[start:].rstrip(" .!?"), start


def _wh_phrase(span: Span, before: str) -> tuple[str, int]:
    """The wh-phrase that replaces `span`, and how many characters of `before` it swallows."""
    prep = re.search(r"\b(on|in|at|by|since|until|from|of|to)\s+$", before, re.IGNORECASE)
    if span.kind == "date":
        if prep and prep.group(1).lower() in ("on", "in", "since", "until", "by"):
            word = "month" if re.fullmatch(r"[A-Z][a-z]+ \d{4}", span.text) else "date"
            return f"{prep.group(1)} which {word}", len(before) - prep.start()
        return "when", 0
    if span.kind == "year":
        if prep and prep.group(1).lower() in ("in", "since", "until", "by", "from"):
            return f"{prep.group(1)} which year", len(before) - prep.start()
        return "which year", 0
    if span.kind == "money":
        return "how much", 0
    if span.kind == "time":
        return "what time", 0
    if span.kind == "score":
        return "by what score", 0
    if span.kind in ("quantity", "number"):
        unit = span.text.split()[-1] if " " in span.text else None
        if "%" in span.text or (unit and unit in ("percent", "cent")):
            return "what percentage", 0
        if "-" in span.text:  # "a 9.1-inch screen"
            return "what size of", 0
        if unit and unit not in ("million", "billion", "thousand"):
            return f"how many {unit}", 0
        return "how many", 0
    # A name: "the astronomer X" -> "which astronomer"; "called X" -> "called what".
    if _CALLED.search(before):
        return "what", 0
    of = re.search(r"\b[Tt]he\s+([a-z]+)\s+of\s+$", before)  # "the city of X" -> "which city"
    if of:
        return f"which {of.group(1)}", len(before) - of.start()
    desc = _DESCRIPTOR.search(before)
    if desc and not desc.group(1).endswith(("ing", "ed")) and \
            desc.group(1).split()[-1] not in PLACE_PREPOSITIONS | {"of", "by", "with", "for", "as"}:
        return f"which {desc.group(1)}", len(before) - desc.start()
    words = span.text.lower().split()
    # "Pellaway Stadium", "River Sallow", "University of Tarrow": the kind-word at either end.
    head = words[-1] if words[-1] in THING_HEADS or len(words) == 1 else words[0]
    article = re.search(r"\bthe\s+$", before, re.IGNORECASE)
    if head in THING_HEADS and len(words) > 1:
        return f"which {head}", (len(before) - article.start()) if article else 0
    place = re.search(r"\b(\w+)\s+(?:the\s+)?$", before)
    if place and place.group(1).lower() in PLACE_PREPOSITIONS:
        return "where", len(before) - place.start()
    if len(span.text.split()) >= 2 and not article:
        return "who", 0
    return "what", (len(before) - article.start()) if article else 0


def _answer(span_text: str) -> str:
    text = span_text[0].upper() + span_text[1:]
    return text if text.endswith((".", "!", "?")) else f"{text}."


def wh_question(sentence: str, span: Span, topic: str) -> str | None:
    """The sentence's clause as a question about `span`, or None if nothing would be left."""
    clause, offset = clause_of(sentence, span)
    s, e = span.start - offset, span.end - offset
    if offset and _POSSESSIVE_START.match(clause[0].upper() + clause[1:]):  # ", and its mission"
        clause, shift = f"{topic}'s{clause[clause.index(' '):]}", len(topic) + 2 - clause.index(" ")
        s, e = s + shift, e + shift
    phrase, swallow = _wh_phrase(span, clause[:s])
    before, after = clause[:s - swallow].rstrip(), clause[e:].rstrip(" .!?")
    if not (before.strip() or after.strip()):
        return None
    question = f"{before} {phrase}{after}".strip()
    question = re.sub(r"\s+,", ",", re.sub(r"\s{2,}", " ", question))
    return question[0].upper() + question[1:] + "?"


def cloze_question(sentence: str, span: Span, topic: str) -> str:
    clause, offset = clause_of(sentence, span)
    blank = clause[:span.start - offset] + "___" + clause[span.end - offset:]
    return f"Fill in the blank about {topic}: {blank.rstrip(' .!?')}."


def extractive_pairs(item: KnowledgeItem) -> list[FactPair]:
    """Every fact span of the item's text, asked about in two phrasings, in text order."""
    topic = topic_of(item)
    pairs: list[FactPair] = []
    for raw in sentences(item.knowledge):
        sentence = resolve(raw, topic)
        for span in fact_spans(sentence):
            if span.text.lower() in topic.lower() or span.kind == "number" and len(span.text) < 2:
                continue  # the topic itself, or a lone digit: nothing worth asking
            answer = _answer(re.sub(r"^the\s+", "", span.text, flags=re.IGNORECASE))
            question = wh_question(sentence, span, topic)
            if question:
                pairs.append(FactPair(question, answer, span.text, span.kind, "wh"))
            pairs.append(FactPair(cloze_question(sentence, span, topic), answer, span.text,
                                  span.kind, "cloze"))
    return pairs
