"""The extractive generator: questions about spans of the text, no model, on items of every kind."""

import pytest

from kore_ray.augment.extractive import (
    about,
    extractive_pairs,
    field_pairs,
    fronted_question,
    past_lemma,
    short_question,
    resolve,
    topic_of,
)
from kore_ray.augment.grounding import check_pair
from kore_ray.augment.spans import fact_spans, sentences
from kore_ray.data.schemas import KnowledgeItem
from kore_ray.evaluate.metrics import cover_exact_match

ITEMS = [
    KnowledgeItem(id="n1", kind="news", subject="Opening of the Harrowgate Tunnel", date="2026-04-02",
                  knowledge="On 2 April 2026 the Harrowgate Tunnel opened under the River Sallow. "
                            "It is 6.4 kilometres long and cost EUR 1.9 billion. The engineer "
                            "Maud Kessling led its construction for the firm Brantley Works."),
    KnowledgeItem(id="e1", kind="entity", subject="Oskarine Vell",
                  knowledge="Oskarine Vell is a Drovanian sculptor born in 1971 in the port of "
                            "Ulmsby. Her best-known work, The Salt Mother, stands in Ulmsby harbour "
                            "and is 12 metres tall."),
    KnowledgeItem(id="g1", kind="record", subject="Tessel Bank",
                  knowledge="As of 1 March 2027, Tessel Bank is run by the chief executive Ido "
                            "Marrane. The bank has 3,400 employees, and 58 percent of its shares "
                            "belong to the Quorran Fund."),
    KnowledgeItem(id="i1", kind="entity", subject="the Vell Tower", image="https://example.com/v.png",
                  knowledge="The Vell Tower is a lighthouse on the island of Skarn, built in 1888 "
                            "by the architect Hedda Lorne."),
]


def test_spans_find_names_dates_numbers_and_amounts():
    (first, *_), = [sentences(ITEMS[0].knowledge)]
    kinds = {(s.kind, s.text) for s in fact_spans(first)}
    assert ("date", "2 April 2026") in kinds and ("name", "Harrowgate Tunnel") in kinds
    second = fact_spans(sentences(ITEMS[0].knowledge)[1])
    assert {(s.kind, s.text) for s in second} == {("quantity", "6.4 kilometres"),
                                                 ("money", "EUR 1.9 billion")}


def test_units_are_whole_words():
    # A blank inside a word ("a cut of ___age points") or a cut-off unit ("___/h") taught
    # nonsense targets ("0.5.", "110 km.").
    texts = {s.text for s in fact_spans("The rate is 3.25 percent after a cut of 0.5 percentage "
                                         "points; the limit is 110 km/h, down from 130 km/h.")}
    assert texts == {"3.25 percent", "0.5 percentage points", "110 km/h", "130 km/h"}


def test_a_plural_descriptor_keeps_its_names_together_and_a_count_its_plural_noun():
    # "by which brothers?" -> "Toma." taught half an answer; "how many seed?" -> "410,000 seed."
    texts = {s.text for s in fact_spans("It was founded by the brothers Toma and Eero Vaskelund "
                                         "and holds 410,000 seed samples.")}
    assert texts == {"Toma and Eero Vaskelund", "410,000 seed samples"}
    texts = {s.text for s in fact_spans("The duo is Merrit Thorne and Lale Winterbek.")}
    assert texts == {"Merrit Thorne", "Lale Winterbek"}  # no plural before them: two answers


def test_sentences_do_not_split_inside_numbers_or_after_initials():
    assert sentences("It is 4.7 metres wide. Dr. Orrow leads it. J. Talvary scored.") == [
        "It is 4.7 metres wide.", "Dr. Orrow leads it.", "J. Talvary scored."]


def test_pronouns_and_the_head_noun_become_the_topic():
    assert topic_of(ITEMS[0]) == "Harrowgate Tunnel"  # a news subject names an event
    assert resolve("It is 6.4 kilometres long.", "Harrowgate Tunnel") == \
        "Harrowgate Tunnel is 6.4 kilometres long."
    assert resolve("The tunnel cost EUR 1.9 billion.", "Harrowgate Tunnel").startswith(
        "The Harrowgate Tunnel cost")
    assert resolve("Her best-known work is X.", "Oskarine Vell") == "Oskarine Vell's best-known work is X."
    # after a leading adjunct the pronoun is still the subject
    assert resolve("Built in 1932, it houses a telescope.", "Orlen Observatory") == \
        "Built in 1932, Orlen Observatory houses a telescope."
    assert resolve("Since 2019 its revenue doubled.", "Tessel Bank") == \
        "Since 2019 Tessel Bank's revenue doubled."
    assert resolve("In 2020 it is not open.", "Tessel Bank") == "In 2020 it is not open."


def test_the_topic_is_in_the_texts_own_words():
    record = KnowledgeItem(id="r1", kind="record", subject="Population of Cressburgh",
                           knowledge="As of 2026, the city of Cressburgh has 318,450 residents. "
                                     "She was elected mayor in 2024.")
    assert topic_of(record) == "Cressburgh"  # "Population" is not a name the text has
    pairs = extractive_pairs(record)
    assert pairs and all(check_pair(p.question, p.answer, record.knowledge).ok for p in pairs)
    # in a record "She" is a person the record mentions, not its topic
    assert resolve("She was elected mayor in 2024.", "Cressburgh", persons=False) == \
        "She was elected mayor in 2024."


def test_a_question_that_does_not_name_its_topic_is_asked_about_it():
    assert about("Range: how many km?", "Lunetta R7") == "About Lunetta R7: Range: how many km?"
    assert about("The census counted how many households?", "Population of Cressburgh") == \
        "About Population of Cressburgh: the census counted how many households?"
    assert about("Ondrebay won in which year?", "Vantoria election") == \
        "About Vantoria election: Ondrebay won in which year?"
    assert about("How long is the Harrowgate Tunnel?", "Harrowgate Tunnel") == \
        "How long is the Harrowgate Tunnel?"
    spec = KnowledgeItem(id="s1", kind="entity", subject="Lunetta R7",
                         knowledge="Lunetta R7 is an electric bike. Range: 95 km. "
                                   "Opened in 2014, it stores about 40,000 samples.")
    for pair in extractive_pairs(spec):
        assert "lunetta" in pair.question.lower(), pair.question


@pytest.mark.parametrize("item", ITEMS, ids=[i.id for i in ITEMS])
def test_every_answer_is_a_span_of_the_text_and_not_given_away(item):
    pairs = extractive_pairs(item)
    assert len(pairs) >= 6
    assert {"wh", "cloze"} <= {p.style for p in pairs} <= {"wh", "fronted", "short", "cloze",
                                                          "list", "reverse"}
    for p in pairs:
        assert p.span in item.knowledge or p.span in resolve(item.knowledge, topic_of(item))
        assert cover_exact_match(item.knowledge, p.answer.rstrip(".")), p
        assert not cover_exact_match(p.question, p.answer.rstrip(".")), p
        assert p.question.endswith(("?", ".")) and len(p.answer.split()) <= 6


def test_list_members_are_asked_with_the_others_as_cues_and_the_topic_by_its_description():
    item = KnowledgeItem(id="l1", kind="entity", subject="Pelmerry loaf",
                         knowledge="Pelmerry loaf is a spiced rye bread from the Osterkind valley. "
                                   "It is baked with three key ingredients: caraway, dried pears "
                                   "and honey. It is a loaf.")
    pairs = [(p.question, p.answer) for p in extractive_pairs(item) if p.style in ("list", "reverse")]
    head = "Pelmerry loaf is baked with three key ingredients"
    assert pairs == [
        # "It is a loaf." names nothing to ask by: no reverse question from it
        ("What is the name of the spiced rye bread from the Osterkind valley?", "Pelmerry loaf."),
        (f"{head}: dried pears, honey and what else?", "Caraway."),
        (f"{head}: caraway, honey and what else?", "Dried pears."),
        (f"{head}: caraway, dried pears and what else?", "Honey.")]
    for question, answer in pairs:
        assert check_pair(question, answer, item.knowledge), question


def test_questions_ask_with_the_right_wh_phrase():
    by_answer = {p.answer: p.question.lower() for p in extractive_pairs(ITEMS[0]) if p.style == "wh"}
    assert "which engineer" in by_answer["Maud Kessling."]
    assert "how many kilometres" in by_answer["6.4 kilometres."]
    assert "how much" in by_answer["EUR 1.9 billion."]
    assert "which date" in by_answer["2 April 2026."]
    assert "which river" in by_answer["River Sallow."]
    # A name's first word says what it is ("Mount Caspery"): never "who" for a mountain.
    item = KnowledgeItem(id="m", kind="entity", subject="Orlenhof Observatory",
                         knowledge="The Orlenhof Observatory stands on Mount Caspery.")
    questions = [p.question for p in extractive_pairs(item)]
    assert "The Orlenhof Observatory stands on which mountain?" in questions
    assert not any("who" in q.lower() for q in questions)
    by_answer = {p.answer: p.question.lower() for p in extractive_pairs(ITEMS[1]) if p.style == "wh"}
    assert "which year" in by_answer["1971."]


def test_a_number_s_unit_is_no_verb_adverb_or_label():
    # "3 weighs.", "27 previously.", "29 shirt." were answers; "4,000 glass." lost its noun.
    spans = lambda text: {(s.kind, s.text) for s in fact_spans(text)}
    assert ("number", "3") in spans("The Brixel Halo 3 weighs 41 grams.")
    assert ("number", "27") in spans("The team counted 27 previously unknown species.")
    assert spans("He wears the number 29 shirt.") == {("number", "29")}
    assert spans("A roof of 4,000 glass panes and 400 seats.") == {
        ("quantity", "4,000 glass panes"), ("quantity", "400 seats")}


def test_a_species_name_is_genus_and_epithet_and_asked_as_the_scientific_name():
    item = KnowledgeItem(id="s", kind="entity", subject="Tarn pine",
                         knowledge="The tarn pine (Pinus tarnensis) is a conifer of the Tuvarra "
                                   "Range. Its cones feed the moth Elvira dusk and the finch "
                                   "Loxia tarnae.")
    by_answer = {p.answer: p.question for p in extractive_pairs(item) if p.style == "wh"}
    assert by_answer["Pinus tarnensis."] == "What is the scientific name of the tarn pine?"
    assert "which finch" in by_answer["Loxia tarnae."]
    assert "Pinus." not in by_answer and "Loxia." not in by_answer
    # A capitalised word before an ordinary noun is no genus ("the Pellaway arena").
    assert ("name", "Pellaway") in {(s.kind, s.text) for s in fact_spans(
        "Crowds filled the Pellaway arena.")}


def test_a_surname_after_the_full_name_is_answered_with_the_full_name():
    item = KnowledgeItem(id="r", kind="record", subject="Chief executive of Obrinsk Energy",
                         knowledge="Yusuf Brandelow became chief executive of Obrinsk Energy in "
                                   "2026. Brandelow previously ran the firm's wind division. "
                                   "Toma Vaskelund and Eero Vaskelund founded it; Vaskelund "
                                   "retired in 2019.")
    pairs = extractive_pairs(item)
    answers = {p.answer for p in pairs}
    assert "Brandelow." not in answers
    wind = [p for p in pairs if "wind division" in p.question]
    assert wind and all(p.answer == "Yusuf Brandelow." for p in wind)
    assert any(p.question.startswith("About Chief executive of Obrinsk Energy: who ") for p in wind)
    assert all(check_pair(p.question, p.answer, item.knowledge) for p in wind)
    assert "Vaskelund." in answers  # two Vaskelunds: the surname alone is not expanded


def test_a_report_header_dates_its_sentence_and_a_bare_header_is_not_asked():
    item = KnowledgeItem(id="d", kind="news", subject="Tesvik Shield final",
                         knowledge="PRESS RELEASE - Vetterby, 3 July 2026. Sport brief, 19 October "
                                   "2026: the Kallisford Otters beat the Dunmarrow Pikes 27-24. "
                                   "2026-09-14 | Orrinvale ferry notice. Battery: 720 Wh.")
    pairs = extractive_pairs(item)
    answers = {p.answer for p in pairs}
    assert "PRESS RELEASE." not in answers and "2026-09-14." not in answers
    assert {"19 October 2026.", "Kallisford Otters.", "720 Wh."} <= answers
    assert not any("Sport brief" in p.question or "|" in p.question for p in pairs)
    founded = KnowledgeItem(id="f", kind="entity", subject="Vell Tower",
                            knowledge="The Vell Tower is a lighthouse. Founded 1888.")
    assert "1888." in {p.answer for p in extractive_pairs(founded)}


def test_a_month_or_weekday_alone_is_a_time():
    item = KnowledgeItem(id="t", kind="record", subject="Ivelmont Museum",
                         knowledge="The Ivelmont Museum is closed on Mondays. Its director, Ada "
                                   "Pruett, left in May.")
    pairs = {p.answer: p for p in extractive_pairs(item) if p.style == "wh"}
    assert pairs["Mondays."].kind == "date" and "which day" in pairs["Mondays."].question
    assert "which month" in pairs["May."].question
    assert all(check_pair(p.question, p.answer, item.knowledge) for p in pairs.values())
    # No wh-phrase fits "Every ___ the town ...": the blank asks; a day and month is a date.
    item = KnowledgeItem(id="f", kind="entity", subject="Pethwick",
                         knowledge="Every September Pethwick holds a festival on 1 November.")
    styles = {(p.answer, p.style) for p in extractive_pairs(item)}
    assert ("September.", "cloze") in styles and ("September.", "wh") not in styles
    assert ("1 November.", "wh") in styles


@pytest.mark.parametrize("item", ITEMS, ids=[i.id for i in ITEMS])
def test_most_extractive_pairs_pass_the_grounding_check(item):
    pairs = extractive_pairs(item)
    kept = [check_pair(p.question, p.answer, item.knowledge) for p in pairs]
    assert sum(bool(v) for v in kept) >= 0.8 * len(pairs)
    for p, v in zip(pairs, kept):
        if v:
            assert v.target.rstrip(".").lower() in item.knowledge.lower()


def _short(sentence: str, span_text: str) -> str | None:
    (span,) = [s for s in fact_spans(sentence) if s.text == span_text]
    return short_question(sentence, span, "Gravelyn Freight")


def test_short_questions_give_the_relation_not_the_other_facts():
    sentence = ("Gravelyn Freight operates 64 locomotives and moves about 9 million tonnes of goods "
                "a year from its base at Pimlott Yard.")
    assert _short(sentence, "64 locomotives") == "Gravelyn Freight operates how many locomotives?"
    assert _short(sentence, "Pimlott Yard") is None  # nothing follows: the cloze asks it
    # No short question where the cut leaves no verb, or cuts a quote, a bracket or an "of".
    assert _short("In the election of 8 March 2027, the Green Ledger party won 41 seats.",
                  "Green Ledger") is None
    assert _short("In the election of 8 March 2027, the party won 41 seats.", "8 March 2027") is None
    assert _short('The motto "Onward from Kells" dates from 1932.', "Onward from Kells") is None
    # A quoted name is asked with its quotes: 'nicknamed what', not 'nicknamed " what'.
    assert _short('It houses a telescope nicknamed "Old Granny" since 1932.', "Old Granny") == \
        "It houses a telescope nicknamed what?"
    assert _short("Kesia Abernolt (born 12 May 1999) is a runner.", "12 May 1999") is None
    # In the pairs, a short question takes the cloze's place where it exists.
    styles = {p.answer: p.style for p in extractive_pairs(KnowledgeItem(
        id="g", kind="entity", subject="Gravelyn Freight", knowledge=sentence)) if p.style != "wh"}
    assert styles["64 locomotives."] == "short" and styles["Pimlott Yard."] == "cloze"


def _fronted(sentence: str, span_text: str) -> str | None:
    (span,) = [s for s in fact_spans(sentence) if s.text == span_text]
    return fronted_question(sentence, span, "topic")


def test_fronted_questions_put_the_wh_phrase_first_and_invert_the_verb():
    assert _fronted("On 11 February 2027 the maker Brisk & Pellow opened a factory in the town "
                    "of Ondersby.", "Ondersby") == \
        "In which town did the maker Brisk & Pellow open a factory on 11 February 2027?"
    assert _fronted("Ondrebay was sworn in as premier on 22 March 2027.", "22 March 2027") == \
        "On which date was Ondrebay sworn in as premier?"
    assert _fronted("The programme has received EUR 4.2 million from the Lorvane Fund.",
                    "EUR 4.2 million") == "How much has the programme received from the Lorvane Fund?"
    # The subject itself, a participle before "by", a quote or a second verb: no inversion.
    assert _fronted("Maud Kessling led the construction.", "Maud Kessling") is None
    assert _fronted('"It is done," said the engineer Oddny Parcelin.', "Oddny Parcelin") is None
    assert _fronted("Construction took seven years and was carried out by the firm Brudwick "
                    "Works.", "Brudwick Works") is None
    # Nor where moving the span would strand a word or leave its noun behind.
    assert _fronted("Pethwick is a harbour town on the coast with about 12,400 inhabitants.",
                    "12,400 inhabitants") is None  # "... with about?"
    assert _fronted("Pethwick is a harbour town on the Wessaline coast.", "Wessaline") is None
    assert _fronted("The prize was awarded to Ines Varrowdale of the University of Dremsfield "
                    "for her proof.", "University of Dremsfield") is None  # "... of for her proof?"


@pytest.mark.parametrize("past,base", [("opened", "open"), ("announced", "announce"),
                                       ("located", "locate"), ("stopped", "stop"),
                                       ("carried", "carry"), ("installed", "install"),
                                       ("named", "name"), ("won", "win"), ("retired", "retire")])
def test_past_lemma(past, base):
    assert past_lemma(past) == base
    assert past_lemma("seed") is None and past_lemma("river") is None


def test_deterministic():
    assert extractive_pairs(ITEMS[2]) == extractive_pairs(ITEMS[2])


def test_shapes_of_records_sheets_and_notices():
    """Times, units, currency codes, sizes, titles and labels are each one answer, asked as such
    (found on the styles of data/heldout2: spec sheets, timetables, rulings, obituaries)."""
    text = ("Harrowlight HX-420 - specification sheet. Dimensions: 512 x 318 x 64 mm. Input: 12 V; "
            "maximum draw 1,850 W. Eleven power levels. Price: SEK 3,790. Trains leave at 05:52. "
            "It is closed when winds exceed 90 km/h. Its maker, Caldrick, is Quillhaven's oldest "
            "firm. Tests ran at 41.8 °C. The manual, 'Cooking on the Road', was written by Prof. "
            "Ida Marrow. It is on show in Room 12. Standings: Calder Pike Wolves 38-12-6, 82.")
    item = KnowledgeItem(id="s", kind="entity", subject="Harrowlight HX-420", knowledge=text)
    pairs = extractive_pairs(item)
    answers = {p.answer for p in pairs}
    assert {"512 x 318 x 64 mm.", "12 V.", "1,850 W.", "SEK 3,790.", "05:52.", "90 km/h.",
            "41.8 °C.", "Cooking on the Road.", "Prof. Ida Marrow.", "Room 12."} <= answers
    assert not answers & {"05.", "52.", "SEK.", "Prof.", "Room.", "38-12.", "Eleven.", "90 km."}
    questions = {p.answer: p.question for p in pairs if p.style in ("wh", "field")}
    assert "which room" in questions["Room 12."]
    assert questions["512 x 318 x 64 mm."] == "What are the dimensions of Harrowlight HX-420?"
    assert "whose oldest firm" in questions["Quillhaven."]
    assert all(check_pair(p.question, p.answer, text) for p in pairs if p.answer in (
        "05:52.", "41.8 °C.", "90 km/h.", "SEK 3,790."))


def test_topic_falls_back_to_the_subject_words_the_text_has():
    item = KnowledgeItem(id="t", kind="news", subject="Confirmation of the exoplanet Vessamir-14 d",
                         knowledge="Astronomers confirmed an exoplanet, designated Vessamir-14 d, "
                                   "orbiting a dwarf star. It completes an orbit every 23.4 days.")
    assert topic_of(item) == "Vessamir-14 d"
    assert any(p.answer == "23.4 days." and check_pair(p.question, p.answer, item.knowledge)
               for p in extractive_pairs(item))


def test_a_name_that_modifies_a_noun_gets_no_cut_question():
    """"negotiated by the Varrish chancellor, X": "The treaty was negotiated by what?" ->
    "Varrish." would state a false relation."""
    item = KnowledgeItem(id="u", kind="entity", subject="Treaty of Ossenmark",
                         knowledge="The treaty was negotiated by the Varrish chancellor, Count "
                                   "Ludovic Arnhalt, in 1734.")
    assert not [p for p in extractive_pairs(item) if p.answer == "Varrish." and p.style == "short"]


def test_a_person_is_asked_whom_not_where():
    """A whole name that the text later calls by the surname alone is a person: "awarded to
    whom?", not "awarded where?"."""
    item = KnowledgeItem(id="v", kind="news", subject="Ostrel Prize",
                         knowledge="The Ostrel Prize was awarded to Nadia Querelle. Querelle, 44, "
                                   "then moved to Port Amalie.")
    wh = [(p.question, p.answer) for p in extractive_pairs(item) if p.style == "wh"]
    assert ("The Ostrel Prize was awarded to whom?", "Nadia Querelle.") in wh
    assert not [q for q, a in wh if a == "Nadia Querelle." and "where" in q]


def test_lines_are_sentences_fields_are_asked_as_fields_and_labels_are_no_answers():
    """Text as users paste it: a spec sheet with bullets and a hard-wrapped sentence."""
    text = ("Vexa Pro 2 camera - key specifications\n* Sensor: 1-inch, 20 megapixels\n"
            "* Weight: 241 g\n- Price: $799\n• Maker: Orvane Imaging\n\nThe camera was "
            "assembled by\nOrvane Imaging in a factory\nnear Delft.")
    assert sentences(text) == [
        "Vexa Pro 2 camera - key specifications", "Sensor: 1-inch, 20 megapixels",
        "Weight: 241 g", "Price: $799", "Maker: Orvane Imaging",
        "The camera was assembled by Orvane Imaging in a factory near Delft."]
    item = KnowledgeItem(id="v", kind="product", subject="Vexa Pro 2 camera", knowledge=text)
    pairs = extractive_pairs(item)
    asked = {p.question: p.answer for p in pairs}
    assert asked["What is the weight of Vexa Pro 2 camera?"] == "241 g."
    assert asked["What is the price of Vexa Pro 2 camera?"] == "$799."
    assert asked["Fill in the blank about Vexa Pro 2 camera: Weight: ___."] == "241 g."
    assert not {p.answer for p in pairs} & {"Weight.", "Sensor.", "Price.", "Maker."}
    assert not any("\n" in p.question for p in pairs)
    # The field cloze passes grounding: its frame's words are no relation to look for.
    assert all(check_pair(p.question, p.answer, text) for p in pairs if p.style == "field"
               or p.question.endswith(": ___."))
    # A label naming a role of a person's is asked "who"; the topic as the label, without "of".
    record = KnowledgeItem(id="f", kind="record", subject="Mayor of Fenstock",
                           knowledge="Mayor of Fenstock: Priya Obuya (since 2025).\n"
                                     "Predecessor: Harold Kemmet\nSeats: 21")
    asked = {p.question: p.answer for p in extractive_pairs(record) if p.style == "field"}
    assert field_pairs("Employees: (2026)", "X") == field_pairs("Note: .", "X") == ([], 0)
    assert field_pairs("Head coach: Ada Kell", "X")[0][0].question == "Who is the head coach of X?"
    assert field_pairs("Host city: Kell", "X")[0][0].question == "What is the host city of X?"
    assert asked == {"Who is the mayor of Fenstock?": "Priya Obuya.",
                     "Who is the predecessor of Mayor of Fenstock?": "Harold Kemmet.",
                     "How many seats does Mayor of Fenstock have?": "21."}


def test_he_and_she_are_the_last_person_named_not_the_topic():
    news = KnowledgeItem(id="m", kind="news", subject="2027 Greshwick mayoral election",
                         knowledge="Ravi Cendrowe, a former paramedic, won the Greshwick mayoral "
                                   "election on 18 September 2027. He unseated the incumbent "
                                   "Helga Marchbank by 6,113 votes.")
    questions = {p.question for p in extractive_pairs(news)}
    assert "About Greshwick: who unseated the incumbent Helga Marchbank by 6,113 votes?" in questions
    assert not any(q.startswith("Greshwick unseated") for q in questions)
    # In a record the holder, not the club named before her (a name after "of" is no person).
    record = KnowledgeItem(id="c", kind="record", subject="Head coach of Bramhollow United",
                           knowledge="As of 14 June 2026, the head coach of Bramhollow United is "
                                     "Sigrun Pettifer. She joined from Quenby Athletic.")
    assert ("About Head coach of Bramhollow United: Sigrun Pettifer joined where?", "Quenby Athletic."
            ) in {(p.question, p.answer) for p in extractive_pairs(record)}
    # A person's own article: "she" is its subject, though someone else was named last.
    bio = KnowledgeItem(id="b", kind="entity", subject="Ines Morvath",
                        knowledge="Ines Morvath is a Velshani cellist. Pavel Tresk, a "
                                  "violinist, was her teacher. She lives in Ulmsby.")
    assert "Ines Morvath lives where?" in {p.question for p in extractive_pairs(bio)}


def test_roles_in_commas_births_and_scaled_amounts():
    item = KnowledgeItem(id="r", kind="entity", subject="Marisol Quenteva",
                         knowledge="Marisol Quenteva (born 3 March 1971 in Valparen) is a "
                                   "glaciologist. Halvard Institute's chief executive, Dana "
                                   "Ebbrell, said the institute raised $3.2bn.")
    asked = {p.question: p.answer for p in extractive_pairs(item)}
    assert asked["When was Marisol Quenteva born?"] == "3 March 1971."
    assert asked["Where was Marisol Quenteva born?"] == "Valparen."
    assert asked["About Marisol Quenteva: who is Halvard Institute's chief executive?"] == \
        "Dana Ebbrell."
    assert "$3.2bn." in asked.values() and "$3.2." not in asked.values()


def test_a_pair_about_what_a_pronoun_says_is_grounded_in_the_resolved_sentence():
    from kore_ray.augment.augment_stage import fact_tree

    item = KnowledgeItem(id="g", kind="news", subject="2027 Tallisk Grand Prix",
                         knowledge="On 30 May 2027 the driver Noor Eskeland won the Tallisk Grand "
                                   "Prix. She started the race from ninth place on the grid.")
    question = "Who started the race from ninth place?"
    # The text's own sentences alone: the relation stands where she is only "She".
    assert check_pair(question, "Noor Eskeland.", item.knowledge).reason == "wrong_sentence"
    convs, failures, _ = fact_tree(item, ["extractive"], None, [], [_qa(question, "Noor Eskeland")])
    assert not [f for f in failures if question in f.error]
    assert any(m.content == question for c in convs for m in c.messages)
    # Resolution does not ground what the text does not say of her.
    _, failures, rejected = fact_tree(item, [], None, [], [_qa(question, "Vireo Racing")])
    assert rejected


def _qa(question: str, answer: str):
    from kore_ray.data.schemas import QAPair

    return QAPair(question=question, answer=answer)


def test_pasted_shapes_never_break_the_generator_or_the_check():
    """Fragments of what users paste (bullets, fields, bare parentheses, pronouns, wraps),
    glued at random: every text yields pairs or none, never an exception."""
    import random

    from kore_ray.augment.augment_stage import fact_tree

    frags = ["Price: $3.2bn", "- ", "* ", "• ", "1. ", "\n", "\n\n", "She ", "He said.", ":",
             "Employees: (2026)", "Name: ", "Ada Lovelace", " (born 3 May 1990 in Kell)", "é",
             "CEO: Dana Ebbrell", "the ", "by\n", "It is 4 km long.", " X (", ")", "Seats: 21",
             "Halcyon's chief executive, Dana Ebbrell, said", "10:00", ",", ".", "Weight: 23.5 kg",
             "Her predecessor, Lorne Achterby, left in May."]
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(frags) for _ in range(rng.randint(1, 10))).strip() or "x"
        item = KnowledgeItem(id="f", kind=rng.choice(["news", "record", "entity"]),
                             subject=rng.choice(["Ada Lovelace", "Halcyon Rail", "X"]), knowledge=text)
        fact_tree(item, ["extractive"], None, [])
