"""`kore validate`: kind detection, every bad row printed, exit codes 0/1/2."""

import io
import json

import pytest

from kore_ray.data.io import write_parquet
from kore_ray.data.schemas import RetentionProbe
from kore_ray.data.validate import detect_kind, validate_file
from kore_ray.errors import InputError

ROWS = {
    "knowledge": {"id": "k1", "kind": "news", "subject": "Z", "knowledge": "Z won."},
    "question": {"id": "q1", "knowledge_id": "k1", "question": "Who won?", "answer": "Z"},
    "retention": {"id": "r1", "question": "Capital of France?", "answer": "Paris"},
    "conversation": {"id": "c1", "task": "qa", "messages": [
        {"role": "user", "content": "Who won?"}, {"role": "assistant", "content": "Z"}]},
    "llava": {"id": "l1", "conversations": [
        {"from": "human", "value": "Who won?"}, {"from": "gpt", "value": "Z"}]},
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(path, kind=None):
    out = io.StringIO()
    code = validate_file(path, kind, out=out)
    return code, out.getvalue().splitlines()


@pytest.mark.parametrize("kind", ROWS)
def test_detect_kind(tmp_path, kind):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[kind], {**ROWS[kind], "id": "2"}])
    assert detect_kind(path) == kind


def test_detect_kind_from_parquet_with_optional_columns(tmp_path):
    probes = [RetentionProbe(id="a", prompt="p", answer="x"),
              RetentionProbe(id="b", question="q", answer="y")]
    assert detect_kind(write_parquet(probes, tmp_path / "r.parquet")) == "retention"


def test_detect_kind_skips_unrecognisable_rows_and_ignores_bad_values(tmp_path):
    typo = {"id": "x", "kind": "news", "subject": "Z", "knowlege": "typo"}
    bad_value = {**ROWS["knowledge"], "subject": ""}
    path = write_jsonl(tmp_path / "d.jsonl", [typo, bad_value])
    assert detect_kind(path) == "knowledge"


def test_detect_kind_unrecognisable(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"foo": 1}])
    with pytest.raises(InputError, match="cannot tell the kind.*pass --kind"):
        detect_kind(path)


def test_detect_kind_ambiguous(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS["question"], ROWS["retention"]])
    with pytest.raises(InputError, match=r"question \(line 1\), retention \(line 2\).*--kind"):
        detect_kind(path)


def test_validate_ok(tmp_path):
    path = write_jsonl(tmp_path / "k.jsonl", [ROWS["knowledge"], {**ROWS["knowledge"], "id": "2"}])
    assert run(path) == (0, ["OK: 2 knowledge rows"])


def test_validate_prints_every_bad_row(tmp_path):
    good = ROWS["question"]
    path = write_jsonl(tmp_path / "q.jsonl", [
        good,
        {**good, "id": "q2", "answer": ""},
        {**good, "id": "q3", "question": 4, "knowledge_id": " "},
        good,
    ])
    code, lines = run(path)
    assert code == 1
    assert lines == [
        f"{path}:2: answer: String should have at least 1 character",
        f"{path}:3: knowledge_id: String should have at least 1 character",
        f"{path}:3: question: Input should be a valid string",
        f"{path}:4: id: duplicate id 'q1' (first at line 1)",
        "3 bad rows of 4 question rows",
    ]


def test_validate_with_explicit_kind(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [ROWS["retention"]])
    assert run(path, "retention")[0] == 0
    code, lines = run(path, "knowledge")
    assert code == 1 and lines[-1] == "1 bad rows of 1 knowledge rows"


def test_validate_unreadable_files(tmp_path):
    code, lines = run(tmp_path / "missing.jsonl")
    assert code == 2 and lines == [f"error: {tmp_path / 'missing.jsonl'}: no such file"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert run(empty) == (2, [f"error: {empty}: empty file (no rows)"])
    code, lines = run(write_jsonl(tmp_path / "k.jsonl", [ROWS["knowledge"]]), "nonsense")
    assert code == 2 and "unknown kind 'nonsense'" in lines[0]
