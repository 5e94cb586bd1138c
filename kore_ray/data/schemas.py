"""Input and training-data schemas.

The pydantic models are the single source of truth: each record class derives its
Parquet (pyarrow) schema from its own fields (`Record.arrow_schema()`), so the two cannot
drift. Fields Arrow cannot type (OpenAI message content is "string or list of parts") are
stored as JSON text in a string column marked with `JSON_FIELD` metadata.

All models forbid unknown fields (a typo is an error, not a silently dropped column) and
strip surrounding whitespace from strings.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pyarrow as pa
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

JSON_FIELD = {b"kore.encoding": b"json"}
"""Arrow field metadata for a column that holds JSON text (see module docstring)."""

_URI = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]*://|data:)")

NonEmptyStr = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


def _check_image(value: str, info: ValidationInfo) -> str:
    """Resolve a local image path against the reader's `base_dir` and require that it exists.

    The result is absolute, so records still find their images once written elsewhere (a run
    directory). Only readers pass `base_dir` (as validation context); records built in code are
    not checked. URIs (s3://, https://, data:) are kept as they are: they may not be reachable.
    """
    base_dir = (info.context or {}).get("base_dir")
    if base_dir is None or _URI.match(value):
        return value
    path = Path(base_dir, value)
    if not path.is_file():
        raise PydanticCustomError("image_missing", "image not found: {path}", {"path": str(path)})
    _check_decodable(path)
    return str(path.resolve())


def _check_decodable(path: Path) -> None:
    """A file that exists but is no image (a renamed text file, a truncated download) is
    refused here, with the row, not deep in a stage's worker."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()  # reads the whole file's structure without decoding every pixel
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise PydanticCustomError("image_unreadable", "not a readable image: {path} ({reason})",
                                  {"path": str(path), "reason": str(e) or type(e).__name__})


ImageRef = Annotated[NonEmptyStr, AfterValidator(_check_image)]
"""A local image path (relative paths resolve against the data file's folder) or a URI."""


def _to_iso_date(value: Any) -> Any:
    if type(value) is dt.date:  # Parquet date32 columns arrive as date objects
        return value.isoformat()
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value.strip()).isoformat()
        except ValueError:
            raise PydanticCustomError(
                "iso_date", "not an ISO date (YYYY-MM-DD): {value}", {"value": repr(value)}
            ) from None
    return value


IsoDate = Annotated[str, BeforeValidator(_to_iso_date)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class Record(_Model):
    """A top-level row of a data file: has a unique `id`, and a Parquet schema."""

    id: NonEmptyStr

    @classmethod
    def arrow_schema(cls) -> pa.Schema:
        """The Parquet schema of this record type, derived from its fields."""
        fields = []
        for name, info in cls.model_fields.items():
            nullable = not info.is_required()
            arrow_type = _arrow_type(info.annotation)
            if arrow_type is None:
                fields.append(pa.field(info.alias or name, pa.string(), nullable, JSON_FIELD))
            else:
                fields.append(pa.field(info.alias or name, arrow_type, nullable))
        return pa.schema(fields)


def _arrow_type(annotation: Any) -> pa.DataType | None:
    """The Arrow type for a field annotation, or None where Arrow has none (a str/list union).

    Struct and column names are the fields' aliases, as records are dumped `by_alias`.
    """
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _arrow_type(args[0])
    if origin in (Union, UnionType):
        members = [a for a in args if a is not NoneType]
        return _arrow_type(members[0]) if len(members) == 1 else None
    if origin is list:
        item = _arrow_type(args[0])
        return None if item is None else pa.list_(item)
    if origin is Literal or annotation is str:
        return pa.string()
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        children = []
        for name, info in annotation.model_fields.items():
            child = _arrow_type(info.annotation)
            if child is None:
                return None
            children.append(pa.field(info.alias or name, child, not info.is_required()))
        return pa.struct(children)
    raise TypeError(f"no Arrow type for {annotation!r}")


class QAPair(_Model):
    """A question about a knowledge item and its answer.

    With `subject` and `hypernym` it is a VQA quadruplet for KORE-AUGMENTATION: the question
    names the subject, and the visual question replaces it with "this <hypernym>" so the
    model must recognise the subject in the image.
    """

    question: NonEmptyStr
    answer: NonEmptyStr
    subject: NonEmptyStr | None = None
    hypernym: NonEmptyStr | None = None

    @model_validator(mode="after")
    def _quadruplet_complete(self) -> QAPair:
        if (self.subject is None) != (self.hypernym is None):
            raise PydanticCustomError(
                "vqa_incomplete", "a VQA quadruplet needs both subject and hypernym"
            )
        return self

    @property
    def is_vqa(self) -> bool:
        return self.subject is not None


class KnowledgeItem(Record):
    """A piece of new knowledge to inject.

    `kind` picks the augmentation templates: "news" and "entity" have their own; any other
    value (lower-cased) gets the generic ones.
    """

    kind: Annotated[NonEmptyStr, AfterValidator(str.lower)]
    subject: NonEmptyStr
    knowledge: NonEmptyStr
    image: ImageRef | None = None
    date: IsoDate | None = None
    qa: list[QAPair] | None = None


class EvalQuestion(Record):
    """A held-out question about an injected knowledge item (measures adaptation)."""

    knowledge_id: NonEmptyStr
    question: NonEmptyStr
    answer: NonEmptyStr
    image: ImageRef | None = None


class RetentionProbe(Record):
    """Something the model must keep knowing: a completion `prompt` or a chat `question`."""

    prompt: NonEmptyStr | None = None
    question: NonEmptyStr | None = None
    answer: NonEmptyStr

    @model_validator(mode="after")
    def _exactly_one_input(self) -> RetentionProbe:
        if (self.prompt is None) == (self.question is None):
            raise PydanticCustomError(
                "prompt_or_question", "give exactly one of prompt or question"
            )
        return self


class ImageURL(_Model):
    url: NonEmptyStr


_PART_KEYS = {"text": {"text"}, "image_url": {"image_url"}, "image": set()}  # besides "type"


class ContentPart(_Model):
    """One part of a multimodal message, OpenAI style.

    {"type": "image"} is a placeholder for the conversation's `image` (as HF chat templates use).
    """

    type: Literal["text", "image_url", "image"]
    text: NonEmptyStr | None = None
    image_url: ImageURL | None = None

    @model_validator(mode="after")
    def _keys_match_type(self) -> ContentPart:
        want = _PART_KEYS[self.type]
        if {k for k in ("text", "image_url") if getattr(self, k) is not None} != want:
            raise PydanticCustomError(
                "part_keys",
                "a part of type '{type}' takes {keys}",
                {"type": self.type, "keys": f"key '{self.type}'" if want else "no other keys"},
            )
        return self


def _content_tag(value: Any) -> str | None:
    return "text" if isinstance(value, str) else "parts" if isinstance(value, list) else None


Content = Annotated[
    Union[
        Annotated[NonEmptyStr, Tag("text")],
        Annotated[list[ContentPart], Field(min_length=1), Tag("parts")],
    ],
    Discriminator(
        _content_tag,
        custom_error_type="content_type",
        custom_error_message="content must be a string or a list of content parts",
    ),
]


class Message(_Model):
    role: Literal["system", "user", "assistant"]
    content: Content


class Conversation(Record):
    """A training conversation in OpenAI chat format.

    `task` names how it was made: "qa", "dialogue", "recognition", "caption", "vqa",
    "retention", "imported" (other names are allowed). `model_dump(exclude_none=True)["messages"]`
    is a valid OpenAI `messages` list.
    """

    knowledge_id: NonEmptyStr | None = None
    task: NonEmptyStr
    messages: list[Message]
    image: ImageRef | None = None

    @model_validator(mode="after")
    def _trainable(self) -> Conversation:
        if not any(m.role == "assistant" for m in self.messages):
            raise PydanticCustomError("no_assistant", "needs at least one assistant message")
        placeholders = any(
            isinstance(m.content, list) and any(p.type == "image" for p in m.content)
            for m in self.messages
        )
        if placeholders and self.image is None:
            raise PydanticCustomError("no_image", "an 'image' part needs the conversation's image")
        return self


def _int_id_to_str(value: Any) -> Any:
    return str(value) if type(value) is int else value


class LlavaTurn(_Model):
    model_config = ConfigDict(extra="ignore")

    from_: Literal["human", "gpt", "system"] = Field(alias="from")
    value: NonEmptyStr


class LlavaEntry(Record):
    """One entry of a LLaVA-style conversation file (other keys are ignored).

    `<image>` in a turn marks where the entry's image goes.
    """

    model_config = ConfigDict(extra="ignore")

    id: Annotated[NonEmptyStr, BeforeValidator(_int_id_to_str)]
    image: ImageRef | None = None
    conversations: list[LlavaTurn]

    @model_validator(mode="after")
    def _convertible(self) -> LlavaEntry:
        if not any(t.from_ == "gpt" for t in self.conversations):
            raise PydanticCustomError("no_gpt", "needs at least one 'gpt' turn")
        if self.image is None and any("<image>" in t.value for t in self.conversations):
            raise PydanticCustomError("no_image", "<image> in a turn but no image given")
        return self

    def to_conversation(self) -> Conversation:
        roles = {"human": "user", "gpt": "assistant", "system": "system"}
        messages = [
            {"role": roles[t.from_], "content": _split_image_tokens(t.value)}
            for t in self.conversations
        ]
        return Conversation(id=self.id, task="imported", messages=messages, image=self.image)


def _split_image_tokens(text: str) -> str | list[dict]:
    """LLaVA's "<image>\\nWhat is this?" -> [{"type": "image"}, {"type": "text", ...}]."""
    if "<image>" not in text:
        return text
    parts: list[dict] = []
    for i, chunk in enumerate(text.split("<image>")):
        if i:
            parts.append({"type": "image"})
        if chunk.strip():
            parts.append({"type": "text", "text": chunk.strip()})
    return parts
