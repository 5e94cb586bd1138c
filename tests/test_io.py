"""Readers report every bad row as file:line: field: message; writers round-trip."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kore_ray.data import io
from kore_ray.data.io import (
    RowError,
    import_llava,
    iter_row_errors,
    read_parquet,
    read_records,
    write_parquet,
)
from kore_ray.data.schemas import Conversation, EvalQuestion, KnowledgeItem, RetentionProbe
from kore_ray.errors import InputError


def item(i, **extra):
    return {"id": f"k{i}", "kind": "entity", "subject": f"S{i}", "knowledge": f"Fact {i}.", **extra}


def png(path, fmt="PNG", size=(4, 4)):
    from PIL import Image

    Image.effect_noise(size, 64).convert("RGB").save(path, fmt)
    return path


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def bad_rows(path, model_cls=KnowledgeItem):
    """The error lines of read_records' InputError, without its heading."""
    with pytest.raises(InputError) as e:
        read_records(path, model_cls)
    return str(e.value).splitlines()[1:]


def test_good_jsonl_with_blank_lines(tmp_path):
    path = tmp_path / "k.jsonl"
    path.write_text(json.dumps(item(1)) + "\n\n   \n" + json.dumps(item(2)) + "\n")
    assert [r.id for r in read_records(path, KnowledgeItem)] == ["k1", "k2"]


def test_json_list(tmp_path):
    path = tmp_path / "k.json"
    path.write_text(json.dumps([item(1), item(2)]))
    assert [r.id for r in read_records(path, KnowledgeItem)] == ["k1", "k2"]
    path.write_text(json.dumps([item(1), item(1)]))
    assert bad_rows(path) == [f"{path}:2: id: duplicate id 'k1' (first at line 1)"]


def test_not_json(tmp_path):
    path = write_jsonl(tmp_path / "k.jsonl", [item(1), "{not json", "[1, 2]"])
    assert bad_rows(path) == [
        f"{path}:2: (row): not valid JSON: Expecting property name enclosed in double quotes",
        f"{path}:3: (row): expected an object, got a list",
    ]
    whole = tmp_path / "k.json"
    whole.write_text("[\n{}\n,,]")
    with pytest.raises(InputError, match=r"k\.json:3: not valid JSON"):
        read_records(whole, KnowledgeItem)


def test_missing_empty_and_wrong_type_fields_are_all_listed(tmp_path):
    missing = item(2)
    del missing["subject"]
    path = write_jsonl(
        tmp_path / "k.jsonl", [item(1), missing, item(3, knowledge="  "), item(4, qa="no")]
    )
    with pytest.raises(InputError) as e:
        read_records(path, KnowledgeItem)
    assert str(e.value).splitlines() == [
        f"{path}: 3 bad row(s) of 4:",
        f"{path}:2: subject: Field required",
        f"{path}:3: knowledge: String should have at least 1 character",
        f"{path}:4: qa: Input should be a valid list",
    ]


def test_nested_field_errors_name_the_path(tmp_path):
    path = write_jsonl(tmp_path / "k.jsonl", [item(1, qa=[{"question": "q", "answer": 5}])])
    assert bad_rows(path) == [f"{path}:1: qa[0].answer: Input should be a valid string"]


def test_duplicate_ids_name_both_lines(tmp_path):
    path = write_jsonl(tmp_path / "k.jsonl", [item(1), item(2), item(1, subject="")])
    assert bad_rows(path) == [
        f"{path}:3: subject: String should have at least 1 character",
        f"{path}:3: id: duplicate id 'k1' (first at line 1)",
    ]


def test_images_resolve_against_the_data_folder(tmp_path):
    (tmp_path / "img").mkdir()
    png(tmp_path / "img" / "a.png")
    path = write_jsonl(
        tmp_path / "k.jsonl",
        [item(1, image="img/a.png"), item(2, image="s3://bucket/b.png"),
         item(3, image="https://x/c.png")],
    )
    images = [r.image for r in read_records(path, KnowledgeItem)]
    assert images == [str(tmp_path / "img" / "a.png"), "s3://bucket/b.png", "https://x/c.png"]


def test_missing_image(tmp_path):
    path = write_jsonl(tmp_path / "k.jsonl", [item(1, image="nope.png")])
    assert bad_rows(path) == [f"{path}:1: image: image not found: {tmp_path / 'nope.png'}"]


def test_files_that_are_not_images_are_refused_with_file_line_and_field(tmp_path):
    png(tmp_path / "good.png")
    (tmp_path / "notes.png").write_text("these are notes, not a picture")
    whole = png(tmp_path / "whole.png", size=(64, 64)).read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])  # a broken download
    (tmp_path / "empty.jpg").write_bytes(b"")
    path = write_jsonl(tmp_path / "k.jsonl", [
        item(1, image="good.png"), item(2, image="notes.png"), item(3, image="cut.png"),
        item(4, image="empty.jpg")])
    errors = bad_rows(path)
    assert [e.split(": ")[0:2] for e in errors] == [
        [f"{path}:2", "image"], [f"{path}:3", "image"], [f"{path}:4", "image"]]
    assert all("not a readable image" in e for e in errors), errors


@pytest.mark.parametrize("newline, bom", [("\r\n", False), ("\n", True), ("\r\n", True)])
def test_jsonl_as_windows_editors_and_spreadsheets_write_it(tmp_path, newline, bom):
    text = newline.join(json.dumps(item(i)) for i in (1, 2)) + newline
    path = tmp_path / "k.jsonl"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    assert [r.id for r in read_records(path, KnowledgeItem)] == ["k1", "k2"]
    listed = tmp_path / "k.json"
    listed.write_bytes((b"\xef\xbb\xbf" if bom else b"") + json.dumps([item(1)]).encode())
    assert [r.id for r in read_records(listed, KnowledgeItem)] == ["k1"]


def test_empty_file(tmp_path):
    path = tmp_path / "k.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(InputError, match="empty file"):
        read_records(path, KnowledgeItem)
    path = tmp_path / "k.json"
    path.write_text("[]")
    with pytest.raises(InputError, match="empty file"):
        read_records(path, KnowledgeItem)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_records(tmp_path / "nope.jsonl", KnowledgeItem)


def test_unsupported_extension(tmp_path):
    path = tmp_path / "k.csv"
    path.write_text("id,kind\n")
    with pytest.raises(InputError, match=r"unsupported file type; use one of \.jsonl"):
        read_records(path, KnowledgeItem)


def test_not_a_parquet_file(tmp_path):
    path = tmp_path / "k.parquet"
    path.write_text("hello")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        read_records(path, KnowledgeItem)


def test_iter_row_errors_is_structured(tmp_path):
    path = write_jsonl(
        tmp_path / "r.jsonl",
        [{"id": "r1", "prompt": "p", "question": "q", "answer": "a"},
         {"id": "r2", "answer": "a"}],
    )
    assert list(iter_row_errors(path, RetentionProbe)) == [
        RowError(str(path), 1, "(row)", "give exactly one of prompt or question"),
        RowError(str(path), 2, "(row)", "give exactly one of prompt or question"),
    ]


RECORDS = [
    [
        KnowledgeItem(**item(1, date="2024-01-02", qa=[
            {"question": "q", "answer": "a"},
            {"question": "q2", "answer": "a2", "subject": "S1", "hypernym": "person"},
        ])),
        KnowledgeItem(**item(2, image="s3://b/x.png")),
    ],
    [EvalQuestion(id="q1", knowledge_id="k1", question="Who?", answer="Zorblax",
                  image="https://x/a.png")],
    [RetentionProbe(id="r1", prompt="Paris is the capital of", answer="France"),
     RetentionProbe(id="r2", question="What is 2+2?", answer="4")],
    [Conversation(id="c1", knowledge_id="k1", task="vqa", image="s3://b/x.png", messages=[
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Who?"}]},
        {"role": "assistant", "content": "Zorblax, née “Zo”."}]),
     Conversation(id="c2", task="dialogue", messages=[
         {"role": "system", "content": "Be brief."},
         {"role": "user", "content": [
             {"type": "image_url", "image_url": {"url": "https://x/a.png"}}]},
         {"role": "assistant", "content": "Hi"}])],
]


@pytest.mark.parametrize("records", RECORDS, ids=lambda rs: type(rs[0]).__name__)
def test_parquet_round_trip(tmp_path, records):
    path = write_parquet(records, tmp_path / "out" / "data.parquet")
    assert pq.read_schema(path).equals(type(records[0]).arrow_schema())
    assert read_parquet(path, type(records[0])) == records
    assert os.listdir(path.parent) == ["data.parquet"]  # no temp file left behind


@pytest.mark.parametrize("records", RECORDS, ids=lambda rs: type(rs[0]).__name__)
def test_jsonl_round_trip(tmp_path, records):
    path = write_jsonl(
        tmp_path / "data.jsonl", [r.model_dump(mode="json", exclude_none=True) for r in records]
    )
    assert read_records(path, type(records[0])) == records


def test_parquet_bad_rows_are_numbered_from_one(tmp_path):
    path = tmp_path / "q.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"id": "q1", "knowledge_id": "k1", "question": "Who?", "answer": "Z"},
        {"id": "q2", "knowledge_id": "k1", "question": "", "answer": "Z"},
        {"id": "q1", "knowledge_id": "k1", "question": "Who?", "answer": None},
    ]), path)
    assert bad_rows(path, EvalQuestion) == [
        f"{path}:2: question: String should have at least 1 character",
        f"{path}:3: answer: Field required",
        f"{path}:3: id: duplicate id 'q1' (first at line 1)",
    ]


def test_parquet_with_bad_json_column(tmp_path):
    path = write_parquet(RECORDS[3], tmp_path / "c.parquet")
    table = pq.read_table(path)
    column = table.schema.get_field_index("messages")
    broken = table.set_column(
        column, table.schema.field(column), pa.array(["[{", table["messages"][1].as_py()])
    )
    pq.write_table(broken, path)
    assert bad_rows(path, Conversation) == [
        f"{path}:1: messages: not valid JSON: Expecting property name enclosed in double quotes"
    ]


def test_write_parquet_is_atomic(tmp_path, monkeypatch):
    path = write_parquet(RECORDS[2], tmp_path / "r.parquet")

    def fail(table, where):
        open(where, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(io.pq, "write_table", fail)
    with pytest.raises(OSError, match="disk full"):
        write_parquet(RECORDS[2][:1], path)
    assert os.listdir(tmp_path) == ["r.parquet"]
    assert read_parquet(path, RetentionProbe) == RECORDS[2]


def test_write_parquet_types(tmp_path):
    empty = write_parquet([], tmp_path / "e.parquet", model_cls=EvalQuestion)
    assert pq.read_table(empty).num_rows == 0
    with pytest.raises(ValueError):
        write_parquet([], tmp_path / "e.parquet")
    with pytest.raises(TypeError):
        write_parquet([RECORDS[0][0], RECORDS[1][0]], tmp_path / "m.parquet")


def test_read_parquet_wants_parquet(tmp_path):
    path = write_jsonl(tmp_path / "k.jsonl", [item(1)])
    with pytest.raises(InputError, match="expected a .parquet file"):
        read_parquet(path, KnowledgeItem)


def llava(i, **extra):
    return {"id": i, "image": "coco/1.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the picture?"},
        {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Its colour?"},
        {"from": "gpt", "value": "Black."},
    ], **extra}


def test_import_llava(tmp_path):
    (tmp_path / "images" / "coco").mkdir(parents=True)
    png(tmp_path / "images" / "coco" / "1.jpg", "JPEG")
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "Hi"},
                                               {"from": "gpt", "value": "Hello"}]}
    path = tmp_path / "llava.json"
    path.write_text(json.dumps([llava("000001"), llava(2), text_only]))
    convs = import_llava(path, image_root=tmp_path / "images")
    assert [c.id for c in convs] == ["000001", "2", "t"]
    first = convs[0]
    assert first.task == "imported" and first.image == str(tmp_path / "images" / "coco" / "1.jpg")
    assert [m.role for m in first.messages] == ["user", "assistant", "user", "assistant"]
    assert first.messages[0].model_dump(exclude_none=True)["content"] == [
        {"type": "image"}, {"type": "text", "text": "What is in the picture?"}]
    assert convs[2].image is None and convs[2].messages[0].content == "Hi"


def test_import_llava_reports_bad_entries(tmp_path):
    (tmp_path / "coco").mkdir()
    png(tmp_path / "coco" / "1.jpg", "JPEG")
    no_gpt = llava("b")
    no_gpt["conversations"] = no_gpt["conversations"][:1]
    wrong_role = llava("c")
    wrong_role["conversations"][1]["from"] = "bot"
    no_image = llava("d")
    del no_image["image"]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(
        [llava("a"), no_gpt, wrong_role, no_image, llava("e", image="coco/2.jpg"), llava("a")]
    ))
    with pytest.raises(InputError) as e:
        import_llava(path)
    assert str(e.value).splitlines()[1:] == [
        f"{path}:2: (row): needs at least one 'gpt' turn",
        f"{path}:3: conversations[1].from: Input should be 'human', 'gpt' or 'system'",
        f"{path}:4: (row): <image> in a turn but no image given",
        f"{path}:5: image: image not found: {tmp_path / 'coco' / '2.jpg'}",
        f"{path}:6: id: duplicate id 'a' (first at line 1)",
    ]
