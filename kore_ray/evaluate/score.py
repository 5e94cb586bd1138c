"""Score served answers: adaptation (EVOKE CEM, F1) on new knowledge, retention of old knowledge.

Retention counts only the probes the base model answered correctly before injection: what
it did not know cannot be forgotten. A request that failed scores as wrong and is counted.
"""

from __future__ import annotations

from collections import defaultdict

from kore_ray.data.schemas import EvalQuestion, KnowledgeItem, RetentionProbe
from kore_ray.evaluate.metrics import cover_exact_match, first_answer, token_f1


def _answer(predictions: dict, model: str, rid: str) -> str | None:
    row = predictions.get((model, rid))
    return None if row is None or row["prediction"] is None else first_answer(row["prediction"])


def known_probes(predictions: dict, base: str, probes: list[RetentionProbe]) -> list[RetentionProbe]:
    """The probes the base model gets right."""
    return [p for p in probes if (a := _answer(predictions, base, p.id)) and cover_exact_match(a, p.answer)]


def score_model(predictions: dict, model: str, questions: list[EvalQuestion],
                known: list[RetentionProbe], kinds: dict[str, str],
                groups: dict[str, str] | None = None) -> dict:
    """adaptation_cem, adaptation_f1, retention (fractions in [0, 1]) and the counts behind them;
    adaptation also by knowledge kind and by group (items with their own qa or without)."""
    cem, f1, failed = [], [], 0
    by_kind = defaultdict(list)
    by_group = defaultdict(lambda: ([], []))
    for q in questions:
        answer = _answer(predictions, model, q.id)
        failed += answer is None
        hit = answer is not None and cover_exact_match(answer, q.answer)
        cem.append(hit)
        f1.append(token_f1(answer, q.answer) if answer is not None else 0.0)
        by_kind[kinds.get(q.knowledge_id, "unknown")].append(hit)
        group = by_group[(groups or {}).get(q.knowledge_id, "all")]
        group[0].append(hit)
        group[1].append(f1[-1])
    kept = 0
    for p in known:
        answer = _answer(predictions, model, p.id)
        failed += answer is None
        kept += answer is not None and cover_exact_match(answer, p.answer)
    return {
        "adaptation_cem": sum(cem) / len(cem) if cem else 0.0,
        "adaptation_f1": sum(f1) / len(f1) if f1 else 0.0,
        "retention": kept / len(known) if known else 0.0,
        "counts": {
            "questions": len(cem), "questions_correct": sum(cem),
            "retention_known": len(known), "retention_kept": kept, "failed_requests": failed,
        },
        "adaptation_cem_by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
        "adaptation_by_group": {g: {"cem": sum(c) / len(c), "f1": sum(f) / len(f), "questions": len(c)}
                                for g, (c, f) in sorted(by_group.items())},
    }


def score_all(predictions: dict, base: str, served: dict[str, str], questions: list[EvalQuestion],
              probes: list[RetentionProbe], items: list[KnowledgeItem]) -> dict:
    """Scores of the base and of every method (method -> served model name)."""
    known = known_probes(predictions, base, probes)
    kinds = {i.id: i.kind for i in items}
    groups = {i.id: "with_qa" if i.qa else "without_qa" for i in items}
    return {
        "base": score_model(predictions, base, questions, known, kinds, groups),
        "methods": {m: score_model(predictions, name, questions, known, kinds, groups)
                    for m, name in served.items()},
        "retention_probes": len(probes),
    }


PREDICTION_COLUMNS = ("method", "set", "id", "question", "gold", "prediction", "cem", "f1", "error")


def prediction_rows(predictions: dict, base: str, served: dict[str, str],
                    questions: list[EvalQuestion], probes: list[RetentionProbe]) -> list[dict]:
    """Every answer with its scores (eval/predictions.parquet): anyone can audit a figure."""
    known = {p.id for p in known_probes(predictions, base, probes)}
    rows = []
    for method, name in {"base": base, **served}.items():
        for kind, records in (("adaptation", questions), ("retention", probes)):
            for r in records:
                row = predictions.get((name, r.id)) or {}
                answer = _answer(predictions, name, r.id)
                rows.append({
                    "method": method, "set": kind if kind == "adaptation" or r.id in known
                    else "retention_unknown", "id": r.id,
                    "question": getattr(r, "question", None) or r.prompt, "gold": r.answer,
                    "prediction": answer, "cem": answer is not None and cover_exact_match(answer, r.answer),
                    "f1": token_f1(answer, r.answer) if answer is not None else 0.0,
                    "error": row.get("error")})
    return rows
