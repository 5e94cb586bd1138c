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

# Units with capitals ("720 Wh", "4 GB"): asked alone they taught "Battery: 720 what?" -> "Wh.".
CAPITAL_UNITS = "(?:[kMGT]?Wh|[kMG]?W|mAh|[kMGT]B|[kMG]?Hz|dB|[kM]?V|°[CF])"
# A word unit, with a square or cube ("km2", "m3/s") and a per-unit ("km/h", "g/L").
WORD_UNIT = r"[a-z]+[23]?(?:-[a-z]+|/[a-zA-Z]+[23]?)?"
_LENGTH_UNITS = r"(?:mm|cm|m|km|in|inches|ft|metres|meters|centimetres|millimetres)"
# Order matters: earlier patterns win where spans overlap (a date before its year).
_PATTERNS: tuple[tuple[str, re.Pattern], ...] = (
    ("date", re.compile(rf"\b(?:\d{{1,2}} {_MONTH},? \d{{4}}|{_MONTH} \d{{1,2}},? \d{{4}}|"
                        rf"\d{{4}}-\d{{2}}-\d{{2}})\b")),
    ("date", re.compile(rf"\b{_MONTH} \d{{4}}\b")),
    ("date", re.compile(rf"\b\d{{1,2}} {_MONTH}\b")),  # "on 1 November"
    # Any three-capital code before an amount is a currency ("NOK 2.84 billion", "SEK 3,790");
    # "$3.2bn", "£40m" keep their scale.
    ("money", re.compile(rf"(?:(?:EUR|USD|GBP|CHF|JPY)\s?|\b[A-Z]{{3}}\s|[$€£¥]){_NUM}"
                         rf"(?:\s(?:million|billion|thousand|trillion)|(?:bn|tn|m|k)\b)?|"
                         rf"\b{_NUM}(?:\s(?:million|billion|thousand))?\s"
                         rf"(?:euros|dollars|pounds|francs|yen|crowns|credits)\b")),
    ("time", re.compile(r"\b\d{1,2}:\d{2}(?::\d{2})?\b")),
    # "512 x 318 x 64 mm", "61 x 48 cm": one size, not three numbers.
    ("quantity", re.compile(rf"\b{_NUM}(?:\s?[x×]\s?{_NUM}){{1,2}}\s?{_LENGTH_UNITS}\b")),
    # A standings record ("38-12-6") is no score; it is not asked (see extractive.py).
    ("record", re.compile(r"\b\d{1,3}(?:-\d{1,3}){2,}\b")),
    ("score", re.compile(r"\b\d{1,3}-\d{1,3}\b")),
    ("year", re.compile(r"\b(?:1[0-9]|20)\d\d\b(?![.,]\d|\s?%|\s(?:metres|meters|km|people))")),
    # A unit is a whole word ("percent" is not the start of "percentage points") and keeps
    # its "/h" ("110 km/h").
    ("quantity", re.compile(rf"\b{_NUM}-[a-z]+\b|\b{_NUM}(?:\s?%|\s(?:per cent|percent)\b|(?:\s(?:million|billion|"
                            rf"thousand))?(?:\s(?:square|cubic))?\s(?:{WORD_UNIT}|{CAPITAL_UNITS})(?!\w))")),
    ("number", re.compile(rf"\b{_NUM}\b")),
)

# Capitalised words that start a sentence or a clause without being (part of) a name.
FUNCTION_WORDS = frozenset("""
a an the this that these those it its it's he she his her they their them there here we our
on in at by for from to of with after before during since until when while where which who
whose what why how and or but if as also however its after today yesterday last next each
every all both many most some several one two three four five six seven eight nine ten
besides despite although though unlike like under over between among through across against
beyond near into onto upon within without toward towards because once then thus yet nor per
""".split())
NUMBER_WORDS = frozenset("""one two three four five six seven eight nine ten eleven twelve
twenty thirty forty fifty hundred thousand million billion dozen""".split())
# Lower-case words allowed inside a name ("University of Tarrow", "Bay of Kells").
NAME_JOINERS = frozenset({"of", "de", "la", "van", "von", "del", "da", "du"})
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
# A number's next word that is no unit: a verb or an adverb ("Halo 3 weighs", "27 previously
# unknown species"), and the words that make the number a label ("the number 29 shirt").
_NOT_UNITS = frozenset("""is was are were has have had will would can could may might adds
costs weighs says makes takes holds runs gets""".split())
_LABELS = ("number|no\\.|version|route|platform|gate|flight|chapter|article|section|bus|tram|"
           "room|hall|pier|berth|track|terminal|stand")
_LABEL_BEFORE = re.compile(rf"\b(?:{_LABELS})\s+$", re.IGNORECASE)
# "Room 12", "Gate 7": the label and its number are one name ("on display in which room?").
LABEL_NAME = re.compile(rf"({_LABELS}) \d+[A-Z]?", re.IGNORECASE)
# Unit abbreviations and percentages end a quantity: "12 min thanks", "40 percent comes" are no
# "counted nouns" ("410,000 seed samples" is).
_CLOSED_UNITS = frozenset("% percent cent min h hr s ms km m cm mm kg g mg t l ml ha mph".split())
# Titles that keep their full stop inside a name ("Prof. Cassius Wennerby").
TITLES = frozenset("Dr Mr Mrs Ms Prof St Gen Col Capt Lt Sgt Rev Fr".split())
# A quoted title of up to eight words ("'Girl with a Pewter Jug'", "\"Loads and Margins\""):
# one answer, not one name per capitalised run. Quoted speech has punctuation inside, a title not.
_QUOTED = re.compile(r"(?:(?<=[\s(])|^)['\"“‘]((?:[Tt]he\s)?[A-Z][^'\"“”‘’,.!?;:]{0,60}?)"
                     r"['\"”’](?=[\s,.;:)!?]|$)")
# A species' name is its genus and its lower-case epithet ("the reed Typhalis orvana", "(Pinus
# tarnensis)"): the genus alone taught "Pyrrhula." for "where does the ember finch live?".
_EPITHET = re.compile(r" ([a-z]{3,}(?:ae|i|us|um|a|is|ens|ans|ax|ix|ex|ops))\b")
_BEFORE_GENUS = re.compile(r"(?:\(|\b[a-z]{3,},?\s)$")
_NOT_EPITHETS = frozenset("""area arena plaza data media opera era gala villa camera formula
agenda via visa museum forum stadium status bonus campus census focus virus chorus basis crisis
axis thesis series species genus alumni also plus minus""".split())
_WORD = re.compile(r"[A-Za-zÀ-ÖØ-öø-ÿ][\w'’-]*")
# A sentence ends at a full stop before a capital or digit, and at a " | " (a notice's fields).
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"”’)]?\s+(?=[\"“(]?[A-Z0-9])|\s+\|\s+")


@dataclass(frozen=True)
class Span:
    kind: str  # date, money, time, score, year, quantity, number, name
    start: int  # character offsets in the sentence
    end: int
    text: str
    species: bool = False  # a genus and its epithet, one name ("Pinus tarnensis")
    person: bool = False  # named in full, then by the surname alone (extractive.people)


# A list item's marker at the start of a line: "- ", "* ", "• ", "1. ", "2) ".
_BULLET = re.compile(r"^(?:[-*•–]|\d{1,2}[.)])\s+")


def lines(text: str) -> list[str]:
    """The text's lines as units of meaning: a line break ends one where the line ends a
    sentence or a field ("Battery: 540 Wh"), or the next line is a list item or starts with a
    capital; a line that goes on in lower case, or after a comma or a word such as "by" or
    "the", is the same sentence, hard-wrapped. List markers are dropped: "- Range: up to 110
    km" is the field "Range: up to 110 km"."""
    out: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            out.append("")  # a blank line ends whatever came before
            continue
        bullet = _BULLET.match(line)
        last = out[-1].rsplit(" ", 1)[-1] if out else ""
        if last and not bullet and not last.endswith((".", "!", "?", ":", ";")) and \
                (line[0].islower() or last.endswith(",") or last in FUNCTION_WORDS):
            out[-1] = f"{out[-1]} {line}"
        else:
            out.append(line[bullet.end():] if bullet else line)
    return [line for line in out if line]


def sentences(text: str) -> list[str]:
    """Sentences of a text, line by line (`lines`); a full stop inside a number or an initial
    does not end one."""
    return [s for line in lines(text) for s in _line_sentences(line)]


def _line_sentences(text: str) -> list[str]:
    parts = [s.strip() for s in _SENTENCE_END.split(text.strip())]
    merged: list[str] = []
    for part in parts:
        # "Dr. Orrow" / "J. Talvary": a one-letter or title word before the stop is no end.
        # Not after a unit letter ("maximum draw 1,850 W. Eleven power levels.").
        if merged and re.search(rf"(?:(?<!\d\s)\b[A-Z]|\b(?:{'|'.join(TITLES)}|No|Nos))\.$",
                                merged[-1]):
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
        if run and not (len(run) == 1 and run[0][2] in TITLES):
            s, e = run[0][0], run[-1][1]
            if sentence[e - 2:e] in ("'s", "’s"):  # "Oreston's novel": the name is "Oreston"
                e -= 2
            if not any(s < te and ts < e for ts, te in taken):
                spans.append(Span("name", s, e, sentence[s:e]))
        run.clear()

    prev_end = 0
    for start, end, word in words:
        gap = sentence[prev_end:start]
        title = gap == ". " and run and run[-1][2] in TITLES  # "Prof. Cassius Wennerby"
        # A gap other than a space, "-" or "&" ("Brisk & Pellow") ends the name.
        if run and not title and (gap.strip() not in ("", "-", "&") or "," in gap):
            close()
        if is_time_word(word):  # a time, on its own ("Every May X")
            close()
            run.append((start, end, word))
            close()
        elif word[0].isupper() and not word.isupper() or (word.isupper() and len(word) > 1):
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
    for m in _QUOTED.finditer(sentence):
        if len(m.group(1).split()) <= 8:
            found.append(Span("title", m.start(1), m.end(1), m.group(1)))
            taken.append((m.start(), m.end()))
    for kind, pattern in _PATTERNS:
        for m in pattern.finditer(sentence):
            if any(m.start() < e and s < m.end() for s, e in taken):
                continue
            span = Span(kind, m.start(), m.end(), m.group())
            unit = span.text.split()[-1].lower()
            if kind == "quantity" and (unit in FUNCTION_WORDS | _NOT_UNITS | {"and", "or"} or
                                       unit.endswith("ly") or _LABEL_BEFORE.search(sentence[:m.start()])):
                number = span.text.rsplit(None, 1)[0]  # "41 of the 90 seats": no unit
                span = Span("number", span.start, span.start + len(number), number)
            elif kind == "quantity" and unit not in _CLOSED_UNITS and \
                    (not span.text.endswith("s") or span.text.endswith(("ss", "us", "is"))):
                # "410,000 seed samples", "14 new languages", "4,000 glass panes": the counted
                # noun is the plural.
                noun = PLURAL_AFTER.match(sentence, span.end)
                if noun and noun.group(1) not in FUNCTION_WORDS:
                    span = Span(kind, span.start, noun.end(), sentence[span.start:noun.end()])
            found.append(span)
            taken.append((span.start, span.end))
    names = [_as_time(_binomial(sentence, span)) for span in _name_spans(sentence, taken)]
    names = [_labelled(sentence, span) for span in names]
    # Spans never overlap: a span inside a name (the number of "Room 12") leaves the others.
    found = [f for f in found if not any(f.start < n.end and n.start < f.end for n in names)]
    return sorted(found + _coordinated(sentence, names), key=lambda s: s.start)


def _labelled(sentence: str, span: Span) -> Span:
    """"Room 12": a label word and the number after it are one name."""
    label = LABEL_NAME.match(sentence, span.start)
    if not label or label.end(1) != span.end or re.match(r"\w", sentence[label.end():]):
        return span
    return Span("name", span.start, label.end(), sentence[span.start:label.end()])


def _binomial(sentence: str, span: Span) -> Span:
    """A one-word name that is a genus, with its epithet (see `_EPITHET`)."""
    epithet = _EPITHET.match(sentence, span.end)
    if " " in span.text or not epithet or epithet.group(1) in _NOT_EPITHETS or \
            not _BEFORE_GENUS.search(sentence[:span.start]) or \
            sentence[:span.start].rstrip(" ,(").split()[-1:] in (["the"], ["a"], ["an"]):
        return span
    return Span("name", span.start, epithet.end(), sentence[span.start:epithet.end()], species=True)


def _as_time(span: Span) -> Span:
    """"left in May", "closed on Mondays": a month or a weekday is a time, not a name."""
    return Span("date", span.start, span.end, span.text) if is_time_word(span.text) else span


def is_time_word(word: str) -> bool:
    """A month or a weekday ("May", "Mondays")."""
    return word.removesuffix("s") in MONTHS + WEEKDAYS


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

