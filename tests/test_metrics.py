"""EVOKE's CEM and token F1."""

import pytest

from kore_ray.evaluate.metrics import cover_exact_match, first_answer, normalize_answer, token_f1


def test_normalisation():
    assert normalize_answer("  The Eiffel-Tower, in PARIS! ") == "eiffel tower in paris"


@pytest.mark.parametrize(
    "pred, gold, hit",
    [
        ("Paris, France. It is the tallest", "Paris", True),
        ("It was founded by Mira Quell in 2031.", "Mira Quell", True),
        ("Mira Quellstone", "Mira Quell", False),  # whole tokens only
        ("Australia", "Au", False),
        ("The answer is au.", "Au", True),
        ("Quell Mira", "Mira Quell", False),  # order matters
        ("anything", "", False),
    ],
)
def test_cover_exact_match(pred, gold, hit):
    assert cover_exact_match(pred, gold) is hit


def test_token_f1():
    assert token_f1("Mira Quell", "mira quell") == 1.0
    assert token_f1("Mira", "Mira Quell") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert token_f1("nothing shared", "Mira Quell") == 0.0
    assert token_f1("", "Mira") == 0.0


def test_first_answer_stops_at_the_next_line():
    assert first_answer(" Mira Quell\nQuestion: Who else?") == "Mira Quell"
    assert first_answer(" 1879. He was") == "1879. He was"
