"""Text -> sentences and the fact spans in them (names, dates, years, quantities), no model.

Deterministic rules over surface forms, shared by the extractive generator (which asks about
these spans) and the grounding check (which asks whether an answer's names and numbers are the
text's). Rules rather than an NER model because no such model can be downloaded at run time and
the spans that matter for injected knowledge are the distinctive ones: capitalised names,
numbers and dates, which surface rules find reliably.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")
_MONTH = "(?:" + "|".join(MONTHS) + ")"
_NUM = r"\d+(?:[.,]\d+)*"

# Order matters: earlier patterns win where spans overlap (a date before its year).
_PATTERNS: tuple[tuple[str, re.Pattern], ...] = (
    ("date", re.compile(rf"\b(?:\d{{1,2}} {_MONTH},? \d{{4}}|{_MONTH} \d{{1,2}},? \d{{4}}|"
                        rf"\d{{4}}-\d{{2}}-\d{{2}})\b")),
    ("date", re.compile(rf"\b{_MONTH} \d{{4}}\b")),
    ("money", re.compile(rf"(?:(?:EUR|USD|GBP|CHF|JPY)\s?|[$€£¥]){_NUM}(?:\s(?:million|billion|"
                         rf"thousand|trillion))?|\b{_NUM}(?:\s(?:million|billion|thousand))?\s"
                         rf"(?:euros|dollars|pounds|francs|yen|crowns|credits)\b")),
    ("time", re.compile(r"\b\d{1,2}:\d{2}(?::\d{2})?\b")),
    ("score", re.compile(r"\b\d{1,3}-\d{1,3}\b")),
    ("year", re.compile(r"\b(?:1[0-9]|20)\d\d\b(?![.,]\d|\s?%|\s(?:metres|meters|km|people))")),
    # A unit is a whole word ("percent" is not the start of "percentage points") and keeps
    # its "/h" ("110 km/h").
    ("quantity", re.compile(rf"\b{_NUM}-[a-z]+\b|\b{_NUM}(?:\s?%|\s(?:per cent|percent)\b|(?:\s(?:million|billion|"
                            rf"thousand))?(?:\s(?:square|cubic))?\s[a-z]+(?:-[a-z]+|/[a-z]+)?\b)")),
    ("number", re.compile(rf"\b{_NUM}\b")),
)

# Capitalised words that start a sentence or a clause without being (part of) a name.
FUNCTION_WORDS = frozenset("""
a an the this that these those it its it's he she his her they their them there here we our
on in at by for from to of with after before during since until when while where which who
whose what why how and or but if as also however its after today yesterday last next each
every all both many most some several one two three four five six seven eight nine ten
""".split())
NUMBER_WORDS = frozenset("""one two three four five six seven eight nine ten eleven twelve
twenty thirty forty fifty hundred thousand million billion dozen""".split())
# Lower-case words allowed inside a name ("University of Tarrow", "Bay of Kells").
NAME_JOINERS = frozenset({"of", "de", "la", "van", "von", "del", "da", "du"})
_WORD = re.compile(r"[A-Za-zÀ-ÖØ-öø-ÿ][\w'’-]*")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"”’)]?\s+(?=[\"“(]?[A-Z0-9])")


@dataclass(frozen=True)
class Span:
    kind: str  # date, money, time, score, year, quantity, number, name
    start: int  # character offsets in the sentence
    end: int
    text: str


def sentences(text: str) -> list[str]:
    """Sentences of a paragraph (a full stop inside a number or an initial does not end one)."""
    parts = [s.strip() for s in _SENTENCE_END.split(text.strip())]
    merged: list[str] = []
    for part in parts:
        # "Dr. Orrow" / "J. Talvary": a one-letter or title word before the stop is no end.
        if merged and re.search(r"(?:\b[A-Z]|\bDr|\bMr|\bMrs|\bMs|\bSt|\bProf)\.$", merged[-1]):
            merged[-1] = f"{merged[-1]} {part}"
        elif part:
            merged.append(part)
    return merged


def _name_spans(sentence: str, taken: list[tuple[int, int]]) -> list[Span]:
    """Runs of capitalised words (with joiners inside), minus leading function words."""
    words = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(sentence)]
    spans, run = [], []

    def close():
        while run and (run[-1][2].lower() in NAME_JOINERS):
            run.pop()
        while run and run[0][2].lower() in FUNCTION_WORDS:
            run.pop(0)
        if run:
            s, e = run[0][0], run[-1][1]
            if sentence[e - 2:e] in ("'s", "’s"):  # "Oreston's novel": the name is "Oreston"
                e -= 2
            if not any(s < te and ts < e for ts, te in taken):
                spans.append(Span("name", s, e, sentence[s:e]))
        run.clear()

    prev_end = 0
    for start, end, word in words:
        gap = sentence[prev_end:start]
        if run and (gap.strip() not in ("", "-", "&") or "," in gap):  # "Brisk & Pellow"
            close()
        if word[0].isupper() and not word.isupper() or (word.isupper() and len(word) > 1):
            run.append((start, end, word))
        elif run and word.lower() in NAME_JOINERS:
            run.append((start, end, word))
        else:
            close()
        prev_end = end
    close()
    return spans


def fact_spans(sentence: str) -> list[Span]:
    """The sentence's fact spans, left to right, none overlapping."""
    found: list[Span] = []
    taken: list[tuple[int, int]] = []
    for kind, pattern in _PATTERNS:
        for m in pattern.finditer(sentence):
            if any(m.start() < e and s < m.end() for s, e in taken):
                continue
            span = Span(kind, m.start(), m.end(), m.group())
            if kind == "quantity" and span.text.split()[-1].lower() in FUNCTION_WORDS | {"and", "or"}:
                number = span.text.rsplit(None, 1)[0]  # "41 of the 90 seats": no unit
                span = Span("number", span.start, span.start + len(number), number)
            elif kind == "quantity" and not span.text.endswith("s"):
                # "410,000 seed samples", "14 new languages": the counted noun is the plural.
                noun = PLURAL_AFTER.match(sentence, span.end)
                if noun and noun.group(1) not in FUNCTION_WORDS:
                    span = Span(kind, span.start, noun.end(), sentence[span.start:noun.end()])
            found.append(span)
            taken.append((span.start, span.end))
    return sorted(found + _coordinated(sentence, _name_spans(sentence, taken)), key=lambda s: s.start)


PLURAL_AFTER = re.compile(r" ([a-z]{3,}s)\b")
_PLURAL_BEFORE = re.compile(r"\b(?:the|its|his|her|their)\s+[a-z]+[^s\W]s\s+$", re.IGNORECASE)


def _coordinated(sentence: str, names: list[Span]) -> list[Span]:
    """"the brothers Toma and Eero Vaskelund" is one answer, not "Toma" for "which brothers"."""
    out: list[Span] = []
    for span in names:
        prev = out[-1] if out else None
        if prev and sentence[prev.end:span.start] == " and " and \
                _PLURAL_BEFORE.search(sentence[:prev.start]):
            out[-1] = Span("name", prev.start, span.end, sentence[prev.start:span.end])
        else:
            out.append(span)
    return out

