"""EVOKE's answer metrics: CEM and token F1, after SQuAD-style normalisation.

CEM (cover exact match) asks whether the normalised gold answer is contained in the
normalised prediction: a generative model's answer may say more than the gold span, and
a base model continues past the answer. Token F1 credits partial overlap.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation to spaces, drop articles, collapse whitespace."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def cover_exact_match(prediction: str, gold: str) -> bool:
    """The gold answer's normalised tokens appear, in order and contiguously, in the prediction."""
    gold_n, pred_n = normalize_answer(gold), normalize_answer(prediction)
    if not gold_n:
        return False
    return f" {gold_n} " in f" {pred_n} "  # whole tokens: "au" is not covered by "australia"


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def first_answer(text: str) -> str:
    """The answer a base model gives before it runs on into a new line or question."""
    return re.split(r"\n|Question:", text, maxsplit=1)[0].strip()
