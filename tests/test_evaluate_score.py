"""Scoring served answers: adaptation on new facts, retention on what the base knew."""

from kore_ray.data.schemas import EvalQuestion, KnowledgeItem, RetentionProbe
from kore_ray.evaluate.score import score_all

ITEMS = [KnowledgeItem(id="k1", kind="news", subject="S", knowledge="Mira Quell founded it."),
         KnowledgeItem(id="k2", kind="entity", subject="T", knowledge="It weighs 412 grams.")]
QUESTIONS = [EvalQuestion(id="q1", knowledge_id="k1", question="Who founded it?", answer="Mira Quell"),
             EvalQuestion(id="q2", knowledge_id="k2", question="How heavy?", answer="412 grams")]
PROBES = [RetentionProbe(id=f"p{i}", prompt=f"fact {i} is", answer=f"v{i}") for i in range(4)]


def _rows(model, answers):
    return {(model, rid): {"prediction": a, "error": None if a is not None else "boom"} for rid, a in answers.items()}


def test_scores():
    preds = {}
    # The base knows p0..p2 (not p3) and none of the new facts.
    preds |= _rows("base", {"q1": "Nobody", "q2": "Heavy", "p0": "v0.", "p1": "v1", "p2": "v2\nQuestion: v3", "p3": "x"})
    # The adapter learned both facts, forgot p1, failed one request (p2), and "knows" p3 now.
    preds |= _rows("kore", {"q1": " Mira Quell\nQuestion: who?", "q2": "about 412 grams", "p0": "v0",
                            "p1": "v9", "p2": None, "p3": "v3"})
    res = score_all(preds, "base", {"kore": "kore"}, QUESTIONS, PROBES, ITEMS)
    base, kore = res["base"], res["methods"]["kore"]
    assert base["adaptation_cem"] == 0.0 and base["retention"] == 1.0
    assert base["counts"]["retention_known"] == 3  # p2's "v3" on the next line does not count
    assert kore["adaptation_cem"] == 1.0 and kore["adaptation_f1"] > 0.5
    assert kore["retention"] == 1 / 3  # kept p0; p1 forgotten; p2 failed; p3 was never known
    assert kore["counts"]["failed_requests"] == 1
    assert kore["adaptation_cem_by_kind"] == {"entity": 1.0, "news": 1.0}


def test_missing_predictions_score_as_wrong():
    res = score_all({}, "base", {"lora": "lora"}, QUESTIONS, PROBES, ITEMS)
    lora = res["methods"]["lora"]
    assert lora["adaptation_cem"] == 0.0 and lora["counts"]["failed_requests"] == 2
    assert lora["retention"] == 0.0 and lora["counts"]["retention_known"] == 0


def test_every_answer_is_kept_and_the_report_shows_groups_and_samples(tmp_path):
    import pyarrow.parquet as pq

    from kore_ray.evaluate.report import write_report
    from kore_ray.evaluate.score import prediction_rows

    items = [ITEMS[0].model_copy(update={"qa": [{"question": "Who?", "answer": "Mira Quell"}]}), ITEMS[1]]
    preds = _rows("base", {"q1": "No", "q2": "No", "p0": "v0", "p1": "v1", "p2": "x", "p3": "x"})
    preds |= _rows("kore", {"q1": "Mira Quell.", "q2": "412 | grams", "p0": "v0", "p1": "x",
                            "p2": None, "p3": "v3"})
    res = score_all(preds, "base", {"kore": "kore"}, QUESTIONS, PROBES, items)
    groups = res["methods"]["kore"]["adaptation_by_group"]
    assert groups == {"with_qa": {"cem": 1.0, "f1": 1.0, "questions": 1},
                      "without_qa": {"cem": 1.0, "f1": 1.0, "questions": 1}}
    rows = prediction_rows(preds, "base", {"kore": "kore"}, QUESTIONS, PROBES)
    assert len(rows) == 2 * (len(QUESTIONS) + len(PROBES))
    kore_p2 = next(r for r in rows if r["method"] == "kore" and r["id"] == "p2")
    assert kore_p2["prediction"] is None and kore_p2["error"] == "boom" and not kore_p2["cem"]
    assert {r["set"] for r in rows if r["id"] in ("p2", "p3")} == {"retention_unknown"}  # base missed them
    paths = write_report(res, tmp_path, rows)
    assert pq.read_table(paths["predictions"]).num_rows == len(rows)
    report = paths["report"].read_text()
    assert "with_qa CEM" in report and "without_qa F1" in report
    assert "| kore | Who founded it? | Mira Quell | Mira Quell. | 1 | 1.00 |" in report
    assert "412 \\| grams" in report  # a pipe in an answer does not break the table
