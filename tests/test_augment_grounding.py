"""The grounding check: invented names and numbers, non-answers, false relations, paraphrases."""

import json
from pathlib import Path

import pytest

from kore_ray.augment.grounding import check_pair, expected_kind, has_cue, invents

TEXT = ("Kessimar Robotics makes the Trellis arm, a welding robot for shipyards. The company was "
        "founded in 2019 in the city of Dunmarch by the engineer Alva Reyne, and it employs 340 "
        "people. Its warehouse robot, the Pell, was sold to Norrin Freight in 2024.")
LABELLED = Path(__file__).resolve().parents[1] / "data" / "grounding" / "labelled_pairs.jsonl"


@pytest.mark.parametrize("question,answer,reason", [
    ("Where was Kessimar Robotics founded?", "In Paris.", "invented"),  # a place not in the text
    ("When was Kessimar Robotics founded?", "In 2018.", "invented"),  # a number not in the text
    ("How many people does Kessimar Robotics employ?", "3400 people.", "invented"),
    ("Who founded Kessimar Robotics?", "Alva Reyne and Tomas Quill.", "invented"),
    ("Who is the CEO of Bellamy Motors?", "Alva Reyne.", "off_topic"),  # asks about another entity
    ("Who founded Kessimar Robotics?", "I don't know.", "non_answer"),
    ("Who founded Kessimar Robotics?", "Kessimar Robotics was founded.", "repeats_question"),
    # The shapes: every word in the text, but the relation is false / no answer.
    ("What is the main product of Kessimar Robotics?", "Kessimar Robotics is a warehouse robot.",
     "false_relation"),
    ("Who founded Kessimar Robotics?", "Kessimar Robotics was founded in 2019 in the city of Dunmarch.",
     "wrong_type"),
    ("Which city is Kessimar Robotics based in?", "Shipyards Dunmarch.", "not_in_text"),
    ("How many people work at Kessimar Robotics?", "Dunmarch.", "wrong_type"),
    ("Describe Kessimar Robotics.", TEXT, "too_long"),
])
def test_rejects(question, answer, reason):
    verdict = check_pair(question, answer, TEXT)
    assert not verdict and verdict.reason == reason, verdict


@pytest.mark.parametrize("question,answer,target", [
    ("Who founded Kessimar Robotics?", "Alva Reyne.", "Alva Reyne."),
    # paraphrased questions, answers in a sentence: the target is the span, leading
    ("Which engineer set up Kessimar Robotics?", "It was set up by the engineer Alva Reyne.", "Alva Reyne."),
    ("In what year was Kessimar Robotics established?", "It was founded in 2019.", "2019."),
    ("How large is the workforce of Kessimar Robotics?", "340 people", "340 people."),
    ("What does Kessimar Robotics make?", "The Trellis arm, a welding robot.", "Trellis arm."),
    ("Who bought the Pell?", "Norrin Freight", "Norrin Freight."),
])
def test_keeps_supported_pairs_and_targets_the_span(question, answer, target):
    verdict = check_pair(question, answer, TEXT)
    assert verdict, verdict
    assert verdict.target == target
    assert verdict.key_span in TEXT


def test_expected_kind_reads_the_leading_wh_word():
    assert expected_kind("Who designed it?") == "name"
    assert expected_kind("It was designed where?") == "name"
    assert expected_kind("What was formed when the two merged?") is None  # "when" joins clauses
    assert expected_kind("In which year did it open?") == "time"
    assert expected_kind("How many people live there?") == "number"


def test_invents():
    assert not invents("Founded in 2019 by Alva Reyne.", TEXT)
    assert invents("Founded in 2019 by Alva Reyes.", TEXT)
    assert invents("It employs 34 people.", TEXT)
    assert not invents("Who founded the company?", TEXT, skip_first=True)


def test_a_name_is_answered_whole_though_the_question_names_its_kind():
    text = "The observatory stands on Mount Caspery. Ada studied at the University of Ulvaranth."
    assert check_pair("On which mountain does the observatory stand?", "Mount Caspery.",
                      text).target == "Mount Caspery."
    assert check_pair("Which university did Ada study at?", "University of Ulvaranth.",
                      text).target == "University of Ulvaranth."
    assert check_pair("Where did Ada study?", "At the University of Ulvaranth.",
                      text).target == "University of Ulvaranth."


def test_has_cue():
    """A name or number to ask by; the capital grammar puts first in a sentence is none."""
    assert has_cue("Which firm did the Vaskelund brothers found?")
    assert has_cue("What was founded in 2003?")
    assert not has_cue("What is the company's main product?")
    assert not has_cue("a small songbird. It nests in hedges")
    assert not has_cue("Who was it? Where did they go?")


def test_precision_and_recall_on_hand_labelled_pairs():
    """Of what the check keeps, most was labelled good by a person (precision), and it keeps
    most good pairs (recall); the labels were written apart from the check. Measured 0.85 /
    0.94: what it lets through are mostly swapped roles and false relations that only a
    reading of the sentence catches (the self generator's round trip; benchmarks/grounding.py)."""
    rows = [json.loads(line) for line in LABELLED.read_text().splitlines() if line.strip()]
    assert len(rows) >= 150
    kept_good = kept_bad = good = 0
    for r in rows:
        ok = bool(check_pair(r["question"], r["answer"], r["knowledge"]))
        good += r["label"] == "good"
        kept_good += ok and r["label"] == "good"
        kept_bad += ok and r["label"] == "bad"
    precision = kept_good / max(1, kept_good + kept_bad)
    recall = kept_good / good
    assert precision >= 0.82, (precision, recall)
    assert recall >= 0.88, (precision, recall)


@pytest.mark.parametrize("question, answer, target", [
    ("How much does the plan cost a month?", "EUR 11.50.", "EUR 11.50."),
    ("How many kilograms did it carry?", "340 kilograms.", "340 kilograms."),
    ("By what percentage did symptoms fall?", "38%.", "38%."),
    ("How many kilograms did it carry?", "340.", "340."),  # the answer's own words, no more
    ("How many seed samples does it store?", "410,000 seed samples.", "410,000 seed samples."),
])
def test_a_number_keeps_the_currency_and_unit_the_answer_gives(question, answer, target):
    text = "The plan costs EUR 11.50 a month. It carried 340 kilograms of freight. " \
           "Symptoms fell by 38% in 2025 and later. It stores 410,000 seed samples."
    assert check_pair(question, answer, text).target == target
