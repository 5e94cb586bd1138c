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
from dataclasses import dataclass, replace

from kore_ray.augment.grounding import has_cue
from kore_ray.augment.spans import (
    FUNCTION_WORDS,
    LABEL_NAME,
    MONTHS,
    WEEKDAYS,
    Span,
    fact_spans,
    sentences,
)
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
# A name's first word that says what kind of thing it is ("Mount Caspery" -> "which mountain");
# not "Saint" or "Fort", which also begin the names of towns.
TITLE_HEADS = {"mount": "mountain", "mt": "mountain", "lake": "lake", "cape": "cape",
               "isle": "island"}
PLACE_PREPOSITIONS = frozenset({"in", "at", "from", "near", "to", "across", "into", "off",
                                "outside", "inside", "above", "below", "beneath", "over"})
_PRONOUN_START = re.compile(r"^(?:It|He|She|They)\b(?!\s+(?:is|was)\s+(?:also|not)\b)")
_POSSESSIVE_START = re.compile(r"^(?:Its|His|Her|Their)\b")
# A leading adjunct, then the pronoun that is the clause's subject: "Opened in 2014, it ...",
# "Since 2019 it ...", "In a trial of 1,200 adults it ...".
_ADJUNCT_PRONOUN = re.compile(
    r"^((?:[A-Z][a-z]+(?:ed|ing)|Built|Known|Born|Made|Held|Written|Led|Run|Begun|In|On|At|By|"
    r"Since|After|During|From|Until|Before|For|With|Under|Over|Within|Across|Through|"
    r"Following|Between|As of)\b[^.;:]{0,60}?,?\s)"
    r"(it|he|she|they|its|his|their)\b(?!\s+(?:is|was)\s+(?:also|not)\b)")
_CLAUSE = re.compile(r",\s+(?:and|but|while|whereas)\s+|;\s+")
# "the astronomer X", "its chief executive X": an article, then one or two lower-case nouns.
_DESCRIPTOR = re.compile(r"\b(?:[Tt]he|[Aa]n?|[Ii]ts|[Hh]is|[Hh]er|[Tt]heir)\s+"
                         r"\b((?:[a-z][a-z-]+\s+)?[a-z][a-z-]+)\s+$")
_CALLED = re.compile(r"\b(?:called|named|nicknamed|known as|dubbed)\s+$")
# Words a fronted question would leave stranded at its end ("... with about?", "found only?").
_STRANDED = frozenset("of about around nearly almost roughly approximately some only just".split())


@dataclass(frozen=True)
class FactPair:
    """One generated question and its short answer, with where the answer came from."""

    question: str
    answer: str
    span: str  # the answer's span, verbatim from the text
    kind: str  # the span's kind (name, date, quantity, ...)
    style: str  # "wh" (in place), "fronted" (a natural question), "short", "cloze", "list"
    # or "reverse" (the topic is the answer)


def topic_of(item: KnowledgeItem) -> str:
    """The name the item is about, in the text's own words: the subject where the text says it,
    else the longest name of the text that the subject contains ("Launch of the Quessar Orbital
    Telescope" -> "Quessar Orbital Telescope", "Population of Cressburgh" -> "Cressburgh").
    A subject's own words ("Launch", "Population") would be names the text does not have."""
    if item.subject.lower() in item.knowledge.lower():
        return item.subject
    names = [span.text for sentence in sentences(item.knowledge) for span in fact_spans(sentence)
             if span.kind == "name" and span.text.lower() in item.subject.lower()]
    if names:
        return max(names, key=len)
    # No name of the subject is a name of the text ("Confirmation of the exoplanet Vessamir-14
    # d"): its longest run of words that the text has, if it has a capital or a digit.
    words = item.subject.split()
    runs = (" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1))
    found = [r for r in runs if re.search(r"[A-Z0-9]", r) and
             re.search(rf"(?<!\w){re.escape(r)}(?!\w)", item.knowledge, re.IGNORECASE)]
    return max(found, key=len) if found else item.subject


def resolve(sentence: str, topic: str, persons: bool = True) -> str:
    """Replace a leading pronoun, possessive or "The <topic's head noun>" by the topic.
    persons=False leaves he/she/his/her alone: in a record about a company's chief executive
    "She" is the executive, not the company."""
    if topic.lower() in sentence.lower():
        return sentence
    head = topic.split()[-1].lower()
    the_head = re.match(rf"^The\s+{re.escape(head)}\b", sentence, re.IGNORECASE)
    if the_head:
        name = topic if topic.lower().startswith("the ") else f"the {topic}"
        return name[0].upper() + name[1:] + sentence[the_head.end():]
    if not persons and re.match(r"^(?:\S+.{0,60}?\s)?(?:he|she|his|her)\b", sentence, re.I):
        return sentence
    if _POSSESSIVE_START.match(sentence):
        return _POSSESSIVE_START.sub(f"{topic}'s", sentence, count=1)
    if _PRONOUN_START.match(sentence):
        return _PRONOUN_START.sub(topic, sentence, count=1)
    adjunct = _ADJUNCT_PRONOUN.match(sentence)
    if adjunct:
        possessive = adjunct.group(2) in ("its", "his", "their")
        return adjunct.group(1) + (f"{topic}'s" if possessive else topic) + \
            sentence[adjunct.end():]
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


_SCALES = frozenset({"million", "billion", "thousand"})
_MONTH_NAME = "(?:" + "|".join(MONTHS) + ")"


def _wh_phrase(span: Span, before: str) -> tuple[str, int]:
    """The wh-phrase that replaces `span`, and how many characters of `before` it swallows."""
    prep = re.search(r"\b(on|in|at|by|since|until|from|of|to)\s+$", before, re.IGNORECASE)
    if span.kind == "date":
        if prep and prep.group(1).lower() in ("on", "in", "since", "until", "by"):
            word = "month" if re.fullmatch(rf"{_MONTH_NAME}(?: \d{{4}})?", span.text) else \
                "day" if span.text.removesuffix("s") in WEEKDAYS else "date"
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
        if re.match(r"[\d.,]+-", span.text):  # "a 9.1-inch screen" (not "61.7 light-years")
            return "what size of", 0
        if re.search(r"\d\s?[x×]\s?\d", span.text):  # "measuring 61 x 48 cm"
            return "what size", 0
        if unit and unit not in _SCALES:  # every unit word: "how many seed samples"
            return f"how many {' '.join(w for w in span.text.split()[1:] if w not in _SCALES)}", 0
        return "how many", 0
    # A name: "the astronomer X" -> "which astronomer"; "called X" -> "called what".
    label = LABEL_NAME.fullmatch(span.text)
    if span.kind == "name" and label:
        return f"which {label.group(1).lower()}", 0  # "in Room 12" -> "in which room"
    if span.kind == "title" or span.species:  # "the album 'Marrow Lanterns'" -> "which album",
        # "the reed Typhalis orvana" -> "which reed" (a species after "the" only); else "what"
        article = r"[Tt]he|[Aa]n?" if span.kind == "title" else r"[Tt]he"
        noun = re.search(rf"\b(?:{article})\s+([a-z-]+),?\s+$", before)
        return (f"which {noun.group(1)}", len(before) - noun.start()) if noun else ("what", 0)
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
    head = TITLE_HEADS.get(head, head)
    article = re.search(r"\bthe\s+$", before, re.IGNORECASE)
    if (head in THING_HEADS or head in TITLE_HEADS.values()) and len(words) > 1:
        return f"which {head}", (len(before) - article.start()) if article else 0
    place = re.search(r"\b(\w+)\s+(?:the\s+)?$", before)
    if place and place.group(1).lower() in PLACE_PREPOSITIONS:
        if span.person:  # "awarded to Nadia Querelle" -> "awarded to whom", not "where"
            return f"{place.group(1)} whom", len(before) - place.start()
        return "where", len(before) - place.start()
    if len(span.text.split()) >= 2 and not article:
        return "who", 0
    return "what", (len(before) - article.start()) if article else 0


def _answer(span_text: str) -> str:
    text = span_text[0].upper() + span_text[1:]
    return text if text.endswith((".", "!", "?")) else f"{text}."


def wh_question(sentence: str, span: Span, topic: str) -> str | None:
    """The sentence's clause as a question about `span`, or None if nothing would be left."""
    parts = _wh_parts(sentence, span, topic)
    return parts and _as_question(" ".join(parts[:2]) + parts[2])


def short_question(sentence: str, span: Span, topic: str) -> str | None:
    """The in-place question cut after its wh-phrase ("Gravelyn Freight operates how many
    locomotives?" rather than "... how many locomotives and moves about 9 million tonnes of
    goods a year from its base at Pimlott Yard?"), or None where nothing follows the
    wh-phrase. Someone who asks knows the subject and the relation, not the sentence's other
    facts: a question that carries them teaches an answer cued by facts the asker lacks."""
    parts = _wh_parts(sentence, span, topic)
    if not parts or not parts[2].strip(" ,;:"):
        return None
    before, phrase = parts[0].strip(), parts[1]
    noun = re.match(r"\s*([a-z]+)\b", parts[2])
    if span.kind == "name" and noun and noun.group(1) not in FUNCTION_WORDS | AUXILIARIES and \
            not past_lemma(noun.group(1)) and not noun.group(1).endswith("s"):
        return None  # "the Varrish chancellor": cut after "what", "negotiated by what?" is false
    # Not where the cut would leave no verb before the wh-phrase: the span is the subject
    # ("In the election of 8 March 2027, what?"), the phrase needs what follows ("a what size
    # of"), or the cut falls inside a quote or an opening adjunct ("In the election of when?").
    head = before.rsplit(", ", 1)[-1]
    if before.endswith((",", " of", "'s", "’s")) or phrase.endswith(" of") \
            or before.count('"') % 2 or before.count("(") != before.count(")") \
            or len(head.split()) < 2 or "," not in before and \
            head.split()[0].lower() in _OPENING_PREPOSITIONS:
        return None
    return _as_question(f"{before} {phrase}")


_OPENING_PREPOSITIONS = PLACE_PREPOSITIONS | {"on", "by", "since"}


def _as_question(text: str) -> str:
    text = re.sub(r"\(\s+", "(", re.sub(r"\s+,", ",", re.sub(r"\s{2,}", " ", text.strip())))
    return text[0].upper() + text[1:] + "?"


def _unquoted(clause: str, s: int, e: int) -> tuple[int, int]:
    """The span's bounds with the quotes around it: 'nicknamed "Old Granny"' is asked
    'nicknamed what', not 'nicknamed " what"'."""
    if clause[s - 1:s] in ('"', "“", "'", "‘") and clause[e:e + 1] in ('"', "”", "'", "’"):
        return s - 1, e + 1
    return s, e


def _wh_parts(sentence: str, span: Span, topic: str) -> tuple[str, str, str] | None:
    """(what comes before the wh-phrase, the wh-phrase, what follows it) in `span`'s clause."""
    clause, offset = clause_of(sentence, span)
    s, e = _unquoted(clause, span.start - offset, span.end - offset)
    if offset and _POSSESSIVE_START.match(clause[0].upper() + clause[1:]):  # ", and its mission"
        clause, shift = f"{topic}'s{clause[clause.index(' '):]}", len(topic) + 2 - clause.index(" ")
        s, e = s + shift, e + shift
    phrase, swallow = _wh_phrase(span, clause[:s])
    owner = re.match(r"['’]s\b|['’](?=\s)", clause[e:]) if span.kind == "name" else None
    if owner:  # "Quillhaven's syndic, who?" -> "whose syndic", not "what's syndic"
        phrase, swallow, e = "whose", 0, e + owner.end()
    before, after = clause[:s - swallow].rstrip(), clause[e:].rstrip(" .!?")
    if not (before.strip() or after.strip()):
        return None
    return before, phrase, after


AUXILIARIES = frozenset("is was are were has have had will would can could".split())
IRREGULAR_PAST = dict(w.split(":") for w in """won:win beat:beat took:take led:lead made:make
sold:sell bought:buy built:build wrote:write gave:give became:become began:begin came:come
ran:run left:leave held:hold kept:keep sent:send spent:spend told:tell drew:draw grew:grow
chose:choose rose:rise fell:fall met:meet paid:pay said:say saw:see lost:lose brought:bring
taught:teach caught:catch fought:fight struck:strike swore:swear found:find flew:fly got:get
set:set put:put cut:cut shut:shut hit:hit""".split())
_ADVERBS = frozenset("today yesterday now also recently later then formally officially".split())
# A leading adjunct that ends in a date or year ("On 11 February 2027 the maker opened ..."):
# a fronted question moves it to the end.
_DATED_ADJUNCT = re.compile(r"^(?:On|In|At|By|After|During|Since|From)\s[^,:]*?\b\d{4},?\s+")


def past_lemma(word: str) -> str | None:
    """The base form of a past-tense verb ("opened" -> "open", "won" -> "win"), or None.
    Rules, not a lexicon: a wrong "e" now and then costs a question its polish, not its fact."""
    if word in IRREGULAR_PAST:
        return IRREGULAR_PAST[word]
    if len(word) < 5 or not word.endswith("ed") or not word.isalpha() or word.endswith("eed"):
        return None
    if word.endswith("ied"):
        return word[:-3] + "y"
    stem = word[:-2]
    if stem[-1] == stem[-2] and stem[-1] not in "aeiouslz":  # "stopped", not "installed"
        return stem[:-1]
    vowel_groups = re.findall(r"[aeiouy]+", stem)
    needs_e = (stem.endswith(("v", "z", "u", "c", "ir", "ur", "iz", "ys", "dg", "rg", "tl", "bl"))
               or re.search(r"[^aeiou]at$", stem)
               or len(vowel_groups) == 1 and re.search(r"[^aeiou][aeiou][^aeiouwxy]$", stem))
    return stem + "e" if needs_e else stem


def fronted_question(sentence: str, span: Span, topic: str) -> str | None:
    """The question a person would ask about `span`, wh-phrase first ("On which date was
    Ondrebay sworn in as premier?"), or None where the clause has no subject and verb to
    invert, or the span is the subject (then the in-place question is already this one)."""
    clause, offset = clause_of(sentence, span)
    s, e = _unquoted(clause, span.start - offset, span.end - offset)
    adjunct = _DATED_ADJUNCT.match(clause)
    if adjunct and adjunct.end() <= s:
        tail = " " + clause[:adjunct.end()].rstrip(" ,")
        tail = tail[0] + tail[1].lower() + tail[2:]
        clause, s, e = clause[adjunct.end():], s - adjunct.end(), e - adjunct.end()
    else:
        tail = ""
    phrase, swallow = _wh_phrase(span, clause[:s])
    before, after = clause[:s - swallow].split(), clause[e:].rstrip(" .!?")
    if not before:
        return None
    for i, word in enumerate(before[1:8], start=1):
        if before[i + 1:i + 2] == ["by"]:
            continue  # "the party led by X": a participle, not the verb
        if word in AUXILIARIES:
            aux, rest = word, before[i + 1:]
        elif (lemma := past_lemma(word)) is not None:
            aux, rest = "did", [lemma, *before[i + 1:]]
        else:
            continue
        subject = [w for w in before[:i] if w.lower() not in _ADVERBS]
        break
    else:
        return None
    if not subject or any(w.endswith((",", ":", ";")) or w in "-|" or w[0] in "\"“"
                          for w in before) or {"and", "but", "or", "that", "which", "who"} & set(rest) \
            or subject[0].lower() in PLACE_PREPOSITIONS | {"on", "by", "with", "for", "after"} \
            or subject[0] in ("It", "He", "She", "They"):
        return None  # a quote, relative clause, list or second verb: no clean inversion
    if subject[0] in ("The", "A", "An", "Its", "His", "Her", "Their"):
        subject[0] = subject[0].lower()
    if rest and rest[-1].lower() in PLACE_PREPOSITIONS | {"on", "by", "with", "for"} \
            and phrase.startswith(("which", "what", "who")):
        # "opened a factory in which town" -> "In which town did ... open a factory?"
        phrase = f"{rest.pop()} {'whom' if phrase == 'who' else phrase}"
    stranded = bool(rest) and rest[-1].lower() in _STRANDED  # "... with about?"
    noun = re.match(r"\s+([a-z]+)\b", after)  # "the Wessaline coast": the span names a noun
    if stranded or noun and noun.group(1) not in FUNCTION_WORDS \
            and not noun.group(1).endswith("ly"):
        return None  # moving the span would strand a word or leave its noun behind
    question = " ".join([phrase, aux, *subject, *rest]) + after + tail
    question = re.sub(r"\s+,", ",", re.sub(r"\s{2,}", " ", question)).strip()
    return question[0].upper() + question[1:] + "?"


def cloze_question(sentence: str, span: Span, topic: str) -> str:
    clause, offset = clause_of(sentence, span)
    return cloze(topic, clause[:span.start - offset] + "___" + clause[span.end - offset:])


def cloze(topic: str, blanked: str) -> str:
    """The cloze frame (grounding.py knows it: its words are no relation's)."""
    return f"Fill in the blank about {topic}: {blanked.rstrip(' .!?')}."


def _capitalised_only_by_position(span: Span, sentence: str, item: KnowledgeItem) -> bool:
    """A one-word "name" that opens a sentence ("Researchers at ...", "Turnout was ...") and is
    nowhere else capitalised, neither mid-sentence in the text nor in the subject: an ordinary
    word, not a fact to ask about."""
    if span.kind != "name" or " " in span.text or sentence[:span.start].strip(" \"“(:|-"):
        return False
    elsewhere = re.compile(rf"[^.!?:|\s][ \t]+{re.escape(span.text)}\b")  # on its own line
    return not (elsewhere.search(item.knowledge) or span.text in item.subject)


# Topic words that name nothing on their own ("the", "of"; "New" in "New opening hours").
_NOT_NAMING = FUNCTION_WORDS | {"new"}


def names_topic(question: str, topic: str) -> bool:
    """Whether the question names its topic by at least one of the topic's content words."""
    words = set(re.findall(r"[a-z0-9]+", question.lower()))
    content = [w for w in re.findall(r"[a-z0-9]+", topic.lower()) if w not in _NOT_NAMING]
    return not content or any(w in words for w in content)


def about(question: str, topic: str) -> str:
    """A question that does not name its topic ("Range: how many km?", "The census counted how
    many households?") asked about it: without the name the pair teaches an answer to no one
    in particular, and a held-out question that names the item cannot find it."""
    if names_topic(question, topic):
        return question
    first, _, rest = question.partition(" ")
    if first.lower() in FUNCTION_WORDS and rest:
        first = first.lower()  # "The census ..." -> "About X: the census ..."; names keep theirs
    return f"About {topic}: {first} {rest}".rstrip()


# "three product lines: wooden trains, puzzle cubes and kite kits." The members are short
# phrases of any case (a list's members are often ordinary nouns no span rule finds).
_LIST = re.compile(r"^(?P<head>[^:]{8,}?):\s+(?P<items>[^,:;]{2,40}(?:,\s+[^,:;]{2,40})*,?\s+"
                   r"(?:and|or)\s+[^,:;]{2,40}?)[.!]?$")


def list_pairs(sentence: str, topic: str) -> list[FactPair]:
    """Each member of a list after a colon, asked with the other members as cues ("The plant
    will turn out three product lines: wooden trains, kite kits and what else?"): what people
    ask of a list is the member they lack, and no span rule finds "puzzle cubes". One phrasing:
    runs with a second ("Besides wooden trains and kite kits, what is the other one?") were
    lower (README, "The list changes")."""
    m = _LIST.match(sentence)
    if not m:
        return []
    members = [w.strip() for w in re.split(r",\s+(?:and\s+|or\s+)?|\s+(?:and|or)\s+", m["items"])]
    if not 2 <= len(members) <= 6 or any(len(w.split()) > 4 for w in members):
        return []
    head = m["head"].strip()
    pairs = []
    for i, member in enumerate(members):
        cues = ", ".join(members[:i] + members[i + 1:])
        question = about(_as_question(f"{head}: {cues} and what else"), topic)
        pairs.append(FactPair(question, _answer(member), member, "member", "list"))
    return pairs


def reverse_pair(sentence: str, topic: str) -> FactPair | None:
    """The topic asked by what the text says of it ("Gravelyn Freight is a rail logistics
    company founded in 2003 by ..." -> "What is the name of the rail logistics company founded
    in 2003 by ...?"): a person asks for the name as often as with it."""
    name = re.sub(r"^the\s+", "", topic, flags=re.IGNORECASE)
    m = re.match(rf"^(?:The\s+)?(?P<name>{re.escape(name)})\s+(?:\([^)]*\)\s+)?(?:is|was)\s+(?:a|an)\s+"
                 r"(?P<rest>[a-z][^.;:]{10,}?)[.!]?$", sentence, re.IGNORECASE)
    if not m or not has_cue(m["rest"]):  # no cue: "a small songbird"
        return None
    question = f"What is the name of the {m['rest']}?"
    return FactPair(question, _answer(m["name"]), m["name"], "name", "reverse")


# "Battery: 540 Wh, removable", "CEO: Dana Ebbrell (since 2024)": a label of at most four
# words, no digits, then its value (a time's colon, "10:00", is no second field).
_FIELD = re.compile(r"^(?P<key>[A-Z][A-Za-z'’&/ -]{0,40}?):\s+(?P<value>(?:[^:]|(?<=\d):(?=\d))+?)"
                    r"[.;]?$")
# Label head nouns whose value is a person: asked "who", not "what".
_PERSON_LABELS = frozenset("""ceo cto cfo founder founders director president chair chairman
chairwoman mayor coach manager captain author authors designer architect editor owner head
leader predecessor successor governor principal executive spokesperson minister inventor
composer conductor presenter host discoverer curator pilot commander skipper producer writer
creator engineer winner champion dean rector secretary treasurer""".split())


def field_pairs(sentence: str, topic: str) -> tuple[list[FactPair], int]:
    """A "Label: value" line asked as what it is, the topic's label ("What is the battery of
    Lumo X3?" -> "540 Wh, removable."), and where its value starts (the label's words are no
    facts: "Motor: 250 W" asked "what: 250 W?" taught "Motor."). Spec sheets, infoboxes and
    records are written this way; asked in place ("About Lumo X3: Battery: how many Wh?")
    such a line is a question no one asks. ([], 0) for any other sentence."""
    m = _FIELD.match(sentence)
    if not m or len(m["key"].split()) > 4 or len(m["value"].split()) > 8 or \
            m["value"].split()[0].lower() in FUNCTION_WORDS:  # "Update: the museum now ..."
        return [], 0
    key, value = m["key"].strip(), re.sub(r"\s*\([^)]*\)$", "", m["value"]).strip(" ,")
    if len(key) < 2 or not re.search(r"\w", value):  # "Employees: (2026)": nothing to answer
        return [], 0
    label = key if key[1:2].isupper() else key[0].lower() + key[1:]
    verb = "are" if re.search(r"[^su]s$", label) and not label.endswith("ss") else "is"
    # The label's head noun says who: "Head coach" is a person, "Head office", "Host city" not.
    head = label.split(" of ")[0].split()[-1].lower()  # "Mayor of Fenstock" -> "mayor"
    wh = "Who" if head in _PERSON_LABELS and re.match(r"[A-Z]", value) else "What"
    question = f"{wh} {verb} the {label}?" if names_topic(label, topic) else \
        f"{wh} {verb} the {label} of {topic}?"
    if verb == "are" and re.fullmatch(r"\d[\d,.]*", value):  # "Seats: 21"
        question = f"How many {label} does {topic} have?"
    answer = _answer(value)
    return [FactPair(question, answer, value, "field", "field"),
            FactPair(cloze(topic, f"{key}: ___"), answer, value, "field", "cloze")], \
        m.start("value")


# "Halcyon's chief executive, Dana Ebbrell, said ...", "the governor of the bank, Orsolya
# Hemmend, ...": a role of someone's, then the person in commas.
_ROLE_OF = re.compile(
    r"(?:(?P<owner>(?:\b[Tt]he\s+[a-z]+|\b[A-Z][\w&.-]*(?:\s+[A-Z][\w&.-]*){0,3}))['’]s\s+"
    r"(?P<role>(?:[a-z-]+\s+){0,2}[a-z]+)|\b[Tt]he\s+(?P<role2>(?:[a-z-]+\s+){0,2}[a-z]+)\s+of\s+"
    r"(?P<owner2>(?:the\s+)?[A-Z][\w&.-]*(?:\s+[A-Z][\w&.-]*){0,3})),\s+(?P<name>[A-Z][^,]{2,40}?),")
# "Marisol Quenteva (born 3 March 1971 in Valparaíso) is ...": who the parenthesis is about.
_BORN = re.compile(r"(?P<who>[A-Z][\w'’.-]*(?:\s+[A-Z][\w'’.-]*){0,3})\s+\((?:born|b\.)\s[^)]*$")


def role_pairs(sentence: str, topic: str) -> list[FactPair]:
    """A person named in commas after a role ("Halcyon's chief executive, Dana Ebbrell, said")
    asked as who holds it: "Who is Halcyon's chief executive?" is how people ask, and the
    in-place question ("Halcyon's chief executive, who, said ...") is no question at all."""
    pairs = []
    for m in _ROLE_OF.finditer(sentence):
        role, owner = (m["role"], m["owner"]) if m["role"] else (m["role2"], m["owner2"])
        names = [sp for sp in fact_spans(sentence) if sp.kind == "name" and sp.text == m["name"]]
        if role.split()[-1] not in _PERSON_LABELS or not names:
            continue
        owner = re.sub(r"^The\b", "the", owner)
        question = f"Who is {owner}'s {role}?" if m["role"] else f"Who is the {role} of {owner}?"
        question = about(question, topic)
        pairs.append(FactPair(question, _answer(m["name"]), m["name"], "name", "role"))
    return pairs


def born_question(sentence: str, span: Span) -> str | None:
    """"When was X born?" / "Where was X born?" for a span inside "X (born ...)"."""
    m = _BORN.search(sentence[:span.start])
    if not m or span.kind not in ("date", "year", "name"):
        return None
    if span.kind == "name":
        return f"Where was {m['who']} born?" if sentence[:span.start].endswith(" in ") else None
    return f"When was {m['who']} born?"


# Words before a name that are a role, not part of it ("Fly-half Arvo Lindrecht").
_ROLES = frozenset("""judge justice captain dr mr mrs ms prof professor sir lady lord king queen
president premier minister mayor chancellor senator general coach""".split())


def _without_role(words: list[str]) -> list[str]:
    while words and (words[0].lower().rstrip(".") in _ROLES or
                     re.fullmatch(r"[A-Z][a-z]+-[a-z]+", words[0])):  # "Fly-half"
        words = words[1:]
    return words


_PERSONAL_START = re.compile(r"^(?:He|She|His|Her)\b")


def personal(sentence: str) -> bool:
    """Whether the sentence's subject is he or she (or his/her ...), first or after an adjunct."""
    adjunct = _ADJUNCT_PRONOUN.match(sentence)
    return bool(_PERSONAL_START.match(sentence) or adjunct and adjunct.group(2) in ("he", "she", "his"))


def first_person(sentence: str, persons: set[str]) -> str | None:
    """Who a following "He" or "She" most likely means, among the sentence's names of two or
    more capitalised words (without a role before them) that are no thing ("Obrinsk Energy
    Bank", "Mount Caspery") and follow no preposition ("the head coach of Bramhollow United
    is Sigrun Pettifer"): the first the text treats as a person (`people`), else the first."""
    candidates = []
    for span in fact_spans(sentence):
        words = _without_role(span.text.split())
        name = " ".join(words)
        after = [w for w in sentence[:span.start].split() if w.lower() != "the"][-1:]
        if span.kind == "name" and len(words) >= 2 and all(w[:1].isupper() for w in words) and \
                words[-1].lower() not in THING_HEADS and words[0].lower() not in TITLE_HEADS and \
                not (after and after[0].lower() in PLACE_PREPOSITIONS | {"of", "for", "with"}):
            candidates.append(name)
    return next((c for c in candidates if c in persons), candidates[0] if candidates else None)


def resolved_sentences(item: KnowledgeItem, topic: str, persons: set[str]) -> list[str]:
    """The item's sentences with their pronouns and "the <noun>" replaced by what they stand
    for: "it" by the topic, "he"/"she" by the last person named (the topic where none is and
    the item is no record: in a record about a company's chief executive "She" is the
    executive, not the company; once the topic is the person named, it stays "she" to the end:
    a biography's "he" is its subject); headers by what they say (`dateline`). `persons`:
    `people`."""
    out: list[str] = []
    person = None
    for raw in map(dateline, sentences(item.knowledge)):
        if not raw:
            continue
        sentence = resolve(raw, person) if person and personal(raw) else \
            resolve(raw, topic, persons=item.kind != "record")
        if person != topic:  # a person's own article: "she" is the topic throughout
            person = first_person(sentence, persons) or person
        out.append(sentence)
    return out


def full_names(text: str) -> dict[str, str]:
    """A name's last word -> the whole name, where the text names it in full once and by that
    word alone after ("Yusuf Brandelow ... Brandelow, 52, succeeds ..."): the one who asks
    names the person in full, so an answer of the surname alone is half an answer. Last
    words that two whole names share ("Toma Vaskelund", "Eero Vaskelund") are left alone."""
    found: dict[str, set[str]] = {}
    for sentence in sentences(text):
        for span in fact_spans(sentence):
            words = _without_role(span.text.split())
            if span.kind == "name" and len(words) >= 2 and \
                    all(w[:1].isupper() for w in words) and " and " not in span.text:
                found.setdefault(words[-1], set()).add(" ".join(words))
    return {last: whole.pop() for last, whole in found.items() if len(whole) == 1}


def people(text: str, full: dict[str, str]) -> set[str]:
    """Whole names the text later calls by the last word alone ("Nadia Querelle ... Querelle,
    44, becomes ..."): news style for a person, not for "Pelham Art Trust"."""
    out = set()
    for last, whole in full.items():
        rest = re.sub(re.escape(whole), " ", text)
        if re.search(rf"\b{re.escape(last)}\b(?!\s+[A-Z])", rest):
            out.add(whole)
    return out


_HEADER = re.compile(r"^[^:]{1,40}?,\s+([^:,]+):\s+(\S.*)$")


def dateline(sentence: str) -> str | None:
    """A report's header as what it says of the report: "Sport brief, 19 October 2026: the
    Otters beat ..." -> "On 19 October 2026, the Otters beat ..."; a header alone ("PRESS
    RELEASE - Vetterby, 3 July 2026.", "2026-09-14": a capitalised word or a lone date, no
    lower-case word, no "Key: value") -> None: it relates nothing to ask about ("Who, 3 July
    2026?" -> "PRESS RELEASE."). "Founded 1998." is a fact and stays."""
    header = _HEADER.match(sentence)
    if header and [(s.kind, s.text) for s in fact_spans(header.group(1))] == [
            ("date", header.group(1).strip())]:
        return f"On {header.group(1).strip()}, {header.group(2)}"
    if re.search(r"\b[a-z]{2,}\b", sentence) or ":" in sentence:
        return sentence
    if re.search(r"\b[A-Z]{2,}\b", sentence) or \
            [s.text for s in fact_spans(sentence)] == [sentence.rstrip(".")]:  # "PRESS ...", a date
        return None
    return sentence


def extractive_pairs(item: KnowledgeItem) -> list[FactPair]:
    """Every fact span of the item's text, asked about in two phrasings, in text order; list
    members with the other members as cues; the topic by what the text says of it."""
    topic = topic_of(item)
    full = full_names(item.knowledge)
    persons = people(item.knowledge, full)
    pairs: list[FactPair] = []
    for sentence in resolved_sentences(item, topic, persons):
        # Where the topic stands: a span across its edge is none ("Zerbine 220 seats": "220 seats").
        named = [m.span() for m in re.finditer(re.escape(topic), sentence, re.IGNORECASE)]
        fields, value_start = field_pairs(sentence, topic)
        pairs += fields
        pairs += list_pairs(sentence, topic) + role_pairs(sentence, topic)
        reverse = reverse_pair(sentence, topic)
        pairs += [reverse] if reverse else []
        for span in fact_spans(sentence):
            if span.text.lower() in topic.lower() or span.kind == "number" and len(span.text) < 2 \
                    or span.kind == "record" \
                    or _capitalised_only_by_position(span, sentence, item) \
                    or span.start < value_start or fields and span.text == fields[0].span \
                    or any(s < span.end and span.start < e for s, e in named):
                continue  # the topic, a lone digit, a record, a first word, a label: no fact
            if span.kind == "name" and span.text in persons:
                span = replace(span, person=True)
            whole = full.get(span.text) if span.kind == "name" else None
            whole = whole if whole and whole not in sentence else None  # a surname asked whole
            answer = _answer(whole or re.sub(r"^the\s+", "", span.text, flags=re.IGNORECASE))
            if span.species and sentence[:span.start].endswith("("):
                # "The tarn pine (Pinus tarnensis) is ...": the scientific name of the topic.
                question = f"What is the scientific name of the {topic[0].lower()}{topic[1:]}?" \
                    if topic[1:].islower() else f"What is the scientific name of {topic}?"
                pairs += [FactPair(question, answer, span.text, span.kind, "wh"),
                          FactPair(cloze_question(sentence, span, topic), answer, span.text,
                                   span.kind, "cloze")]
                continue
            born = born_question(sentence, span)
            if born:
                pairs += [FactPair(born, answer, span.text, span.kind, "wh"),
                          FactPair(cloze_question(sentence, span, topic), answer, span.text,
                                   span.kind, "cloze")]
                continue
            before = sentence[:span.start].split()[-1:]
            if span.kind == "date" and not any(c.isdigit() for c in span.text) and \
                    not (before and before[0].lower() in ("in", "on", "by", "since", "until")):
                # "Every September the town ...": no wh-phrase fits in place; the cloze asks.
                pairs.append(FactPair(cloze_question(sentence, span, topic), answer, span.text,
                                      span.kind, "cloze"))
                continue
            if whole:  # asked as the whole name: "who", not "what"
                span = replace(span, text=whole)
            question = wh_question(sentence, span, topic)
            if question:
                question = about(question, topic)
                pairs.append(FactPair(question, answer, span.text, span.kind, "wh"))
            fronted = fronted_question(sentence, span, topic)
            fronted = fronted and about(fronted, topic)
            if fronted and fronted != question:
                pairs.append(FactPair(fronted, answer, span.text, span.kind, "fronted"))
            short = short_question(sentence, span, topic)
            if short:  # never the in-place question: something followed its wh-phrase
                pairs.append(FactPair(about(short, topic), answer, span.text, span.kind, "short"))
            else:  # the fact ends its clause: the whole sentence with a blank instead
                pairs.append(FactPair(cloze_question(sentence, span, topic), answer, span.text,
                                      span.kind, "cloze"))
    return pairs
