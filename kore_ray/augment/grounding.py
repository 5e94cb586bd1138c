"""The grounding check: does a generated question/answer pair state what the item's text says?

Every pair from every generator passes through `check_pair` before it can reach training. A
word-level check is not enough (every word of "X is a warehouse robot." can occur in a text
that says X makes something else), so a pair is kept only when all of these hold:

1. Nothing invented: every number of the answer is a number of the text, and every name (a
   capitalised word) of the question and the answer is a word of the text.
2. It answers: the answer says something the question does not already say (its "key span":
   the first run of answer words that are not question words), and is not a refusal.
3. The key span is a contiguous span of the text, not a collage of its words.
4. The key span is the kind of thing the question asks for: a name for "who"/"where", a year
   or date for "when", a number for "how many".
5. An answer "X is a Y." asserts what X is: the text must say so ("X is a Y", "X, a Y").
6. The key span stands in a sentence that has one of the question's relation words (its
   content words that are not names: "designed", "mission"), where the text has them at all
   (a whole name stands where the text names it by its last word alone). This rejects a true
   span given as the answer to another fact's question.

What a pair becomes for training is its key span as found in the text, as a short sentence that
leads with the answer: token F1 against short gold answers punishes every extra word. Model
generators add a seventh test outside this module (`self_qa.py`): the model, asked the question
with the text as context, must give the same key span back (round-trip consistency, Alberti et
al. 2019, "Synthetic QA Corpora Generation with Roundtrip Consistency").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kore_ray.augment.spans import (
    CAPITAL_UNITS,
    FUNCTION_WORDS,
    MONTHS,
    NAME_JOINERS,
    NUMBER_WORDS,
    PLURAL_AFTER,
    WEEKDAYS,
    WORD_UNIT,
    is_time_word,
    sentences,
)
from kore_ray.evaluate.metrics import normalize_answer

# Not "may": the month ("left in May." answers "left in which month?").
STOPWORDS = (FUNCTION_WORDS - NUMBER_WORDS) | frozenset("""
is are was were be been being has have had do does did will would can could should might
must shall not no yes so than then into onto about over under up down out off also only just
very more less own same such named called known
""".split())
_CLOZE_FRAME = re.compile(r"^Fill in the blank about [^:]*:\s*")
WH_WORDS = frozenset({"who", "whom", "whose", "what", "which", "when", "where", "why", "how"})
_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")
_CAPITALISED = re.compile(r"(?<!°)\b[A-ZÀ-ÖØ-Þ][\w'’-]*")  # "°C" is a unit, not a name
_REFUSAL = re.compile(r"\b(?:i don'?t know|not (?:mentioned|stated|specified|given|known)|"
                      r"unknown|no information|cannot (?:say|tell|answer)|n/a)\b", re.IGNORECASE)
_YEARISH = re.compile(r"^(?:1[0-9]|20)\d\d$")
MAX_ANSWER_WORDS = 20


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str  # "ok", or why the pair was rejected
    key_span: str | None = None  # the answer's span, verbatim from the text
    target: str | None = None  # what training uses as the answer

    def __bool__(self) -> bool:
        return self.ok


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def _names(text: str, skip_first: bool) -> set[str]:
    """Lower-cased capitalised words that are not function words. With `skip_first`, the first
    word of each sentence is not counted (grammar capitalises it): for questions and dialogue
    turns, not for short answers, whose first word is often the name asked for."""
    found = set()
    for m in _CAPITALISED.finditer(text):
        word = re.sub(r"['’]s?$", "", m.group().lower())
        sentence_start = not text[:m.start()].strip() or text[:m.start()].rstrip()[-1] in ".!?"
        if (skip_first and sentence_start) or word in STOPWORDS or word in WH_WORDS:
            continue
        found.update(normalize_answer(word).split())
    return found


def has_cue(text: str) -> bool:
    """Whether `text` has a number or a name to ask by (a capitalised word that grammar did not
    capitalise): "Which firm did the Vaskelund brothers found?" has, "What is the company's
    main product?" and "a small songbird" have not."""
    return bool(_NUMBER.search(text) or _names(text, skip_first=True))


def _stem(token: str) -> str:
    """A crude stem: "designed"/"designer", "longest"/"long" meet on their first letters."""
    return token[:4]


def _contains(haystack: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


def expected_kind(question: str) -> str | None:
    """What the question asks for: "name", "time", "number", or None (anything)."""
    q = question.lower()
    if re.search(r"\bhow (?:many|much|long|far|old|tall|high|wide|deep|big|large|heavy)\b", q) or \
            re.search(r"\bwhat (?:percentage|number|share|score|size)\b", q):
        return "number"
    # "when", "who", "where" ask only when they lead the question or end it ("born where?"):
    # inside it they join clauses ("the company formed when X merged").
    asks = r"^(?:\W*\w+\s+)?(?:{0})\b|\b(?:{0})\W*$"
    if re.search(r"\b(?:what|which) (?:year|date|month|day)\b", q) or re.search(asks.format("when"), q):
        return "time"
    if re.search(asks.format("who|whom|whose|where"), q):
        return "name"
    return None


def _kind_ok(kind: str | None, key_original: str) -> bool:
    first = key_original.split()[0] if key_original.split() else ""
    if kind == "number":
        return bool(_NUMBER.search(key_original)) or first.lower() in NUMBER_WORDS
    if kind == "time":
        return bool(_NUMBER.search(key_original)) or any(m in key_original for m in MONTHS + WEEKDAYS)
    if kind == "name":
        return first[:1].isupper() and not _YEARISH.match(first)
    return True


def _original_span(text: str, key: list[str]) -> str | None:
    """The text's own words for the normalised token run `key`, with their casing (articles
    and punctuation between them allowed, as normalisation dropped them)."""
    gap = r"(?:\W+(?:a|an|the))*\W+"
    pattern = r"(?<![\w])" + gap.join(re.escape(t) for t in key) + r"(?![\w])"
    m = re.search(pattern, text, re.IGNORECASE)
    return m.group().strip(" ,;:.!?\"'()“”") if m else None


_CURRENCY_BEFORE = re.compile(r"(?:\b[A-Z]{3}|[$€£¥])\s?$")
_UNIT_AFTER = re.compile(rf"\s?(%|{WORD_UNIT}(?!\w)|{CAPITAL_UNITS}(?!\w))")


def _with_units(original: str, answer: str, text: str) -> str:
    """A number's key span with the currency before it and the unit after it, where the answer
    says them too ("How much does it cost?" -> "EUR 11.50", not "11.50"; "how many kilograms?"
    -> "340 kilograms"): the question naming the unit does not make it surplus, and an answer
    without it is a different answer (gold answers carry their units)."""
    if not _NUMBER.search(original):
        return original
    m = re.search(rf"(?<![\w.,]){re.escape(original)}(?!\w|[.,:]\d)", text)  # "3", not "3.9 kg"
    if m is None:
        return original
    start, end = m.start(), m.end()
    before = _CURRENCY_BEFORE.search(text[:start])
    currency = before and re.escape(before.group().strip())
    if before and re.search(rf"{currency}\s?{re.escape(original)}", answer):
        start = before.start()
    after = _UNIT_AFTER.match(text[end:])
    if after and after.group(1) not in STOPWORDS and re.search(
            rf"{re.escape(original)}\s?{re.escape(after.group(1))}", answer):
        end += after.end()
        noun = PLURAL_AFTER.match(text, end)  # "410,000 seed samples"
        if noun and re.search(rf"{re.escape(text[start:end])}{re.escape(noun.group())}", answer):
            end = noun.end()
    return text[start:end]


def invents(statement: str, text: str, skip_first: bool = False) -> bool:
    """Whether `statement` has a number or a name (a capitalised word) that `text` has not."""
    numbers = set(_NUMBER.findall(text))
    return any(n not in numbers for n in _NUMBER.findall(statement)) or \
        bool(_names(statement, skip_first) - set(_tokens(text)))


def check_pair(question: str, answer: str, text: str) -> Verdict:
    """Keep or reject one generated pair against the item's `text`; see the module docstring."""
    a_tokens, q_tokens, t_tokens = _tokens(answer), _tokens(question), _tokens(text)
    if not a_tokens or _REFUSAL.search(answer):
        return Verdict(False, "non_answer")
    if len(a_tokens) > MAX_ANSWER_WORDS:
        return Verdict(False, "too_long")
    if invents(answer, text):
        return Verdict(False, "invented")
    if invents(question, text, skip_first=True):
        return Verdict(False, "off_topic")
    q_set = set(q_tokens)
    q_stems = {_stem(t) for t in q_set}

    def is_new(t: str) -> bool:  # "praised" says nothing new to "What did they praise?"
        return t not in STOPWORDS and _stem(t) not in q_stems

    if not any(is_new(t) for t in a_tokens):
        return Verdict(False, "repeats_question")
    # The key span lies in the first clause of the answer that says something new ("The
    # Trellis arm, a welding robot." answers with "Trellis arm"), and starts where the thing
    # asked for starts: a number or month for "when"/"how many", a capitalised word for
    # "who"/"where", else the first new word. It runs on to the next question content word.
    kind = expected_kind(question)
    clauses = re.split(r"[;()]|(?<!\d):|:(?!\d)|,\s|\s[-–]\s", answer)  # a colon, not "10:00"
    clause = next(c for c in clauses if any(map(is_new, _tokens(c))))
    words = re.findall(r"\S+", clause)
    starts = [i for i, w in enumerate(words) if any(map(is_new, _tokens(w)))]
    if kind == "name":
        starts = [i for i in starts if words[i][:1].isupper()] or starts
    elif kind in ("time", "number"):
        starts = [i for i in starts if _NUMBER.search(words[i]) or
                  is_time_word(words[i].strip(",."))] or starts
    # Skipping another fact on the way ("It was founded in 2019 in Dunmarch." for "who"?)
    # means the answer is about something else.
    if any(_NUMBER.search(w) or (w[:1].isupper() and i) for i, w in enumerate(words[:starts[0]])
           if any(map(is_new, _tokens(w)))):
        return Verdict(False, "wrong_type")
    key, previous = [], ""
    for w in words[starts[0]:]:
        toks = _tokens(w)
        name_goes_on = w[:1].isupper() and previous[:1].isupper()  # "Lunar Cup" for "which cup"
        if key and not name_goes_on and any(t in q_set and t not in STOPWORDS for t in toks):
            break
        key += toks
        previous = w
    while key and key[-1] in STOPWORDS:
        key.pop()
    # The name's own first words, though the question has them: "which mountain?" is answered
    # "Mount Caspery", "which university?" "University of Ulvaranth", not "Caspery".
    def in_name(i: int) -> bool:  # a capitalised content word, or "of" after one
        if words[i][:1].isupper():
            return not set(_tokens(words[i])) & STOPWORDS
        return words[i] in NAME_JOINERS and i > 0 and words[i - 1][:1].isupper()

    first = starts[0]
    while key and first and in_name(first - 1) and \
            _contains(t_tokens, _tokens(words[first - 1]) + key):
        first -= 1
        key = _tokens(words[first]) + key
    if not key or not _contains(t_tokens, key):
        return Verdict(False, "not_in_text")
    original = _original_span(text, key)
    if original is None:
        return Verdict(False, "not_in_text")
    if not _kind_ok(kind, original):
        return Verdict(False, "wrong_type")
    # "X is a Y." asserts what X is: the text must say it of X ("X is a Y", "X, a Y"), not of
    # something beside X ("the S3 is a vacuum cleaner made by X").
    copula = re.match(r"^\s*((?:\S+\s+){0,6}?)(?:is|was|are|were)\s+(?:a|an|the)\s", answer)
    said = _tokens(copula.group(1)) if copula else []
    if said and all(not is_new(t) for t in said) and any(t not in STOPWORDS for t in said):
        said_of = re.escape(copula.group(1).split()[-1])
        if not re.search(rf"\b{said_of}\W*(?:\s+(?:is|was|are|were))?,?\s+(?:a|an|the)?\s*"
                         rf"{re.escape(original)}", text, re.IGNORECASE):
            return Verdict(False, "false_relation")
    # The question's relation words (its content words that are not names): where the text
    # has them, the key span must stand in a sentence that has one of them too. A whole name
    # stands where its last word does ("Yusuf Brandelow ... Brandelow, 52, succeeds ...").
    # A cloze's frame (extractive.cloze: "Fill in the blank about <topic>:") is no relation.
    asked = _CLOZE_FRAME.sub("", question)
    names = _names(asked, skip_first=False)
    relation = {_stem(t) for t in set(_tokens(asked)) - STOPWORDS - WH_WORDS - names}
    in_text = [{_stem(t) for t in _tokens(s)} for s in sentences(text)]
    forms = [key] + ([key[-1:]] if len(key) > 1 and original.split()[-1][:1].isupper() else [])
    if relation & set().union(*in_text) and not any(
            relation & stems and any(_contains(_tokens(s), f) for f in forms)
            for s, stems in zip(sentences(text), in_text)):
        return Verdict(False, "wrong_sentence")
    original = _with_units(original, answer, text)
    target = original[0].upper() + original[1:]
    return Verdict(True, "ok", original, target if target.endswith((".", "!", "?")) else f"{target}.")
