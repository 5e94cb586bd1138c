"""Schema rules that do not need a file: field checks, cross-field rules, Arrow derivation."""

import pyarrow as pa
import pytest
from pydantic import ValidationError

from kore_ray.data.schemas import (
    JSON_FIELD,
    Conversation,
    EvalQuestion,
    KnowledgeItem,
    LlavaEntry,
    QAPair,
    RetentionProbe,
)

ITEM = {"id": "k1", "kind": "news", "subject": "Zorblax", "knowledge": "Zorblax won the cup."}


def errors(cls, data):
    with pytest.raises(ValidationError) as e:
        cls.model_validate(data)
    return {(".".join(map(str, err["loc"])), err["msg"]) for err in e.value.errors()}


def test_knowledge_item_strips_and_normalises():
    item = KnowledgeItem.model_validate(
        {**ITEM, "id": " k1 ", "kind": "News", "date": "20240301", "image": "https://x/a.png"}
    )
    assert (item.id, item.kind, item.date) == ("k1", "news", "2024-03-01")
    assert item.image == "https://x/a.png" and item.qa is None


def test_unknown_kind_is_kept_for_generic_templates():
    assert KnowledgeItem.model_validate({**ITEM, "kind": "Recipe"}).kind == "recipe"


@pytest.mark.parametrize("field", ["id", "kind", "subject", "knowledge"])
def test_required_fields_must_be_present_and_non_empty(field):
    missing = {k: v for k, v in ITEM.items() if k != field}
    assert errors(KnowledgeItem, missing) == {(field, "Field required")}
    assert errors(KnowledgeItem, {**ITEM, field: "   "}) == {
        (field, "String should have at least 1 character")
    }


def test_wrong_type_and_unknown_field_are_errors():
    assert errors(KnowledgeItem, {**ITEM, "id": 7}) == {("id", "Input should be a valid string")}
    assert errors(KnowledgeItem, {**ITEM, "knowlege": "typo"}) == {
        ("knowlege", "Extra inputs are not permitted")
    }


def test_bad_date():
    ((loc, msg),) = errors(KnowledgeItem, {**ITEM, "date": "2024-13-01"})
    assert loc == "date" and "ISO date" in msg


def test_qa_pairs_and_vqa_quadruplets():
    item = KnowledgeItem.model_validate(
        {
            **ITEM,
            "qa": [
                {"question": "Who won the cup?", "answer": "Zorblax"},
                {"question": "What did Zorblax win?", "answer": "the cup",
                 "subject": "Zorblax", "hypernym": "team"},
            ],
        }
    )
    assert [qa.is_vqa for qa in item.qa] == [False, True]
    ((loc, msg),) = errors(QAPair, {"question": "q", "answer": "a", "subject": "Zorblax"})
    assert "hypernym" in msg
    assert errors(KnowledgeItem, {**ITEM, "qa": [{"question": "q"}]}) == {
        ("qa.0.answer", "Field required")
    }


def test_eval_question_needs_knowledge_id():
    good = {"id": "q1", "knowledge_id": "k1", "question": "Who?", "answer": "Zorblax"}
    assert EvalQuestion.model_validate(good).knowledge_id == "k1"
    assert ("knowledge_id", "Field required") in errors(
        EvalQuestion, {k: v for k, v in good.items() if k != "knowledge_id"}
    )


def test_retention_probe_takes_prompt_or_question():
    assert RetentionProbe.model_validate({"id": "r", "prompt": "Paris is in", "answer": "France"})
    assert RetentionProbe.model_validate({"id": "r", "question": "Where?", "answer": "France"})


@pytest.mark.parametrize("extra", [{}, {"prompt": "Paris is in", "question": "Where is Paris?"}])
def test_retention_probe_with_both_or_neither_prompt_and_question(extra):
    ((loc, msg),) = errors(RetentionProbe, {"id": "r", "answer": "France", **extra})
    assert msg == "give exactly one of prompt or question"


def conversation(messages, **extra):
    return {"id": "c1", "task": "qa", "messages": messages, **extra}


def test_conversation_accepts_text_and_multimodal_content():
    conv = Conversation.model_validate(
        conversation(
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [
                    {"type": "image"},
                    {"type": "text", "text": "Who is this?"},
                    {"type": "image_url", "image_url": {"url": "https://x/a.png"}},
                ]},
                {"role": "assistant", "content": "Zorblax."},
            ],
            image="a.png",
        )
    )
    assert [p.type for p in conv.messages[1].content] == ["image", "text", "image_url"]
    assert conv.model_dump(exclude_none=True)["messages"][1]["content"][0] == {"type": "image"}


def test_conversation_without_assistant():
    ((loc, msg),) = errors(Conversation, conversation([{"role": "user", "content": "Hi"}]))
    assert msg == "needs at least one assistant message"


def test_conversation_message_errors():
    assert errors(Conversation, conversation([{"role": "bot", "content": "x"}])) == {
        ("messages.0.role", "Input should be 'system', 'user' or 'assistant'")
    }
    assert errors(Conversation, conversation([{"role": "assistant", "content": 3}])) == {
        ("messages.0.content", "content must be a string or a list of content parts")
    }
    ((loc, msg),) = errors(
        Conversation, conversation([{"role": "assistant", "content": [{"type": "text"}]}])
    )
    assert loc == "messages.0.content.parts.0" and msg == "a part of type 'text' takes key 'text'"
    ((loc, msg),) = errors(
        Conversation,
        conversation([{"role": "user", "content": [{"type": "image"}]},
                      {"role": "assistant", "content": "x"}]),
    )
    assert msg == "an 'image' part needs the conversation's image"


def test_llava_entry_converts_roles_and_image_tokens():
    entry = LlavaEntry.model_validate(
        {"id": 42, "image": "coco/1.jpg", "source": "ignored", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"},
            {"from": "gpt", "value": "A cat."},
        ]}
    )
    conv = entry.to_conversation()
    assert (conv.id, conv.task, conv.image) == ("42", "imported", "coco/1.jpg")
    assert [m.role for m in conv.messages] == ["user", "assistant"]
    assert [p.model_dump(exclude_none=True) for p in conv.messages[0].content] == [
        {"type": "image"}, {"type": "text", "text": "What is this?"}
    ]
    assert conv.messages[1].content == "A cat."


@pytest.mark.parametrize("cls", [KnowledgeItem, EvalQuestion, RetentionProbe, Conversation])
def test_arrow_schema_follows_the_model(cls):
    schema = cls.arrow_schema()
    assert schema.names == list(cls.model_fields)
    for name, info in cls.model_fields.items():
        assert schema.field(name).nullable == (not info.is_required()), name


def test_arrow_schema_types():
    qa = KnowledgeItem.arrow_schema().field("qa").type
    assert qa.value_type.names == ["question", "answer", "subject", "hypernym"]
    messages = Conversation.arrow_schema().field("messages")
    assert messages.type == pa.string() and messages.metadata == JSON_FIELD
